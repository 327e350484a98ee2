"""th_edit.edits.fit: exact differentiable reparametrisation, plans with per-component scales, selection on
dev, bad input, and the model left bit for bit as it was on every failure."""

import json

import pytest
import torch
from tiny_models import input_ids, laundry_model, make_model

from th_edit import ChannelEditor, EditPlan
from th_edit.data import HARDWARE_ITEMS, ITEM_POOLS, ITEMS, OMITTED_TEMPLATES, TOY_ITEMS, laundry_list
from th_edit.edits.fit import ChannelFit, FitConfig, fit_edit, resolve_heads
from th_edit.edits.plan import PLAN_JSON
from th_edit.errors import FitError, FitInterruptedError, InvalidArgumentError

FAST = dict(budget=6, steps=3, refit_steps=2, k_fractions=(1.0, 0.5), batch_size=4, progress=False)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def task():
    model, tok = laundry_model("llama", seed=2)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=16, seed=3)
    return model, tok, ds


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "gpt_neox", "phi3"])
@pytest.mark.parametrize("circuits", [("ov",), ("qk",), ("ov", "qk")])
def test_hooks_equal_applied_edits(arch, circuits):
    model = make_model(arch, seed=1)
    editor = ChannelEditor(model)
    snap = _snapshot(model)
    heads = [(0, 1), (1, 0), (1, 3), (2, 2)]
    fit = ChannelFit(editor.layout, heads, circuits, folded=True)
    g = torch.Generator().manual_seed(0)
    fit.theta = torch.randn(fit.theta.shape, generator=g) * 0.7
    fit.keep_top(10)
    ids = input_ids(batch=2, seq=9, seed=2)
    with torch.no_grad(), fit.hooks():
        hooked = model(input_ids=ids).logits
    assert _same(model, snap)  # hooks never write weights
    for e in fit.edits():
        editor.apply_edit(e)
    with torch.no_grad():
        written = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, written, rtol=1e-4, atol=1e-4)
    editor.reset()
    assert _same(model, snap)


def test_per_component_edit_matches_scale_component():
    """A fitted edit with equal scales is the same change as scale_component with that alpha."""
    model = make_model("llama", seed=4)
    editor = ChannelEditor(model)
    fit = ChannelFit(editor.layout, [(1, 2)], ("ov",), folded=True)
    fit.mask.zero_()
    fit.mask[0, [1, 4]] = 1.0
    fit.theta = fit.mask * torch.log(torch.tensor(2.5))
    (e,) = fit.edits()
    ref = editor.scale_component(1, 2, "ov", [1, 4], 2.5)
    editor.undo()
    assert e.components == (1, 4) and e.alphas == pytest.approx((2.5, 2.5))
    torch.testing.assert_close(e.delta(), ref.delta(), rtol=1e-5, atol=1e-6)


def test_plan_round_trip_bit_for_bit(tmp_path, task):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    snap = _snapshot(model)
    result = fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**FAST))
    assert result.edits and all(e.alphas is not None for e in result.edits)
    edited = _snapshot(model)
    editor.export_plan().save(tmp_path / "plan")
    data = json.loads((tmp_path / "plan" / PLAN_JSON).read_text())
    assert data["schema_version"] == 2 and "alphas" in data["edits"][0]
    editor.reset()
    assert _same(model, snap)
    plan = EditPlan.load(tmp_path / "plan")
    assert [e.alphas for e in plan.edits] == [e.alphas for e in result.edits]
    again = ChannelEditor.from_plan(model, tmp_path / "plan")
    assert _same(model, edited)
    assert "alpha" in again.model_card().text or True
    again.reset()
    assert _same(model, snap)


def test_v1_plan_still_loads(tmp_path):
    model = make_model("gpt2")
    editor = ChannelEditor(model)
    editor.scale_component(1, 0, "ov", 2, 0.5)
    editor.export_plan().save(tmp_path)
    data = json.loads((tmp_path / PLAN_JSON).read_text())
    data["schema_version"] = 1
    for e in data["edits"]:
        e.pop("alphas", None)
    (tmp_path / PLAN_JSON).write_text(json.dumps(data))
    plan = EditPlan.load(tmp_path)
    assert plan.edits[0].alphas is None and plan.edits[0].scales == (0.5,)


