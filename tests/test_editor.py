"""ChannelEditor invariants on tiny random models of every supported architecture."""

import logging
import math

import pytest
import torch
from tiny_models import ARCHS, input_ids, make_model

from th_edit import ChannelEditor, InvalidArgumentError, NothingToUndoError


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot, skip=()):
    for k, v in model.state_dict().items():
        if k not in skip:
            assert torch.equal(v, snapshot[k]), f"{k} changed"


def _o_proj(editor, layer):
    return editor.layout.module(layer, editor.layout.spec.o)


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_an_exact_noop(arch):
    model = make_model(arch)
    snap = _snapshot(model)
    editor = ChannelEditor(model)
    editor.scale_component(1, 2, "ov", 0, alpha=1.0)
    editor.scale_component(1, 3, "qk", [0, 1], alpha=1)
    _assert_same(model, snap)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("circuit", ["ov", "qk"])
def test_edit_changes_exactly_the_chosen_component_and_nothing_else(arch, circuit):
    model = make_model(arch)
    editor = ChannelEditor(model)
    layer, head, comp, alpha = 1, 3, 1, 2.5
    U, S, V = editor.svd(layer, head, circuit)
    old = editor.circuit_matrix(layer, head, circuit).double()
    others = {(l, h): (editor.circuit_matrix(l, h, "ov"), editor.circuit_matrix(l, h, "qk"))
              for l in range(editor.n_layers) for h in range(editor.n_heads) if (l, h) != (layer, head)}
    snap = _snapshot(model)
    target = editor.layout.target(layer, head, circuit)
    target_before = target.detach().clone()

    edit = editor.scale_component(layer, head, circuit, comp, alpha)

    expected = old + (alpha - 1) * S[comp].double() * torch.outer(U[:, comp].double(), V[:, comp].double())
    new = editor.circuit_matrix(layer, head, circuit).double()
    assert (torch.linalg.matrix_norm(new - expected) / torch.linalg.matrix_norm(old)) < 1e-4
    assert not torch.equal(target.detach(), target_before)
    # every other head's circuits (GQA group mates included) are bit-identical
    for (l, h), (ov, qk) in others.items():
        assert torch.equal(editor.circuit_matrix(l, h, "ov"), ov) and torch.equal(editor.circuit_matrix(l, h, "qk"), qk)
    # every parameter outside the target slice is bit-identical
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert len(changed) == 1
    with torch.no_grad():
        target.copy_(target_before)
    _assert_same(model, snap)
    assert edit.target == ("W_O" if circuit == "ov" else "W_Q")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("circuit", ["ov", "qk"])
