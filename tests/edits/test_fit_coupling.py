"""Couplings between a head's own singular components (FitConfig.coupling_band, issue 26) and the
learning-rate schedule: the hooks equal the written edit, the written edit equals the dense circuit change
``U_sel diag(S) M V_sel^T``, plans (schema 3) and adapters carry it exactly, bad settings are refused."""

import json
import warnings

import pytest
import torch
from tiny_models import input_ids, laundry_model, make_model

from th_edit import ChannelEditor, EditPlan, PlanMismatchError
from th_edit.core.circuits import circuit_factors, svd
from th_edit.data import laundry_list
from th_edit.edits.fit import ChannelFit, FitConfig, fit_edit
from th_edit.edits.plan import PLAN_JSON
from th_edit.edits.scale import make_edit
from th_edit.errors import InvalidArgumentError

HEADS = [(0, 1), (1, 0), (2, 2)]


def _coupled_fit(editor, circuits, seed=0):
    fit = ChannelFit(editor.layout, HEADS, circuits, folded=True)
    g = torch.Generator().manual_seed(seed)
    fit.theta = torch.randn(fit.theta.shape, generator=g) * 0.5
    fit.keep_top(12)
    fit.enable_couplings(2)
    fit.coupling = torch.randn(fit.coupling.shape, generator=g) * 0.4
    return fit


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("circuits", [("ov",), ("qk",)])
def test_coupled_hooks_equal_the_written_edit(arch, circuits):
    model = make_model(arch, seed=1)
    editor = ChannelEditor(model)
    fit = _coupled_fit(editor, circuits)
    assert fit.n_couplings > 0
    ids = input_ids(batch=2, seq=9, seed=2)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with fit.hooks():
            hooked = model(input_ids=ids).logits
        uncoupled = fit.copy()
        uncoupled.coupling = torch.zeros_like(fit.coupling)
        with uncoupled.hooks():
            scaled_only = model(input_ids=ids).logits
    assert (hooked - scaled_only).abs().max() > 1e-3  # the couplings change the output
    edits = fit.edits()
    assert sum(len(e.couplings or ()) for e in edits) == fit.n_couplings
    for e in edits:
        editor.apply_edit(e)
    with torch.no_grad():
        written = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, written, rtol=1e-4, atol=1e-4)
    assert (written - base).abs().max() > 1e-3


@pytest.mark.parametrize("circuit", ["ov", "qk"])
def test_coupled_edit_is_the_dense_circuit_change(circuit):
    """Independent check in dense linear algebra: the circuit read back from the edited weights minus the
    original circuit equals ``U_sel diag(S) M V_sel^T`` (M: alpha - 1 on the diagonal, g off it)."""
    editor = ChannelEditor(make_model("llama", seed=3))
    layer, head, comps, alphas = 1, 2, [0, 1, 3], [1.5, 0.7, 2.0]
    couplings = [(0, 1, 0.3), (3, 1, -0.6), (1, 0, 0.2)]
    A0, B0 = circuit_factors(editor.layout, layer, head, circuit)
    before = (A0.double() @ B0.double().T)
    U, S, V = svd(editor.layout, layer, head, circuit)
    M = torch.diag(torch.tensor(alphas, dtype=torch.float64) - 1)
    pos = {c: i for i, c in enumerate(comps)}
    for a, b, g in couplings:
        M[pos[a], pos[b]] += g
    want = U[:, comps].double() @ torch.diag(S[comps].double()) @ M @ V[:, comps].double().T
    edit = make_edit(editor.layout, layer, head, circuit, comps, 1.0, alphas=alphas, couplings=couplings)
    editor.apply_edit(edit)
    A1, B1 = circuit_factors(editor.layout, layer, head, circuit)
    got = A1.double() @ B1.double().T - before
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert torch.linalg.matrix_rank(edit.delta()) <= len(comps)


def test_plan_with_couplings_round_trips_and_tampering_is_refused(tmp_path):
    model = make_model("llama", seed=1)
    editor = ChannelEditor(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    for e in _coupled_fit(editor, ("ov", "qk")).edits():
        editor.apply_edit(e)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    editor.export_plan().save(tmp_path / "plan")
    data = json.loads((tmp_path / "plan" / PLAN_JSON).read_text())
    assert data["schema_version"] == 3 and any("couplings" in e for e in data["edits"])
    editor.reset()
    again = ChannelEditor.from_plan(model, tmp_path / "plan")  # verified against the recomputed SVD
    assert all(torch.equal(v, edited[k]) for k, v in model.state_dict().items())
    assert [e.couplings for e in again.edits] == [e.couplings for e in EditPlan.load(tmp_path / "plan").edits]
    again.reset()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    e = next(e for e in data["edits"] if e.get("couplings"))
    e["couplings"][0][2] += 0.5  # a changed coupling no longer matches the factors
    (tmp_path / "plan" / PLAN_JSON).write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError, match="do not match"):
        ChannelEditor.from_plan(make_model("llama", seed=1), tmp_path / "plan")


def test_coupled_edit_exports_as_an_exact_lora_adapter(tmp_path):
    from peft import PeftModel

    model = make_model("llama", seed=1)
    editor = ChannelEditor(model)
    for e in _coupled_fit(editor, ("ov", "qk")).edits():
        editor.apply_edit(e)
    editor.save_adapter(tmp_path / "adapter")
    ids = input_ids()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(make_model("llama", seed=1), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fit_with_couplings_is_deterministic_and_exported(tmp_path):
    model, tok = laundry_model("llama", seed=2)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=16, seed=3)
    cfg = FitConfig(budget=6, steps=3, refit_steps=3, k_fractions=(1.0,), batch_size=4, progress=False,
                    coupling_band=64, lr_schedule="cosine")  # any two kept components of a head may couple
    runs = []
    for _ in range(2):
        editor = ChannelEditor(model, tokenizer=tok)
        r = fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], cfg)
        assert r.n_components <= 6 and r.n_couplings > 0 and r.n_numbers == r.n_components + r.n_couplings
        assert r.summary()["n_couplings"] == r.n_couplings and "couplings" in r.trials
        runs.append([(e.couplings, e.left) for e in r.edits])
        editor.reset()
    assert [c for c, _ in runs[0]] == [c for c, _ in runs[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*runs))


@pytest.mark.parametrize("bad, field", [
    (dict(coupling_band=-1), "coupling_band"),
    (dict(coupling_band=1.5), "coupling_band"),
    (dict(coupling_band=2, refit_steps=0), "coupling_band"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(memory_limit_mb=0.0), "memory_limit_mb"),
])
def test_bad_coupling_and_schedule_settings_are_refused(bad, field):
    with pytest.raises(InvalidArgumentError, match=field):
        FitConfig(**bad)


def test_couplings_over_the_memory_limit_are_refused_before_fitting():
    model, tok = laundry_model("llama", seed=2)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=16, seed=3)
    editor = ChannelEditor(model, tokenizer=tok)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FitConfig(budget=6, steps=2, refit_steps=2, progress=False, coupling_band=1, memory_limit_mb=1e-6)
    with pytest.raises(InvalidArgumentError, match="memory_limit_mb"):
        fit_edit(editor.layout, editor.log, tok, ds["train"], ds["dev"], cfg)
    assert not editor.edits and all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_cosine_schedule_decays_to_a_twentieth():
    from th_edit.edits.fit import _schedule

    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = _schedule(opt, "cosine", 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    s2 = _schedule(const, "constant", 10)
    for _ in range(5):
        const.step()
        s2.step()
    assert const.param_groups[0]["lr"] == pytest.approx(0.1)
