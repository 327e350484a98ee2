"""Issue 13, Medium: fingerprints are mandatory and computed from the weights at edit time, the factors file
is hashed in the JSON, factors are validated (dtype, shape, rank, consistency with the base model's SVD),
and an editor reused after ``reset()`` + ``load_state_dict(other)`` exports the other model's fingerprint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_model

from th_edit import ChannelEditor, PlanFormatError, PlanMismatchError
from th_edit.edits.plan import PLAN_JSON, PLAN_TENSORS, EditPlan


@pytest.fixture
def plan_dir(tmp_path):
    editor = ChannelEditor(make_model("llama"))
    editor.scale_component(1, 2, "ov", [0, 1], 0.0)
    editor.scale_component(2, 0, "qk", 0, 1.5)
    editor.save_plan(tmp_path / "plan")
    return tmp_path / "plan"


def _edit_json(folder, change):
    data = json.loads((folder / PLAN_JSON).read_text())
    change(data)
    (folder / PLAN_JSON).write_text(json.dumps(data))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plan_records_a_hash_of_its_factors(plan_dir):
    import hashlib

    data = json.loads((plan_dir / PLAN_JSON).read_text())
    assert data["tensors_sha256"] == hashlib.sha256((plan_dir / PLAN_TENSORS).read_bytes()).hexdigest()


def test_plan_without_fingerprints_is_refused(plan_dir):
    _edit_json(plan_dir, lambda d: d["base_model"].update(fingerprints={}))
    other = make_model("llama", seed=7)
    before = _state(other)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        ChannelEditor.from_plan(other, plan_dir)
    assert _unchanged(other, before)
    ChannelEditor.from_plan(make_model("llama"), plan_dir, verify=False)  # an explicit opt-out still works


def test_tampered_factors_are_refused(plan_dir):
    tensors = load_file(str(plan_dir / PLAN_TENSORS))
    tensors["edit0.left"] = tensors["edit0.left"] * 10
    save_file(tensors, str(plan_dir / PLAN_TENSORS), metadata={"format": "pt"})
    with pytest.raises(PlanFormatError, match="tensors_sha256"):
        EditPlan.load(plan_dir)
    # with the hash line removed too, the factors no longer match the stated components and scale
    _edit_json(plan_dir, lambda d: d.pop("tensors_sha256"))
    model = make_model("llama")
    before = _state(model)
    with pytest.raises(PlanMismatchError, match="do not match"):
        ChannelEditor.from_plan(model, plan_dir)
    assert _unchanged(model, before)


def test_stated_alpha_that_does_not_match_the_factors_is_refused(plan_dir):
    def change(d):
        d["edits"][1]["alpha"] = 3.0
        d.pop("tensors_sha256")

    _edit_json(plan_dir, change)
    model = make_model("llama")
    before = _state(model)
    with pytest.raises(PlanMismatchError, match="do not match"):
        ChannelEditor.from_plan(model, plan_dir)
    assert _unchanged(model, before)  # the first edit, already written, was rolled back


@pytest.mark.parametrize("bad", ["dtype", "rank", "nan"])
def test_factor_dtype_shape_and_values_are_checked(plan_dir, bad):
    tensors = load_file(str(plan_dir / PLAN_TENSORS))
    t = tensors["edit0.right"]
    tensors["edit0.right"] = {"dtype": t.half(), "rank": t[:, :1].contiguous(), "nan": t.clone().fill_(float("nan"))}[bad]
    save_file(tensors, str(plan_dir / PLAN_TENSORS), metadata={"format": "pt"})
    _edit_json(plan_dir, lambda d: d.pop("tensors_sha256"))
    with pytest.raises(PlanFormatError, match="factor right"):
        EditPlan.load(plan_dir)


def test_genuine_plan_still_reapplies_bit_for_bit(plan_dir):
    editor = ChannelEditor(make_model("llama"))
    editor.scale_component(1, 2, "ov", [0, 1], 0.0)
    editor.scale_component(2, 0, "qk", 0, 1.5)
    again = ChannelEditor.from_plan(make_model("llama"), plan_dir)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), editor.model.state_dict().values()))


def test_reused_editor_exports_the_new_weights_fingerprint():
    model = make_model("llama", seed=0)
    editor = ChannelEditor(model)
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.reset()
    model.load_state_dict(make_model("llama", seed=5).state_dict())
    editor.scale_component(1, 2, "ov", 0, 0.0)
    plan = editor.export_plan()
    fresh = ChannelEditor(make_model("llama", seed=5))
    assert plan.base.fingerprints == {"1.2": fresh.head_fingerprint(1, 2)}
    fresh.apply_plan(plan)  # verifies against the second model's weights
    with pytest.raises(PlanMismatchError):
        ChannelEditor.from_plan(make_model("llama", seed=0), plan)
