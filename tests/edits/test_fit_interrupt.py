"""Ctrl-C anywhere inside fit_edit, the final test evaluation included, leaves the model bit-identical to
before (edits rolled back, requires_grad flags and train mode restored) and raises FitInterruptedError (a
KeyboardInterrupt), as the README's Errors section promises."""

import pytest
import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor
from th_edit.data import laundry_list
from th_edit.edits import fit as fit_mod
from th_edit.edits.fit import FitConfig, fit_edit
from th_edit.errors import FitInterruptedError

FAST = dict(budget=4, steps=2, refit_steps=1, k_fractions=(1.0,), batch_size=4, progress=False,
            heads=[(1, 0), (2, 1)])


@pytest.fixture(scope="module")
def task():
    model, tok = laundry_model("llama", seed=5)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=12, seed=4)
    return model, tok, ds


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            [p.requires_grad for p in model.parameters()], model.training)


def _unchanged(model, state) -> bool:
    params, flags, training = state
    return (all(torch.equal(p, params[n]) for n, p in model.named_parameters())
            and [p.requires_grad for p in model.parameters()] == flags and model.training == training)


def _interrupt_nth_evaluation(monkeypatch, n: int) -> None:
    """Raise KeyboardInterrupt in the ``n``-th call of the fit's test evaluation (1: before, 2: after)."""
    real, calls = fit_mod.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_mod, "evaluate", evaluate)


@pytest.mark.parametrize("when", [1, 2], ids=["test_before", "test_after"])
def test_ctrl_c_in_the_test_evaluation_restores_everything(task, monkeypatch, when):
    model, tok, ds = task
    model.train()  # a model in train mode with mixed grad flags: both must come back as they were
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    try:
        editor = ChannelEditor(model, tokenizer=tok)
        state = _state(model)
        _interrupt_nth_evaluation(monkeypatch, when)
        with pytest.raises(FitInterruptedError) as info:
            fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**FAST), test=ds["test"])
        assert isinstance(info.value, KeyboardInterrupt)
        assert _unchanged(model, state) and not editor.edits
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_ctrl_c_through_the_facade_leaves_card_and_model(task, monkeypatch):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    state, card = _state(model), editor.card
    _interrupt_nth_evaluation(monkeypatch, 2)
    with pytest.raises(FitInterruptedError):
        editor.fit_edit(ds["train"], ds["dev"], test=ds["test"], **FAST)
    assert _unchanged(model, state) and not editor.edits and editor.card is card


def test_ctrl_c_keeps_earlier_edits(task, monkeypatch):
    """Only the fit's own edits are rolled back: an edit applied before the fit stays, bit for bit."""
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    earlier = editor.scale_component(0, 1, "ov", 0, 0.5)
    state = _state(model)
    _interrupt_nth_evaluation(monkeypatch, 2)
    with pytest.raises(FitInterruptedError):
        fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**FAST), test=ds["test"])
    assert _unchanged(model, state) and editor.edits == [earlier]
    editor.reset()