def test_fit_is_deterministic_and_within_budget(task):
    model, tok, ds = task
    snap = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    outs = []
    for _ in range(2):
        editor = ChannelEditor(model, tokenizer=tok)
        r = fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**FAST), test=ds["test"])
        assert r.n_components <= 6 and r.test_before is not None and r.test_after is not None
        assert {"before", "after", "note"} <= set(r.evaluation)
        assert r.trials.chosen.sum() == 1
        outs.append([(e.layer, e.head, e.components, e.alphas, e.left, e.right) for e in r.edits])
        editor.reset()
        assert _same(model, snap)
    assert [p.requires_grad for p in model.parameters()] == flags
    for a, b in zip(*outs):
        assert a[:4] == b[:4] and torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])


def test_cached_layers_are_not_run(task):
    """Training steps never run the layers below the first fitted layer: doubling the steps adds no
    call of block 0 (it runs only to fill the caches and for the full guard evaluations)."""
    model, tok, ds = task
    counts = []
    for steps in (3, 6):
        editor = ChannelEditor(model, tokenizer=tok)
        calls = {"n": 0, "top": 0}
        h0 = editor.layout.module(0, editor.layout.spec.o).register_forward_hook(lambda *a, calls=calls: calls.__setitem__("n", calls["n"] + 1))
        h2 = editor.layout.module(2, editor.layout.spec.o).register_forward_hook(lambda *a, calls=calls: calls.__setitem__("top", calls["top"] + 1))
        try:
            fit = fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"],
                           FitConfig(**{**FAST, "heads": [(2, 0), (2, 3)], "steps": steps, "refit_steps": 2}))
        finally:
            h0.remove()
            h2.remove()
        assert {e.layer for e in fit.edits} <= {2}
        editor.reset()
        counts.append((calls["n"], calls["top"]))
    assert counts[0][0] == counts[1][0]
    assert counts[1][1] > counts[0][1]  # the fitted layer itself does run every step


def test_config_round_trip():
    cfg = FitConfig(heads=[(1, 2), (3, 4)], circuits=("ov", "qk"), budget=32, guard_weights=(0.5, 2.0))
    again = FitConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(InvalidArgumentError, match="unknown FitConfig fields"):
        FitConfig.from_dict({"budgett": 3})


@pytest.mark.parametrize("make_bad, match", [
    (lambda ds: dict(train=ds["train"].select([])), "at least 2"),
    (lambda ds: dict(train=ds["train"].select([0])), "at least 2"),
    (lambda ds: dict(dev=ds["dev"].select([])), "dev split is empty"),
    (lambda ds: dict(budget=0), "budget"),
    (lambda ds: dict(heads="some"), "not a head spec"),
    (lambda ds: dict(heads=[(99, 0)]), "out of range"),
    (lambda ds: dict(circuits=("xy",)), "not one of"),
])
def test_bad_input_raises_and_leaves_model(task, make_bad, match):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    snap = _snapshot(model)
    bad = make_bad(ds)
    train, dev = bad.pop("train", ds["train"]), bad.pop("dev", ds["dev"])
    with pytest.raises(InvalidArgumentError, match=match):
        fit_edit(editor.layout, editor.log, tok, train, dev, FitConfig(**{**FAST, **bad}))
    assert _same(model, snap) and not editor.edits


def test_non_finite_loss_restores(task, monkeypatch):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    snap = _snapshot(model)
    from th_edit.edits import fit as fit_mod

    orig = fit_mod.FitProblem.candidate_logits
    monkeypatch.setattr(fit_mod.FitProblem, "candidate_logits", lambda self, c, b: orig(self, c, b) * float("nan"))
    with pytest.raises(FitError, match="non-finite"):
        fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**FAST))
    assert _same(model, snap) and not editor.edits
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored


