"""Edit plans: JSON + safetensors round trip, base-model checks, malformed input, atomic writes."""

import json

import pytest
import torch
from tiny_models import make_model

from th_edit import ChannelEditor, EditPlan, PlanFormatError, PlanMismatchError
from th_edit.edits.plan import PLAN_JSON, PLAN_TENSORS, SCHEMA_VERSION


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def saved_plan(tmp_path):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.scale_component(2, 0, "qk", 1, 2.0)
    editor.save_plan(tmp_path / "plan")
    return tmp_path / "plan"


def test_plan_files_are_small_readable_and_stamped(saved_plan):
    data = json.loads((saved_plan / PLAN_JSON).read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["th_edit_version"]
    assert data["base_model"]["model_type"] == "gpt2"
    assert set(data["base_model"]["fingerprints"]) == {"1.2", "2.0"}
    assert [e["target"] for e in data["edits"]] == ["W_O", "W_Q"]
    assert (saved_plan / PLAN_TENSORS).stat().st_size < 10_000
    plan = EditPlan.load(saved_plan)
    assert plan.edits[0].left.dtype == torch.float32 and plan.edits[1].alpha == 2.0


def test_plan_for_another_model_is_refused_and_nothing_changes(saved_plan):
    other = make_model("gpt2", seed=5)
    snap = _snapshot(other)
    with pytest.raises(PlanMismatchError, match="differs from the plan's base model"):
        ChannelEditor.from_plan(other, saved_plan)
    assert all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())
    llama = make_model("llama")
    with pytest.raises(PlanMismatchError, match="'gpt2'"):
        ChannelEditor.from_plan(llama, saved_plan)


def test_plan_for_edited_model_is_refused(saved_plan):
    model = make_model("gpt2")
    ChannelEditor.from_plan(model, saved_plan)
    with pytest.raises(PlanMismatchError):
        ChannelEditor.from_plan(model, saved_plan)  # applying twice would double the edit


def test_verify_false_applies_anyway(saved_plan):
    model = make_model("gpt2", seed=5)
    editor = ChannelEditor.from_plan(model, saved_plan, verify=False)
    assert len(editor.edits) == 2


@pytest.mark.parametrize("corrupt, match", [
    (lambda d: (d / PLAN_JSON).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / PLAN_JSON).write_text(json.dumps({"schema_version": 99})), "schema_version 99"),
    (lambda d: (d / PLAN_TENSORS).unlink(), "does not hold an edit plan"),
    (lambda d: (d / PLAN_JSON).write_text(json.dumps({"schema_version": 1, "base_model": {"model_type": "gpt2"},
                                                       "edits": [{"layer": 0}]})), "incomplete or malformed"),
])
def test_malformed_plans_raise_plan_format_error(saved_plan, corrupt, match):
    corrupt(saved_plan)
    model = make_model("gpt2")
    snap = _snapshot(model)
    with pytest.raises(PlanFormatError, match=match):
        ChannelEditor.from_plan(model, saved_plan)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_failed_save_leaves_previous_plan_intact(saved_plan, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved_plan.iterdir()}
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(0, 0, "ov", 0, 3.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("th_edit.edits.plan.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        editor.save_plan(saved_plan)
    assert {p.name: p.read_bytes() for p in saved_plan.iterdir()} == before
    assert sorted(p.name for p in saved_plan.parent.iterdir()) == ["plan"]  # no staging debris


def test_failed_move_restores_previous_files(saved_plan, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved_plan.iterdir()}
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(0, 0, "ov", 0, 3.0)
    import os as _os
    real_replace, calls = _os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # after both old files are backed up and one new file is moved in
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr("th_edit.utils.files.os.replace", flaky_replace)
    with pytest.raises(OSError, match="interrupted"):
        editor.save_plan(saved_plan)
    monkeypatch.setattr("th_edit.utils.files.os.replace", real_replace)
    assert {p.name: p.read_bytes() for p in saved_plan.iterdir()} == before


def test_failure_mid_plan_rolls_back(saved_plan):
    plan = EditPlan.load(saved_plan)
    plan.edits[1].right = torch.zeros(3, 1)  # wrong geometry for the second edit
    model = make_model("gpt2")
    snap = _snapshot(model)
    editor = ChannelEditor(model)
    with pytest.raises(ValueError, match="different geometry"):
        editor.apply_plan(plan)
    assert editor.edits == []
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_plan_files_are_byte_reproducible(tmp_path):
    """Saving the same plan twice gives identical bytes (so an unchanged re-push makes no Hub commit)."""
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", [0, 1], 0.5)
    for name in ("a", "b"):
        editor.save_plan(tmp_path / name)
    for f in (PLAN_JSON, PLAN_TENSORS):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
