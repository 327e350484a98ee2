"""find_circuit on a tiny model: the walk's rules, causal effects against a plain forward pass, bad input."""

import math

import pytest
import torch

from th_edit import ChannelEditor, InvalidArgumentError
from th_edit.analysis.circuit import Circuit, CircuitConfig, find_circuit
from th_edit.data import laundry_list
from tiny_models import laundry_model


@pytest.fixture(scope="module")
def walked():
    model, tok = laundry_model("llama", seed=11, num_hidden_layers=4)
    editor = ChannelEditor(model, tokenizer=tok)
    data = laundry_list(tok, lengths=[3, 5], n_per_length=24, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memo = {}
    found = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0, max_candidates=3,
                                min_gain=0.0, min_effect=0.0, measurements=memo, progress=False)
    found.memo = memo
    return editor, tok, data, found, before


def _plain_margins(model, tok, rows):
    """Answer logit minus the mean of the other items' logits, one prompt at a time, full logits."""
    out = []
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            cands = [tok(" " + w if not w.startswith(" ") else w)["input_ids"][0] for w in r["items"]]
            vals = logits[torch.tensor(cands)]
            t = r["items"].index(r["target"])
            out.append(float(vals[t] - torch.cat([vals[:t], vals[t + 1:]]).mean()))
    return torch.tensor(out)


def test_walk_follows_its_rules(walked):
    editor, _, _, c, _ = walked
    cfg = c.meta["config"]
    seeds = {tuple(h) for h in c.meta["seeds"]}
    assert seeds and seeds <= set(c.head_list())
    assert c.edges, "a tiny model with loose thresholds must measure some candidates"
    for e in c.edges:
        assert e.sender[0] < e.receiver[0] and e.weight_z >= cfg["z_min"] and e.mode in "qkv"
        assert e.receiver in set(c.head_list())
    for e in c.kept_edges():
        assert abs(e.t) >= cfg["t_min"] and (e.sender[0], e.sender[1]) in set(c.head_list())
    steps = {(h.layer, h.head): h.step for h in c.heads}
    assert all(steps[h] == 0 for h in seeds)
    assert all(h.role in ("mover", "inhibition", "duplicate_token", "induction", "previous_token", "other") for h in c.heads)
    assert set(c.meta["spearman"]) == {"q", "k", "v"} and c.meta["reason"]


