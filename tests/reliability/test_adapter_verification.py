"""Issue 23, High/Medium: ``from_adapter`` verifies as ``from_plan`` does. The plan's factors must equal the
rescaling recomputed from the base model's SVD (a changed alpha or replaced factors are refused even when
the LoRA tensors were rebuilt to match), the LoRA tensors must equal the plan, and an adapter config that
peft would apply differently (``exclude_modules``, ``modules_to_save``, unknown keys) is refused. Plans
that re-order components, set ``alpha`` beside ``alphas`` or write a layer as ``1.9`` are refused too."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_model

from th_edit import ChannelEditor, EditPlan
from th_edit.edits.plan_checks import file_sha256
from th_edit.errors import AdapterError, PlanFormatError, PlanMismatchError
from th_edit.sharing.lora import LORA_KEY, module_factors


def _adapter(path, arch="llama", edits=((1, 2, [0, 1], 0.0),)):
    editor = ChannelEditor(make_model(arch))
    for layer, head, comps, alpha in edits:
        editor.scale_component(layer, head, "ov", comps, alpha)
    editor.save_adapter(path)
    return editor


def _rewrite_plan(path, change_json=None, change_tensors=None):
    """Edit the plan beside an adapter and re-record its tensor hash, as a careful attacker would."""
    if change_tensors:
        t = load_file(str(path / "edit_plan.safetensors"))
        change_tensors(t)
        save_file(t, str(path / "edit_plan.safetensors"), metadata={"format": "pt"})
    j = json.loads((path / "edit_plan.json").read_text())
    if change_json:
        change_json(j)
    j["tensors_sha256"] = file_sha256(path / "edit_plan.safetensors")
    (path / "edit_plan.json").write_text(json.dumps(j))


def _rebuild_lora(path, arch="llama"):
    """Make the LoRA tensors equal the (altered) plan, so only the factor-vs-SVD check can catch it."""
    a = load_file(str(path / "adapter_model.safetensors"))
    layout = ChannelEditor(make_model(arch)).layout
    for name, mo in module_factors(layout, EditPlan.load(path).edits).items():
        a[LORA_KEY.format(name=name, ab="A")] = mo.lora_A.contiguous()
        a[LORA_KEY.format(name=name, ab="B")] = mo.lora_B.contiguous()
    save_file(a, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_a4_replaced_factors_with_matching_lora_are_refused(tmp_path):
    ad = tmp_path / "ad"
    _adapter(ad)

    def replace(t):
        t["edit0.left"] = 3 * torch.eye(12)[:, :2].contiguous()
        t["edit0.right"] = torch.randn(48, 2)

    _rewrite_plan(ad, change_tensors=replace)
    _rebuild_lora(ad)
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError, match="do not match"):
        ChannelEditor.from_adapter(model, ad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left unchanged
    with pytest.raises(PlanMismatchError):
        ChannelEditor.from_plan(make_model("llama"), ad)
    assert len(ChannelEditor.from_adapter(make_model("llama"), ad, verify=False).edits) == 1  # opt-out still works


def test_a5_a_changed_alpha_is_refused(tmp_path):
    ad = tmp_path / "ad5"
    _adapter(ad, edits=((1, 2, [0], 0.0),))
    _rewrite_plan(ad, change_json=lambda j: j["edits"][0].update(alpha=5.0))
    with pytest.raises(PlanMismatchError):
        ChannelEditor.from_adapter(make_model("llama"), ad)


def test_lora_tensors_are_still_checked_against_the_plan(tmp_path):
    ad = tmp_path / "ad"
    _adapter(ad)
    a = load_file(str(ad / "adapter_model.safetensors"))
    key = next(k for k in a if k.endswith("lora_B.weight"))
    a[key] = a[key] * 1.5
    save_file(a, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="differ from the plan"):
        ChannelEditor.from_adapter(make_model("llama"), ad)


@pytest.mark.parametrize("key,value", [
    ("exclude_modules", "FIRST_TARGET"),
    ("modules_to_save", ["lm_head"]),
    ("layers_to_transform", [1]),
    ("target_parameters", ["model.layers.1.self_attn.o_proj.weight"]),
    ("trainable_token_indices", [1, 2]),
    ("lora_bias", True),
    ("lora_dropout", 0.5),
    ("init_lora_weights", "pissa"),
    ("some_future_option", {"on": True}),
])
def test_a2_adapter_configs_peft_applies_differently_are_refused(tmp_path, key, value):
    ad = tmp_path / "ad2"
    _adapter(ad, edits=((1, 2, [0], 0.0), (2, 1, [0], 0.0)))
    c = json.loads((ad / "adapter_config.json").read_text())
    c[key] = [sorted(c["target_modules"])[0]] if value == "FIRST_TARGET" else value
    (ad / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(AdapterError, match=key):
        ChannelEditor.from_adapter(make_model("llama"), ad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_genuine_adapters_still_load_exactly(tmp_path, arch):
    ad = tmp_path / "ok"
    editor = _adapter(ad, arch=arch, edits=((1, 2, [0, 1], 0.0), (1, 2, [2], 3.0), (0, 1, [0], 0.5)))
    loaded = ChannelEditor.from_adapter(make_model(arch), ad)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), editor.model.state_dict().values()))


def _plan(tmp_path):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", [0, 1], 0.0)
    editor.save_plan(tmp_path / "plan")
    return tmp_path / "plan"


def test_v1_v2_reordered_components_or_an_alpha_beside_alphas_are_refused(tmp_path):
    plan = _plan(tmp_path)

    def per_component(j):
        j["edits"][0]["alphas"] = [0.0, 0.0]
        j["edits"][0]["alpha"] = 1.0

    _rewrite_plan(plan, change_json=per_component)
    ChannelEditor.from_plan(make_model("gpt2"), plan)  # the same edit, written per component: accepted
    _rewrite_plan(plan, change_json=lambda j: j["edits"][0].update(alpha=5.0))
    with pytest.raises(PlanMismatchError, match="alpha"):
        ChannelEditor.from_plan(make_model("gpt2"), plan)
    _rewrite_plan(plan, change_json=lambda j: j["edits"][0].update(alpha=1.0, components=[1, 0]))
    with pytest.raises(PlanMismatchError, match="ascending"):
        ChannelEditor.from_plan(make_model("gpt2"), plan)


@pytest.mark.parametrize("layer", [1.9, True, "1"])
def test_p4_a_non_integer_layer_is_refused(tmp_path, layer):
    plan = _plan(tmp_path)
    _rewrite_plan(plan, change_json=lambda j: j["edits"][0].update(layer=layer))
    with pytest.raises(PlanFormatError):
        ChannelEditor.from_plan(make_model("gpt2"), plan)
