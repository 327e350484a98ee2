"""Edits on models dispatched by accelerate: device_map hooks, in-memory offload, disk offload."""

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model

from th_edit import ChannelEditor, OffloadedWeightsError
from tiny_models import input_ids, make_model


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