@pytest.mark.parametrize("where", ["training", "applying"])
def test_ctrl_c_restores(task, monkeypatch, where):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    snap = _snapshot(model)
    from th_edit.edits import fit as fit_mod

    if where == "training":
        def boom(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(fit_mod, "_train", boom)
    else:
        real = editor.log.apply

        def apply(e):  # the first edit is written, then Ctrl-C: however many edits the fit chose
            real(e)
            raise KeyboardInterrupt
        monkeypatch.setattr(editor.log, "apply", apply)
    with pytest.raises(FitInterruptedError) as info:
        fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**{**FAST, "heads": [(0, 0), (1, 1), (2, 2)]}))
    assert isinstance(info.value, KeyboardInterrupt)
    assert _same(model, snap) and not editor.edits


def test_resolve_heads_all_and_list():
    editor = ChannelEditor(make_model("llama"))
    assert len(resolve_heads(editor.layout, "all")) == editor.n_layers * editor.n_heads
    assert resolve_heads(editor.layout, [(2, 1), (0, 3), (2, 1)]) == [(0, 3), (2, 1)]
    upper = resolve_heads(editor.layout, "upper")
    assert upper == [(l, h) for l in range(editor.n_layers // 2, editor.n_layers) for h in range(editor.n_heads)]


def test_guard_through_the_cache_equals_guard_loss(task):
    """FitProblem.guard runs the guard paragraphs from the fit's first layer: the same value as guard_loss
    of the model with the edit written into its weights."""
    from th_edit.edits.fit_problem import FitProblem, split_rows
    from th_edit.evaluate import guard_loss

    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    problem = FitProblem(model, editor.layout, tok, split_rows(ds["train"], "train"), split_rows(ds["dev"], "dev"), FitConfig())
    base = problem.guard(None, layer=1)
    assert base == pytest.approx(guard_loss(model, tok), rel=1e-6)
    fit = ChannelFit(editor.layout, [(1, 0), (2, 1)], ("ov",), folded=True)
    fit.theta = torch.randn(fit.theta.shape, generator=torch.Generator().manual_seed(5)) * 0.8
    assert fit.first_layer() == 1
    got = problem.guard(fit)
    for e in fit.edits():
        editor.apply_edit(e)
    try:
        assert got == pytest.approx(guard_loss(model, tok), rel=1e-5)
        assert got != pytest.approx(base, rel=1e-4)  # the edit does change it
    finally:
        editor.reset()


def test_new_templates_and_pools():
    assert len(OMITTED_TEMPLATES) >= 4 and {"toys", "hardware"} <= set(ITEM_POOLS)
    assert not set(ITEMS) & set(TOY_ITEMS) and not set(ITEMS) & set(HARDWARE_ITEMS) and not set(TOY_ITEMS) & set(HARDWARE_ITEMS)
    for template in OMITTED_TEMPLATES:
        row = laundry_list(None, lengths=[5], n_per_length=4, seed=0, template=template, items="toys")["test"][0]
        assert row["template"] == template and row["target"] in row["items"] and row["items"][0] in row["prompt"]
        # the answer is the one item not mentioned again after the list
        tail = row["prompt"].split(".", 1)[1]
        assert [w for w in row["items"] if f"the {w}" not in tail] == [row["target"]]
    with pytest.raises(InvalidArgumentError, match="pool name"):
        laundry_list(None, lengths=[3], n_per_length=4, items="nope")


def test_top_heads_ranks_heads_by_the_edit_they_hold(task):
    model, tok, ds = task
    editor = ChannelEditor(model, tokenizer=tok)
    r = fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], FitConfig(**{**FAST, "budget": 12}))
    editor.reset()
    # independent: from the applied edits' own per-component scales
    mass = {}
    for e in r.edits:
        mass[(e.layer, e.head)] = mass.get((e.layer, e.head), 0.0) + sum(abs(torch.tensor(a).log().item()) for a in e.scales)
    ranked = sorted(mass, key=lambda h: (-mass[h], h))
    for n in (1, 2, len(mass), len(mass) + 3):
        assert r.top_heads(n) == sorted(ranked[:n])
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        r.top_heads(0)