def test_forward_changes_only_through_the_edited_head(arch, circuit):
    """Hooks on the output projection's input (the per-head attention results z, head-major)."""
    model = make_model(arch)
    editor = ChannelEditor(model)
    layer, head, dh = 1, 2, editor.d_head
    ids = input_ids()
    captured = {}

    def capture(name):
        def hook(module, args, output):
            captured[name] = (args[0].detach().clone(), output.detach().clone())
        return hook

    handle = _o_proj(editor, layer).register_forward_hook(capture("before"))
    with torch.no_grad():
        model(ids)
    handle.remove()
    edit = editor.scale_component(layer, head, circuit, 0, 0.0)
    handle = _o_proj(editor, layer).register_forward_hook(capture("after"))
    with torch.no_grad():
        model(ids)
    handle.remove()
    z0, out0 = captured["before"]
    z1, out1 = captured["after"]
    mask = torch.ones(z0.shape[-1], dtype=torch.bool)
    mask[head * dh:(head + 1) * dh] = False
    assert torch.equal(z0[..., mask], z1[..., mask])  # other heads' results are untouched
    if circuit == "ov":
        assert torch.equal(z0, z1)  # attention is unchanged; only W_O[h] differs
        expected = out0 + z0[..., head * dh:(head + 1) * dh] @ edit.delta()
        torch.testing.assert_close(out1, expected, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.equal(z0[..., ~mask], z1[..., ~mask])


@pytest.mark.parametrize("arch", ARCHS)
def test_undo_and_reset_restore_bits_and_plan_reapplies_exactly(arch, tmp_path):
    model = make_model(arch)
    snap = _snapshot(model)
    ids = input_ids()
    with torch.no_grad():
        logits0 = model(ids).logits
    editor = ChannelEditor(model)
    editor.scale_component(2, 1, "ov", 0, 0.0)
    mid = _snapshot(model)
    editor.scale_component(2, 1, "ov", 3, 1.7)  # same head twice: edits compose
    editor.scale_component(1, 0, "qk", [0, 1], 0.3)
    edited = _snapshot(model)
    with torch.no_grad():
        logits_edited = model(ids).logits
    assert not torch.equal(logits_edited, logits0)

    editor.save_plan(tmp_path / "plan")
    fresh = make_model(arch)
    replay = ChannelEditor.from_plan(fresh, tmp_path / "plan")
    assert len(replay.edits) == 3
    _assert_same(fresh, edited)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits_edited)

    editor.undo()
    editor.undo()
    _assert_same(model, mid)
    editor.reset()
    _assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits0)
    with pytest.raises(NothingToUndoError):
        editor.undo()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_half_precision_models(arch, dtype, tmp_path):
    model = make_model(arch, dtype=dtype)
    snap = _snapshot(model)
    editor = ChannelEditor(model)
    U, S, V = editor.svd(1, 1, "ov")
    assert S.dtype == torch.float32
    old = editor.circuit_matrix(1, 1, "ov").double()
    editor.scale_component(1, 1, "ov", 0, 0.0)
    assert all(p.dtype == dtype for p in model.parameters())
    new = editor.circuit_matrix(1, 1, "ov").double()
    expected = old - S[0].double() * torch.outer(U[:, 0].double(), V[:, 0].double())
    assert (torch.linalg.matrix_norm(new - expected) / torch.linalg.matrix_norm(old)) < 2e-2
    edited = _snapshot(model)
    editor.save_plan(tmp_path)
    fresh = make_model(arch, dtype=dtype)
    ChannelEditor.from_plan(fresh, tmp_path)
    _assert_same(fresh, edited)
    editor.reset()
    _assert_same(model, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer=3, head=0), "layer=3 is out of range"),
        (dict(layer=-1, head=0), "layer=-1"),
        (dict(layer=0, head=4), "head=4 is out of range"),
        (dict(layer=0, head=0, component=12), "component=12 is out of range"),
        (dict(layer=0, head=0, component=[0, 0]), "repeats"),
        (dict(layer=0, head=0, component=[]), "empty"),
        (dict(layer=0, head=0, alpha=math.nan), "finite"),
        (dict(layer=0, head=0, alpha=math.inf), "finite"),
        (dict(layer=0, head=0, alpha="2"), "finite"),
        (dict(layer=0, head=0, circuit="vo"), "circuit='vo'"),
        (dict(layer=1.0, head=0), "layer=1.0"),
    ],
)
def test_bad_input_raises_typed_error_and_leaves_model_untouched(kwargs, match):
    model = make_model("llama")
    snap = _snapshot(model)
    editor = ChannelEditor(model)
    args = dict(circuit="ov", component=0, alpha=0.5) | kwargs
    with pytest.raises(InvalidArgumentError, match=match):
        editor.scale_component(**args)
    _assert_same(model, snap)
    assert editor.edits == []


def test_overflowing_edit_is_refused_without_change():
    model = make_model("llama", dtype=torch.float16)
    snap = _snapshot(model)
    editor = ChannelEditor(model)
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        editor.scale_component(0, 0, "ov", 0, alpha=1e30)
    _assert_same(model, snap)


def test_degenerate_block_is_exposed_and_partial_edit_warns(caplog):
    model = make_model("llama", num_key_value_heads=4)
    editor = ChannelEditor(model)
    layer, head = 0, 1
    # plant an OV circuit with singular values (3, 2, 2, 1, ...): make W_V[h] have orthonormal columns
    # in the folded basis and W_O[h] = diag(s) Q^T for an orthonormal Q.
    d, dh = editor.d_model, editor.d_head
    gain = editor.layout.norm_params(layer)[1].detach().float()
    g = torch.Generator().manual_seed(0)
    P, _ = torch.linalg.qr(torch.randn(d, dh, generator=g))
    Q, _ = torch.linalg.qr(torch.randn(d, dh, generator=g))
    s = torch.linspace(1.0, 0.1, dh)
    s[:3] = torch.tensor([3.0, 2.0, 2.0])
    with torch.no_grad():
        editor.layout.proj_weight(layer, head, "v").copy_(P / gain[:, None])
        editor.layout.out_weight(layer, head).copy_(s[:, None] * Q.T)
    svd = editor.svd(layer, head, "ov")
    assert svd.degenerate_blocks() == [[1, 2]]
    with caplog.at_level(logging.WARNING, logger="th_edit"):
        editor.scale_component(layer, head, "ov", 1, 0.0)
    assert "pass component=[1, 2]" in caplog.text
    caplog.clear()
    editor.undo()
    with caplog.at_level(logging.WARNING, logger="th_edit"):
        editor.scale_component(layer, head, "ov", [1, 2], 0.0)  # the whole subspace: well defined
    assert caplog.text == ""
    S_after = editor.svd(layer, head, "ov").S
    torch.testing.assert_close(S_after[:2], torch.stack([s[0], s[3]]), rtol=1e-4, atol=1e-4)
