"""Run-time steering: equals the weight edit at all positions, touches only chosen positions, always unhooks."""

import pytest
import torch
from tiny_models import input_ids, make_model

from th_edit import ChannelEditor, InvalidArgumentError


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "gpt_neox", "phi3", "opt"])
@pytest.mark.parametrize("components,alpha", [(0, 0.0), ([1, 2], 3.0)])
def test_steering_everywhere_equals_the_weight_edit(arch, components, alpha):
    model = make_model(arch, seed=1)
    editor = ChannelEditor(model)
    ids = input_ids(batch=3, seq=9)
    base = _logits(model, ids)
    with editor.steer(2, 1, component=components, alpha=alpha):
        steered = _logits(model, ids)
    assert torch.equal(_logits(model, ids), base)  # unhooked on exit
    editor.scale_component(2, 1, "ov", components, alpha)
    edited = _logits(model, ids)
    editor.undo()
    assert not torch.allclose(steered, base, atol=1e-4)
    assert torch.allclose(steered, edited, atol=1e-4, rtol=1e-4)


def test_only_the_chosen_positions_change():
    model = make_model("llama", seed=2)
    editor = ChannelEditor(model)
    ids = input_ids(batch=2, seq=8)
    base = _logits(model, ids)
    with editor.steer(1, 0, component=0, alpha=5.0, positions="last"):
        last = _logits(model, ids)
    assert torch.equal(last[:, :-1], base[:, :-1]) and not torch.allclose(last[:, -1], base[:, -1])
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3] = True  # only row 0, position 3: row 1 and positions before 3 untouched
    with editor.steer(1, 0, component=0, alpha=5.0, positions=mask):
        masked = _logits(model, ids)
    assert torch.equal(masked[1], base[1]) and torch.equal(masked[0, :3], base[0, :3])
    assert not torch.allclose(masked[0, 3], base[0, 3])


def test_add_moves_the_head_output_along_the_write_direction():
    model = make_model("gpt2", seed=3)
    editor = ChannelEditor(model)
    ids = input_ids(batch=1, seq=5)
    module = editor.layout.module(1, editor.layout.spec.o)
    seen = []
    capture = lambda m, a, out: seen.append(out.detach().clone())  # noqa: E731
    h = module.register_forward_hook(capture)
    _logits(model, ids)
    h.remove()
    with editor.steer(1, 3, component=[0, 2], add=[0.5, -2.0], positions=[1]) as info:
        h = module.register_forward_hook(capture)  # runs after the steering hook
        _logits(model, ids)
    h.remove()
    delta = seen[1] - seen[0]
    V = info["V"]
    assert torch.allclose(delta[0, 1], 0.5 * V[:, 0] - 2.0 * V[:, 1], atol=1e-5)
    assert torch.equal(delta[0, 0], torch.zeros_like(delta[0, 0]))


def test_hooks_are_removed_when_the_body_raises():
    model = make_model("llama", seed=4)
    editor = ChannelEditor(model)
    module = editor.layout.module(2, editor.layout.spec.o)
    with pytest.raises(RuntimeError, match="boom"):
        with editor.steer(2, 0, component=0, alpha=2.0):
            assert len(module._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == 0


def test_bad_arguments_are_refused_before_hooking():
    model = make_model("llama", seed=5)
    editor = ChannelEditor(model)
    module = editor.layout.module(0, editor.layout.spec.o)
    with pytest.raises(InvalidArgumentError, match="component"):
        editor.steer(0, 0, component=99).__enter__()
    with pytest.raises(InvalidArgumentError, match="add="):
        editor.steer(0, 0, component=[0, 1], add=[1.0]).__enter__()
    with pytest.raises(InvalidArgumentError, match="'ov'"):
        editor.steer(0, 0, "qk")
    with pytest.raises(InvalidArgumentError, match="positions="):
        with editor.steer(0, 0, positions="first"):
            _logits(model, input_ids())
    assert len(module._forward_hooks) == 0


def test_steering_a_device_map_dispatched_model():
    from accelerate import dispatch_model

    model = make_model("llama", seed=6)
    ids = input_ids(batch=2, seq=7)
    editor = ChannelEditor(model)
    with editor.steer(1, 3, component=0, alpha=2.5):
        expected = _logits(model, ids)
    other = dispatch_model(make_model("llama", seed=6), device_map={"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                                    "model.norm": "cpu", "model.rotary_emb": "cpu",
                                                                    "lm_head": "cpu"})
    with ChannelEditor(other).steer(1, 3, component=0, alpha=2.5):
        assert torch.equal(_logits(other, ids), expected)
