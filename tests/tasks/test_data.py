"""Task datasets: determinism, splits, template semantics, per-tokenizer filtering, save/push/reload."""

import re

import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard, snapshot_download
from tiny_models import laundry_tokenizer, make_tokenizer

from th_edit import InvalidArgumentError
from th_edit.data import FEATURES, ITEMS, first_token, ioi, laundry_list, load_task, push_task, save_task, usable_words


@pytest.fixture(scope="module")
def tok():
    return laundry_tokenizer()


def test_deterministic_for_a_seed_and_different_across_seeds(tok):
    a = laundry_list(tok, lengths=[3, 5], n_per_length=12, seed=1)
    b = laundry_list(tok, lengths=[3, 5], n_per_length=12, seed=1)
    c = laundry_list(tok, lengths=[3, 5], n_per_length=12, seed=2)
    assert a["test"].to_list() == b["test"].to_list()
    assert a["test"]["prompt"] != c["test"]["prompt"]  # the cache is keyed on the seed, never stale


def test_splits_are_disjoint_sized_and_typed(tok):
    ds = laundry_list(tok, lengths=[2, 4, 20], n_per_length=20, seed=0)
    assert {k: len(v) for k, v in ds.items()} == {"train": 30, "dev": 15, "test": 15}
    prompts = [set(ds[s]["prompt"]) for s in ("train", "dev", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert ds["train"].features == FEATURES
    assert sorted(set(ds["test"]["list_length"])) == [2, 4, 20]


def test_omitted_item_template_semantics(tok):
    for row in laundry_list(tok, lengths=[2, 6, 12], n_per_length=8, seed=3)["test"]:
        items, target = row["items"], row["target"]
        assert items[row["target_index"]] == target and len(items) == row["list_length"]
        listed, mentioned = row["prompt"].split(". At home ")
        assert all(re.search(rf"\b{w}\b", listed) for w in items)
        assert not re.search(rf"\b{target}\b", mentioned)
        assert all(re.search(rf"\bthe {w}\b", mentioned) for w in items if w != target)
        assert row["prompt"].endswith("could not find the")
        assert len({first_token(tok, w) for w in items}) == len(items)


def test_recall_and_ioi_templates(tok):
    for row in laundry_list(tok, lengths=[5], n_per_length=8, template="recall")["dev"]:
        who = re.search(r"what does (\w+) have", row["prompt"]).group(1)
        assert f"{who} has the {row['target']}," in row["prompt"] + "," or f"{who} has the {row['target']}." in row["prompt"]
    for row in ioi(tok, n=16)["train"]:
        io, s = row["items"]
        assert row["target"] == io and row["prompt"].count(s) == 2 and row["prompt"].count(io) == 1


def test_item_pool_is_filtered_per_tokenizer():
    # "ice cream" and "ice tea" share their first token; "caviar" is unknown to this tokenizer
    tok = make_tokenizer("ice cream tea milk bread".split())
    kept = usable_words(tok, ["ice cream", "ice tea", "milk", "caviar", "bread"])
    assert [w for w, _ in kept] == ["ice cream", "milk", "bread"]
    ds = laundry_list(tok, lengths=[3], n_per_length=4, items=["ice cream", "ice tea", "milk", "caviar", "bread"])
    assert all(sorted(r["items"]) == ["bread", "ice cream", "milk"] for r in ds["train"])


def test_bad_arguments_are_clear_errors(tok):
    with pytest.raises(InvalidArgumentError, match="list length 500 is out of range"):
        laundry_list(tok, lengths=[500])
    with pytest.raises(InvalidArgumentError, match="template="):
        laundry_list(tok, template="nope")
    with pytest.raises(InvalidArgumentError, match="only 1 of the items have a known, distinct first token"):
        laundry_list(tok, lengths=[2], items=["milk", "zzyzxq-unknown"])
    with pytest.raises(InvalidArgumentError, match="distinct"):
        laundry_list(tok, lengths=[2], n_per_length=10_000, items=["milk", "bread"])
    assert len(usable_words(tok, ITEMS)) == len(ITEMS)


def test_save_and_reload_from_disk(tok, tmp_path):
    ds = laundry_list(tok, lengths=[3, 8], n_per_length=8, seed=5)
    save_task(ds, tmp_path / "task", seed=5)
    back = load_task(tmp_path / "task")
    assert all(back[s].to_list() == ds[s].to_list() for s in ds)
    card = DatasetCard.load(tmp_path / "task" / "README.md")
    assert "th_edit" in card.data.tags and "| test | 4 |" in card.text


def test_push_dataset_to_the_hub_and_download_byte_equal(tok, hub, tmp_path):
    ds = laundry_list(tok, lengths=[3], n_per_length=8, seed=2)
    push_task(ds, "alice/laundry", token=hub.token, seed=2)
    save_task(ds, tmp_path / "local", seed=2)
    snap = snapshot_download("alice/laundry", repo_type="dataset", cache_dir=tmp_path / "cache")
    local = {p.relative_to(tmp_path / "local").as_posix(): p.read_bytes() for p in (tmp_path / "local").rglob("*")
             if p.is_file() and p.name != ".th_edit_manifest.json"}  # the manifest is never uploaded (issue 23)
    from pathlib import Path

    remote = {p.relative_to(snap).as_posix(): p.read_bytes() for p in Path(snap).rglob("*") if p.is_file()}
    assert remote == local
    assert hub.repos[("dataset", "alice/laundry")].commits[-1][1]["data/test.parquet"].lfs
    again = load_dataset("parquet", data_files={"test": f"{snap}/data/test.parquet"}, features=FEATURES)
    assert again["test"].to_list() == ds["test"].to_list()
