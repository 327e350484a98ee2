"""Issue 28: no train/test leak between commands, plans that record their data, artifacts that name what
they are (Hub id, license, model-index results, no local path)."""

import json
from collections import Counter

import pytest
from tiny_models import laundry_tokenizer
from transformers import AutoModelForCausalLM

from th_edit import DataOverlapError, EditPlan
from th_edit.app.cli import main
from th_edit.data import laundry_list
from th_edit.edits.plan import PLAN_JSON
from th_edit.evaluate import check_overlap, evaluate, prompt_key, recipe_of

FIT = ["--lengths", "3", "5", "--search-lengths", "3", "5", "--heads", "all", "--budget", "4", "--quiet"]


def run(capsys, *argv):
    code = main([*argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def edited(tiny_model_dir, tmp_path_factory):
    """The README flow's first half, `th-edit edit MODEL --auto --out o1`, at two --n."""
    out = {}
    for n in (16, 48):
        folder = tmp_path_factory.mktemp(f"o{n}") / "o1"
        assert main(["edit", str(tiny_model_dir), "--auto", "--n", str(n), "--out", str(folder), *FIT]) == 0
        out[n] = folder
    return out


def test_a_prompt_has_one_split_whatever_the_size():
    tok = laundry_tokenizer()
    split_of = {}
    for n in (8, 20, 60, 101):
        ds = laundry_list(tok, lengths=[3, 6], n_per_length=n, seed=4)
        assert {s: len(ds[s]) for s in ds} == {"train": 2 * round(n / 2), "dev": 2 * round(n / 4),
                                              "test": 2 * (n - round(n / 2) - round(n / 4))}
        for s in ds:
            for p in ds[s]["prompt"]:
                assert split_of.setdefault(p, s) == s, (p, n)
    assert Counter(split_of.values())["train"] > Counter(split_of.values())["test"]
    assert recipe_of(ds)["n_per_length"] == 101 and recipe_of(ds["test"])["seed"] == 4


@pytest.mark.parametrize("n_edit,n_eval", [(16, 40), (48, 12), (48, 60)])
def test_edit_then_eval_shares_no_prompt(capsys, tiny_model_dir, edited, n_edit, n_eval):
    code, out, _ = run(capsys, "eval", str(tiny_model_dir), "--plan", str(edited[n_edit]), "--n", str(n_eval),
                       "--lengths", "3", "5", "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["overlap"] == {"n_eval": 2 * (n_eval - round(n_eval / 2) - round(n_eval / 4)), "in_train": 0,
                                  "in_dev": 0, "checked": True, "total": 0}
    # independently: none of the test prompts is among the edit's train or dev prompts, rebuilt from its recipe
    tok = laundry_tokenizer()
    fitted = laundry_list(tok, lengths=[3, 5], n_per_length=n_edit, seed=0)
    used = {p for s in ("train", "dev") for p in fitted[s]["prompt"]}
    assert not used & set(laundry_list(tok, lengths=[3, 5], n_per_length=n_eval, seed=0)["test"]["prompt"])


def test_the_plan_records_its_data(edited):
    plan = EditPlan.load(edited[48])
    data = plan.provenance["data"]
    assert data["recipe"]["seed"] == 0 and data["recipe"]["template"] == "omitted"
    assert data["recipe"]["lengths"] == [3, 5] and data["recipe"]["n_per_length"] == 48
    ds = laundry_list(laundry_tokenizer(), lengths=[3, 5], n_per_length=48, seed=0)
    assert data["prompt_keys"]["train"] == sorted(prompt_key(r["prompt"], r["target"]) for r in ds["train"])
    assert data["n_train"] == 48 and data["n_dev"] == 24


def test_overlap_is_refused_counted_and_allowed_loudly(capsys, tiny_model_dir, edited):
    code, out, err = run(capsys, "eval", str(tiny_model_dir), "--plan", str(edited[16]), "--n", "16", "--lengths",
                         "3", "5", "--split", "train", "--json")
    assert code == 2
    assert json.loads(out)["error_type"] == "DataOverlapError" and "16 of the 16 evaluation prompts" in err
    code, out, _ = run(capsys, "eval", str(tiny_model_dir), "--plan", str(edited[16]), "--n", "16", "--lengths",
                       "3", "5", "--split", "dev", "--allow-overlap", "--json")
    assert code == 0 and json.loads(out)["overlap"]["in_dev"] == 8
    # the library: a mixed set, counted exactly
    plan = EditPlan.load(edited[48])
    ds = laundry_list(laundry_tokenizer(), lengths=[3, 5], n_per_length=48, seed=0)
    mixed = ds["train"].to_list()[:5] + ds["dev"].to_list()[:3] + ds["test"].to_list()
    found = check_overlap(plan, mixed, allow=True)
    assert (found.in_train, found.in_dev, found.n_eval) == (5, 3, 8 + len(ds["test"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(DataOverlapError, match="8 of the"):
        evaluate(model, laundry_tokenizer(), mixed, plan=plan, progress=False)


def test_old_plans_without_provenance_load_and_say_so(edited, tmp_path, caplog):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(edited[16], folder)
    data = json.loads((folder / PLAN_JSON).read_text())
    del data["provenance"]
    (folder / PLAN_JSON).write_text(json.dumps(data))
    plan = EditPlan.load(folder)
    assert plan.provenance == {}
    assert not check_overlap(plan, [{"prompt": "x", "target": "y"}]).checked
    assert "records no training data" in caplog.text
