"""Saving and sharing: native HF checkpoints, cards, plans and Hub pushes against the loopback Hub server.

The real huggingface_hub client talks to ``tests/hub_server.py`` on 127.0.0.1; files are downloaded back
and compared byte for byte, and reloaded models with plain transformers are compared logit for logit.
"""

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from tiny_models import ARCHS, input_ids, make_model, make_tokenizer
from transformers import AutoModelForCausalLM

from th_edit import ChannelEditor, HubError, PlanMismatchError
from th_edit.edits.plan import PLAN_FILES

WORDS = "the a cat dog sat on mat . , and bought milk eggs bread".split()


def _edited(arch="gpt2", seed=0):
    model = make_model(arch, seed=seed)
    editor = ChannelEditor(model)
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.scale_component(2, 1, "qk", [0, 1], 1.5)
    return editor


def _logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else input_ids()).logits


def _load(source, **kw):
    """Plain transformers, eager attention (as the tiny models use) so logits compare bit for bit."""
    return AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kw).eval()


def _files(folder):
    """Every file but th_edit's manifest, which is never uploaded (issue 23)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".th_edit_manifest.json"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_checkpoint_reloads_with_plain_transformers_identically(arch, tmp_path):
    editor = _edited(arch)
    editor.save_pretrained(tmp_path / "out")
    reloaded = _load(tmp_path / "out")
    assert torch.equal(_logits(reloaded), _logits(editor.model))
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").glob("*.bin"))
    # the checkpoint carries its plan: re-applied to a fresh base it gives the same weights
    again = ChannelEditor.from_plan(make_model(arch), tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), editor.model.state_dict().values()))


def test_sharded_save_and_tokenizer(tmp_path):
    editor = _edited()
    editor.save_pretrained(tmp_path / "out", tokenizer=make_tokenizer(WORDS), max_shard_size="20KB")
    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    reloaded = _load(tmp_path / "out")
    assert torch.equal(_logits(reloaded), _logits(editor.model))


def test_model_card_metadata_and_sections(tmp_path):
    editor = _edited()
    editor.model.config._name_or_path = "openai-community/gpt2"
    editor.evidence = [dict(sender="0.1[0]", receiver="1.2[0]", mode="q", score=0.12, baseline=0.01, cosine=0.7)]
    editor.evaluation = {"before": {3: 0.5, 10: 0.1}, "after": {3: 0.55, 10: 0.3}}
    editor.save_pretrained(tmp_path / "out", repo_id="me/gpt2-laundry")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "th_edit" in card.data.tags
    text = card.text
    for needle in ("| 1 | 2 | ov | 0 | 0 |", "| 2 | 1 | qk | 0, 1 | 1.5 |", "| 0.1[0] | 1.2[0] | q | 0.1200",
                   "| 10 | 0.100 | 0.300 | +0.200 |", 'from_pretrained("me/gpt2-laundry")', "editor.reset()"):
        assert needle in text, needle


def test_failed_save_leaves_the_previous_directory_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _edited().save_pretrained(out)
    before = _files(out)
    editor = _edited(seed=3)
    real_save = editor.model.save_pretrained

    def disk_full(directory, **kw):
        real_save(directory, **kw)  # half the files are written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(editor.model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        editor.save_pretrained(out)
    assert _files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or backup left behind


def test_push_new_repo_download_is_byte_equal_and_reloads(hub, tmp_path):
    editor = _edited()
    tokenizer = make_tokenizer(WORDS)
    info = editor.push_to_hub("alice/tiny-edited", token=hub.token, tokenizer=tokenizer)
    editor.save_pretrained(tmp_path / "local", tokenizer=tokenizer, repo_id="alice/tiny-edited")
    snap = snapshot_download("alice/tiny-edited", cache_dir=tmp_path / "cache")
    assert _files(snap) == _files(tmp_path / "local")
    assert info.oid == hub.repos[("model", "alice/tiny-edited")].commits[-1][0]
    entries = hub.repos[("model", "alice/tiny-edited")].commits[-1][1]
    assert entries["model.safetensors"].lfs and entries["edit_plan.safetensors"].lfs and not entries["config.json"].lfs
    assert ("PUT", "/_lfs/" + entries["model.safetensors"].sha256) in hub.requests
    reloaded = _load("alice/tiny-edited", cache_dir=tmp_path / "c2")
    assert torch.equal(_logits(reloaded), _logits(editor.model))


def test_repush_without_changes_makes_no_commit_and_changes_make_one(hub, tmp_path):
    editor = _edited()
    editor.push_to_hub("alice/repush", token=hub.token)
    repo = hub.repos[("model", "alice/repush")]
    n = len(repo.commits)
    editor.push_to_hub("alice/repush", token=hub.token)
    assert len(repo.commits) == n
    editor.scale_component(0, 0, "ov", 2, 0.5)  # existing repo, new content: one new commit
    editor.push_to_hub("alice/repush", token=hub.token)
    assert len(repo.commits) == n + 1
    snap = snapshot_download("alice/repush", cache_dir=tmp_path / "cache")
    reloaded = _load(snap)
    assert torch.equal(_logits(reloaded), _logits(editor.model))


@pytest.mark.parametrize("token", [None, "hf_wrong"])
def test_missing_or_wrong_token_is_a_clear_error_and_nothing_is_lost(hub, token):
    editor = _edited()
    state = _state(editor.model)
    with pytest.raises(HubError, match="token"):
        editor.push_to_hub("alice/no-token", token=token)
    assert ("model", "alice/no-token") not in hub.repos
    assert all(torch.equal(state[k], v) for k, v in editor.model.state_dict().items())
    assert len(editor.edits) == 2


def test_pushing_to_someone_elses_namespace_is_refused(hub):
    with pytest.raises(HubError, match="HTTP 403"):
        _edited().push_to_hub("alice/not-bobs", token=hub.other_token)


def test_server_error_mid_upload_then_retry_succeeds(hub, tmp_path):
    editor = _edited()
    hub.faults["commit"] = 1  # the LFS upload goes through, the commit fails
    with pytest.raises(HubError, match="HTTP 500.*push again"):
        editor.push_to_hub("alice/flaky", token=hub.token)
    repo = hub.repos[("model", "alice/flaky")]
    assert len(repo.commits) == 1 and repo.commits[-1][1] == {}  # nothing half-committed
    puts = sum(1 for m, _ in hub.requests if m == "PUT")
    editor.push_to_hub("alice/flaky", token=hub.token)
    assert sum(1 for m, _ in hub.requests if m == "PUT") == puts  # the stored LFS objects are not re-sent
    snap = snapshot_download("alice/flaky", cache_dir=tmp_path / "cache")
    assert torch.equal(_logits(_load(snap)), _logits(editor.model))


def test_plan_push_and_from_plan_by_repo_id(hub, tmp_path):
    editor = _edited()
    editor.push_plan_to_hub("alice/tiny-plan", token=hub.token)
    files = hub.repos[("model", "alice/tiny-plan")].commits[-1][1]
    assert set(files) == {*PLAN_FILES, "README.md"}
    assert sum(e.size for e in files.values() if e.lfs) < 10_000
    again = ChannelEditor.from_plan(make_model("gpt2"), "alice/tiny-plan")
    assert torch.equal(_logits(again.model), _logits(editor.model))
    assert [e.describe() for e in again.edits] == [e.describe() for e in editor.edits]
    with pytest.raises(PlanMismatchError):
        ChannelEditor.from_plan(make_model("gpt2", seed=9), "alice/tiny-plan")
    card = ModelCard.load(snapshot_download("alice/tiny-plan", cache_dir=tmp_path / "c") + "/README.md")
    assert "th_edit" in card.data.tags and "| 1 | 2 | ov | 0 | 0 |" in card.text


def test_from_plan_of_a_full_checkpoint_repo_downloads_only_the_plan(hub, tmp_path):
    editor = _edited()
    editor.push_to_hub("alice/full-with-plan", token=hub.token)
    n = len(hub.requests)
    again = ChannelEditor.from_plan(make_model("gpt2"), "alice/full-with-plan")
    assert torch.equal(_logits(again.model), _logits(editor.model))
    assert not any("model.safetensors" in path for _, path in hub.requests[n:])


def test_bad_repo_ids_and_missing_repos_are_clear_errors(hub):
    with pytest.raises(HubError, match="not a Hub repository id"):
        _edited().push_to_hub("../../etc", token=hub.token)
    with pytest.raises(HubError, match="HTTP"):
        ChannelEditor.from_plan(make_model("gpt2"), "alice/does-not-exist")
