"""Edits on models dispatched by accelerate: device_map hooks, in-memory offload, disk offload."""

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model
from tiny_models import input_ids, make_model

from th_edit import ChannelEditor, OffloadedWeightsError


def _edited_reference(arch):
    model = make_model(arch)
    ChannelEditor(model).scale_component(1, 2, "ov", 0, 0.0)
    ChannelEditor(model).scale_component(2, 1, "qk", 0, 2.0)
    with torch.no_grad():
        return model(input_ids()).logits


def _edit(model):
    editor = ChannelEditor(model)
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.scale_component(2, 1, "qk", 0, 2.0)
    return editor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_device_map_dispatched_model(arch):
    model = make_model(arch)
    names = [n for n, _ in model.named_children()]
    device_map = {n: "cpu" for n in names}
    model = dispatch_model(model, device_map=device_map)
    editor = _edit(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, _edited_reference(arch))
    editor.reset()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_memory_offload_edits_the_real_storage(arch):
    model = cpu_offload(make_model(arch), execution_device="cpu")
    assert any(p.device.type == "meta" for p in model.parameters())
    editor = _edit(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, _edited_reference(arch))
    editor.reset()
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, make_model(arch)(input_ids()).logits)


def test_disk_offload_is_refused_clearly(tmp_path):
    model = disk_offload(make_model("llama"), str(tmp_path), execution_device="cpu")
    with torch.no_grad():
        before = model(input_ids()).logits
    editor = ChannelEditor(model)
    with pytest.raises(OffloadedWeightsError, match="meta device"):
        editor.scale_component(1, 2, "ov", 0, 0.0)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, before)
    assert editor.edits == []


def test_offload_under_a_sequential_hook_is_followed():
    """A block dispatched by device_map and then offloaded carries a SequentialHook: its real weights are
    found through the inner hook, for reading and for editing."""
    from accelerate.hooks import SequentialHook

    model = make_model("llama")
    names = [n for n, _ in model.named_children()]
    model = dispatch_model(model, device_map={n: "cpu" for n in names}, force_hooks=True)
    cpu_offload(model.model.layers[1], execution_device="cpu")
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.o_proj._hf_hook, SequentialHook) and attn.o_proj.weight.device.type == "meta"
    editor = _edit(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, _edited_reference("llama"))
    editor.reset()
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, make_model("llama")(input_ids()).logits)