def test_min_effect_keeps_only_large_effects_and_reuses_the_measurements(walked, monkeypatch):
    """A larger min_effect keeps a subset of the edges (each at least min_effect times the seeds' summed
    |direct effect|); with the first walk's measurements passed in, nothing is measured again."""
    import th_edit.analysis.circuit as circuit_module

    editor, tok, data, c, _ = walked
    effects = sorted(abs(e.effect) for e in c.kept_edges())
    assert len(effects) >= 2, "the loose walk must keep several edges"
    seeds_total = sum(abs(h.direct_effect) for h in c.heads if h.step == 0)
    fraction = (effects[len(effects) // 2] / seeds_total) * 1.0001  # about half the kept effects fall below it
    calls = []
    monkeypatch.setattr(circuit_module, "_effect", lambda *a: calls.append(a) or (0.0, 0.0))
    strict = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0, max_candidates=3,
                                 min_gain=0.0, min_effect=fraction, measurements=c.memo, progress=False)
    assert not calls
    assert strict.kept_edges() and len(strict.kept_edges()) < len(c.kept_edges())
    assert all(abs(e.effect) >= fraction * seeds_total for e in strict.kept_edges())
    assert set(strict.head_list()) <= set(c.head_list())


def test_model_left_bit_identical(walked):
    editor, _, _, _, before = walked
    assert not editor.edits
    assert all(torch.equal(v, before[k]) for k, v in editor.model.state_dict().items())


def test_causal_effects_equal_a_plain_forward_pass(walked):
    editor, tok, data, c, _ = walked
    rows = data["train"].to_list()[:12]
    base = _plain_margins(editor.model, tok, rows)
    assert float(base.mean()) == pytest.approx(c.meta["base_margin"], abs=1e-4)
    for e in c.edges[:4]:
        editor.scale_component(*e.sender[:2], "ov", e.sender[2], 0.0)
        diff = _plain_margins(editor.model, tok, rows) - base
        editor.undo()
        assert e.effect == pytest.approx(float(diff.mean()), abs=1e-4)
        se = float(diff.std()) / math.sqrt(len(diff))
        assert e.t == pytest.approx(float(diff.mean()) / se, rel=1e-3, abs=1e-3)


def test_json_round_trip(walked, tmp_path):
    *_, c, _ = walked
    back = Circuit.load(c.save(tmp_path / "circuit.json"))
    assert back.head_list() == c.head_list() and back.edges == c.edges and back.heads == c.heads


def test_thresholds_that_select_nothing_give_an_empty_walk_with_the_reason(walked):
    editor, tok, data, *_ = walked
    c = find_circuit(editor, tok, data["train"], n_prompts=8, batch_size=4, z_min=1e6, progress=False)
    assert not c.edges and "z_min" in c.meta["reason"]
    assert c.head_list() == sorted(tuple(h) for h in c.meta["seeds"])  # only the seed heads, never all heads


@pytest.mark.parametrize("bad", [dict(t_min=float("nan")), dict(direct_fraction=0.0), dict(max_depth=0),
                                 dict(modes=("x",)), dict(z_min=-1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InvalidArgumentError):
        CircuitConfig(**bad)


def test_items_without_distinct_first_tokens_are_refused(walked):
    editor, tok, data, *_ = walked
    row = data["train"][0]
    clash = dict(row, items=[row["items"][0]] + row["items"])  # two candidates with one first token
    clash["target"] = row["items"][0]
    with pytest.raises(InvalidArgumentError, match="distinct"):
        find_circuit(editor, tok, [clash], progress=False)


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_circuit_drawn_as_png_and_svg(walked, tmp_path, suffix):
    from th_edit.app.circuit_plot import plot_circuit

    editor, *_, c, _ = walked
    path = plot_circuit(c, tmp_path / f"circuit.{suffix}", n_heads=editor.n_heads)
    data = open(path, "rb").read()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data[:2000]


def test_fit_on_the_circuit_fits_exactly_its_heads(walked, tmp_path):
    editor, tok, data, c, _ = walked
    result = editor.fit_edit(data["train"], data["dev"], heads="circuit", findings=c, budget=4, steps=2, refit_steps=1,
                             k_fractions=(1.0,), batch_size=4, progress=False)
    try:
        assert result.heads == c.head_list()
        assert {(e.layer, e.head) for e in editor.edits} <= set(c.head_list())
        assert editor.export_plan().provenance["fit_config"]["heads"] == "circuit"
        editor.save_plan(tmp_path / "plan")  # the circuit travels with the plan, as JSON
        from th_edit import EditPlan

        saved = Circuit.from_dict(EditPlan.load(tmp_path / "plan").provenance["circuit"])
        assert saved.head_list() == c.head_list() and len(saved.edges) == len(c.edges)
    finally:
        editor.reset()


def test_an_empty_circuit_is_refused_with_its_reason(walked):
    editor, tok, data, *_ = walked
    empty = Circuit(heads=[], edges=[], meta={"reason": "no head has a non-zero direct effect"})
    with pytest.raises(InvalidArgumentError, match="non-zero direct effect"):
        editor.fit_edit(data["train"], data["dev"], heads="circuit", findings=empty, budget=4, progress=False)


def test_discovered_means_the_circuit_and_roles_the_three_role_reading(walked, monkeypatch):
    """heads='discovered' fits the circuit's heads (find_circuit on train when no findings are given);
    heads='roles' keeps the paper's three-role heads of find_channels reachable."""
    from th_edit.analysis.discovery import ChannelFindings

    editor, tok, data, c, _ = walked
    assert editor.resolve_heads("discovered", findings=c) == c.head_list() == editor.resolve_heads("circuit", findings=c)
    with pytest.raises(InvalidArgumentError, match="roles"):
        editor.resolve_heads("roles", findings=c)  # a circuit is not the three-role findings
    calls = []
    monkeypatch.setattr(type(editor), "find_circuit", lambda self, train, **kw: calls.append("circuit") or c)
    roles = ChannelFindings.__new__(ChannelFindings)
    roles.inhibition_heads = [(1, 0)]
    monkeypatch.setattr(ChannelFindings, "heads", lambda self: [(1, 0)])
    monkeypatch.setattr(ChannelFindings, "evidence", lambda self, *a, **k: [])
    monkeypatch.setattr(type(editor), "find_channels", lambda self, train, **kw: calls.append("roles") or roles)
    fast = dict(budget=4, steps=2, refit_steps=1, batch_size=4, progress=False)
    result = editor.fit_edit(data["train"], data["dev"], heads="discovered", **fast)
    try:
        assert calls == ["circuit"] and result.heads == c.head_list()
        assert editor.export_plan().provenance["circuit"]["heads"]
    finally:
        editor.reset()
    try:
        assert editor.fit_edit(data["train"], data["dev"], heads="roles", **fast).heads == [(1, 0)]
        assert calls == ["circuit", "roles"]
    finally:
        editor.reset()
