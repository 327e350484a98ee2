"""The big-model path on CPU: a tiny model whose blocks accelerate dispatches over an explicit multi-entry
``device_map`` (one entry per block, hooks at every block boundary, as ``device_map="auto"`` places a big
model over several GPUs) can be analysed, edited and undone bit for bit, evaluated, and differentiated
(gradients flow back through every block's hook).

On GPUs the same calls run with ``device_map="auto"``; the channel map then streams on the device of the
first layer (or ``channel_map(device="cuda:0")``). The CUDA path is untested here (no GPU in CI).
"""

import pytest
import torch
from accelerate import dispatch_model
from tiny_models import input_ids, laundry_model, make_model

from th_edit import ChannelEditor
from th_edit.core.layout import AttentionLayout
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate


def block_device_map(model, device: str = "cpu") -> dict[str, str]:
    """One ``device_map`` entry per transformer block and per other top-level module."""
    layers = AttentionLayout(model).spec.layers  # e.g. "model.layers", "transformer.h"
    parent = layers.rsplit(".", 1)[0]
    entries = [f"{layers}.{i}" for i in range(len(model.get_submodule(layers)))]
    entries += [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children() if f"{parent}.{n}" != layers]
    entries += [n for n, _ in model.named_children() if n != parent]
    return {name: device for name in entries}


def dispatched(model):
    out = dispatch_model(model, device_map=block_device_map(model), force_hooks=True)
    assert all(hasattr(block, "_hf_hook") for block in AttentionLayout(out).blocks)  # really dispatched per block
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_channel_map_of_a_dispatched_model_equals_the_plain_one(arch):
    plain = ChannelEditor(make_model(arch)).channel_map(progress=False, baseline_samples=2, keep_top=50)
    cmap = ChannelEditor(dispatched(make_model(arch))).channel_map(progress=False, baseline_samples=2, keep_top=50)
    for mode in "qkv":
        assert torch.equal(cmap.head_scores(mode), plain.head_scores(mode))
        assert torch.equal(cmap.modes[mode].top_row, plain.modes[mode].top_row)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_and_undo_on_a_dispatched_model_are_exact(arch):
    ref = make_model(arch)
    ChannelEditor(ref).scale_component(1, 2, "ov", 0, 0.0)
    ChannelEditor(ref).scale_component(2, 1, "qk", [0, 1], 3.0)
    model = dispatched(make_model(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits0 = model(input_ids()).logits
    editor = ChannelEditor(model)
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.scale_component(2, 1, "qk", [0, 1], 3.0)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, ref(input_ids()).logits)
    editor.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, logits0)


def test_evaluation_of_a_dispatched_model_equals_the_plain_one():
    model, tok = laundry_model("llama", seed=4)
    test = laundry_list(tok, lengths=[2, 4], n_per_length=8, seed=0)["test"]
    ref = evaluate(model, tok, test, batch_size=4, progress=False).records
    fresh, _ = laundry_model("llama", seed=4)
    assert evaluate(dispatched(fresh), tok, test, batch_size=4, progress=False).records.equals(ref)


def _hooked_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss plus the squared output of head 1 of the last layer, read by a forward pre-hook
    on its output projection (how th_edit reads head outputs)."""
    layout = AttentionLayout(model)
    seen = {}
    last = layout.n_layers - 1

    def read_head(module, args):
        seen["z"] = args[0][..., layout.head_slice(1)]  # returns None: the input is left as it is

    handle = layout.out_module(last).register_forward_pre_hook(read_head)
    try:
        out = model(input_ids=ids, labels=ids)
    finally:
        handle.remove()
    return out.loss + seen["z"].square().mean().to(out.loss.device)


def test_gradients_flow_through_a_dispatched_model():
    plain, dispatched_model = make_model("llama"), dispatched(make_model("llama"))
    for model in (plain, dispatched_model):
        model.zero_grad()
        _hooked_loss(model, input_ids()).backward()
    grads = dict(plain.named_parameters())
    for name, p in dispatched_model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7)
    first_block = AttentionLayout(dispatched_model).blocks[0]
    assert any(float(p.grad.abs().sum()) > 0 for p in first_block.parameters())  # back through every block hook


def test_fit_edit_on_a_dispatched_model():
    """fit_edit runs through accelerate's per-block hooks (gradients flow across the dispatched blocks) and
    fits the same scales as on the plain model; the fitted edit undoes bit for bit."""
    from th_edit.edits.fit import FitConfig

    cfg = FitConfig(budget=6, steps=3, refit_steps=2, k_fractions=(1.0,), batch_size=4, progress=False)
    plain, tok = laundry_model("llama", seed=2)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=16, seed=3)
    ref = ChannelEditor(plain, tokenizer=tok).fit_edit(ds["train"], ds["dev"], config=cfg)
    model, _ = laundry_model("llama", seed=2)
    model = dispatched(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = ChannelEditor(model, tokenizer=tok)
    got = editor.fit_edit(ds["train"], ds["dev"], config=cfg)
    assert [(e.layer, e.head, e.components) for e in got.edits] == [(e.layer, e.head, e.components) for e in ref.edits]
    for a, b in zip(got.edits, ref.edits):
        assert torch.allclose(torch.tensor(a.scales), torch.tensor(b.scales), atol=1e-5)
    editor.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
