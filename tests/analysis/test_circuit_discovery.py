"""find_circuit on a tiny model: the walk's rules, causal effects against a plain forward pass, bad input."""

import math

import pytest
import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor, InvalidArgumentError
from th_edit.analysis.circuit_discovery import Circuit, CircuitConfig, find_circuit
from th_edit.data import laundry_list


@pytest.fixture(scope="module")
def walked():
    model, tok = laundry_model("llama", seed=11, num_hidden_layers=4)
    editor = ChannelEditor(model, tokenizer=tok)
    data = laundry_list(tok, lengths=[3, 5], n_per_length=24, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memo = {}
    found = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0, max_candidates=3,
                                min_gain=0.0, min_effect=0.0, attribution_prompts=12, measurements=memo, progress=False)
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
    grads = c.memo["attribution"]
    for e in c.edges:
        assert e.sender[0] < e.receiver[0] and e.weight_z >= cfg["z_min"] and e.mode in "qkv"
        assert e.receiver in set(c.head_list()) and e.components
        assert e.attribution == pytest.approx(float(grads[e.sender][list(e.components)].abs().sum()), rel=1e-6)
    for e in c.kept_edges():
        assert abs(e.t) >= cfg["t_min"] and e.sender in set(c.head_list())
    per_receiver = {}
    for e in c.edges:
        per_receiver.setdefault((e.receiver, e.mode), []).append(e.attribution)
    for found in per_receiver.values():  # the strongest channels by attribution, at most max_candidates
        assert len(found) <= cfg["max_candidates"] and found == sorted(found, reverse=True)
    steps = {(h.layer, h.head): h.step for h in c.heads}
    assert all(steps[h] == 0 for h in seeds)
    assert all(h.role in ("mover", "inhibition", "duplicate_token", "induction", "previous_token", "other") for h in c.heads)
    assert set(c.meta["spearman"]) == {"q", "k", "v"} and set(c.meta["spearman_attribution"]) == {"q", "k", "v"}
    assert c.meta["reason"] and c.meta["n_prompts"] == 12 and c.meta["attribution_prompts"] == 12


def test_attribution_equals_a_finite_difference_of_plain_forward_passes(walked):
    """d margin / d log-scale of OV components against central differences of the written edit."""
    from th_edit.analysis.attribution import component_attribution
    from th_edit.tasks.batching import prompt_batches

    editor, tok, data, c, _ = walked
    rows = data["train"].to_list()[12:24]
    grads = component_attribution(editor, prompt_batches(tok, rows, 4))
    assert torch.equal(grads, c.memo["attribution"])  # the attribution prompts follow the confirming ones
    eps = 1e-2
    top = torch.topk(grads.abs().flatten(), 3).indices.tolist()
    for flat in top + [0]:
        layer, rest = divmod(flat, editor.n_heads * editor.d_head)
        head, comp = divmod(rest, editor.d_head)
        ends = []
        for sign in (1, -1):
            editor.scale_component(layer, head, "ov", comp, math.exp(sign * eps))
            ends.append(_plain_margins(editor.model, tok, rows).mean())
            editor.undo()
        numeric = float(ends[0] - ends[1]) / (2 * eps)
        assert float(grads[layer, head, comp]) == pytest.approx(numeric, rel=2e-2, abs=2e-4)


def test_min_effect_keeps_only_large_effects_and_reuses_the_measurements(walked, monkeypatch):
    """A larger min_effect keeps a subset of the first step's senders (each at least min_effect times the
    seeds' summed |direct effect|); with the first walk's measurements passed in, nothing is measured again."""
    import th_edit.analysis.circuit_discovery as circuit_module

    editor, tok, data, c, _ = walked
    seeds = {tuple(h) for h in c.meta["seeds"]}
    first = {e.sender: abs(e.effect) for e in c.kept_edges() if e.receiver in seeds and e.sender not in seeds}
    effects = sorted(set(first.values()))
    assert effects, "the loose walk must add a sender in its first step"
    seeds_total = sum(abs(h.direct_effect) for h in c.heads if h.step == 0)
    fraction = effects[0] * 1.0001 / seeds_total  # the weakest added sender no longer passes
    calls = []
    monkeypatch.setattr(circuit_module, "_effect", lambda *a: calls.append(a) or (0.0, 0.0))
    monkeypatch.setattr(circuit_module, "component_attribution", lambda *a, **k: calls.append(a))
    strict = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0, max_candidates=3,
                                 min_gain=0.0, min_effect=fraction, attribution_prompts=12, max_depth=1,
                                 measurements=c.memo, progress=False)
    assert not calls
    kept = {e.sender for e in strict.kept_edges()}
    assert kept - seeds == {h for h, v in first.items() if v >= fraction * seeds_total} and kept - seeds < set(first)
    assert set(strict.head_list()) == seeds | kept


def test_model_left_bit_identical(walked):
    editor, _, _, _, before = walked
    assert not editor.edits
    assert all(torch.equal(v, before[k]) for k, v in editor.model.state_dict().items())


def _apply_test(editor, sender, components, grads, confirm: str, step: float = 0.5) -> int:
    """A sender's causal test written with plain scale_component calls: one per distinct scale, each from
    the SVD of the unedited head (made and undone, then all applied: their changes add up exactly)."""
    alphas = [0.0 if confirm == "remove" else math.exp(step if grads[sender][c] >= 0 else -step) for c in components]
    edits = []
    for alpha in sorted(set(alphas)):
        edits.append(editor.scale_component(*sender, "ov", [c for c, a in zip(components, alphas) if a == alpha], alpha))
        editor.undo()
    for edit in edits:
        editor.apply_edit(edit)
    return len(edits)


@pytest.mark.parametrize("confirm", ["scale", "remove"])
def test_causal_effects_equal_a_plain_forward_pass(walked, confirm):
    """Each sender of a step is tested once, on the union of its channels' components in that step."""
    editor, tok, data, c, _ = walked
    if confirm == "remove":
        c = editor.find_circuit(data["train"], n_prompts=12, batch_size=4, z_min=1.0, t_min=1.0, max_candidates=3,
                                min_gain=0.0, min_effect=0.0, max_depth=1, confirm="remove", attribution_prompts=12,
                                progress=False)
    rows = data["train"].to_list()[:12]
    base = _plain_margins(editor.model, tok, rows)
    assert float(base.mean()) == pytest.approx(c.meta["base_margin"], abs=1e-4)
    grads = walked[3].memo["attribution"]
    first_step = {tuple(h) for h in c.meta["seeds"]}
    senders: dict = {}
    for e in c.edges:
        if e.receiver in first_step:
            senders.setdefault(e.sender, []).append(e)
    assert senders
    for sender, edges in list(senders.items())[:4]:
        union = sorted({comp for e in edges for comp in e.components})
        n_edits = _apply_test(editor, sender, union, grads, confirm)
        diff = _plain_margins(editor.model, tok, rows) - base
        for _ in range(n_edits):
            editor.undo()
        se = float(diff.std()) / math.sqrt(len(diff))
        for e in edges:
            assert e.effect == pytest.approx(float(diff.mean()), abs=1e-4)
            assert e.t == pytest.approx(float(diff.mean()) / se, rel=1e-3, abs=1e-3)
    assert not editor.edits


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
                                 dict(modes=("x",)), dict(z_min=-1.0), dict(confirm="ablate"),
                                 dict(scale_step=0.0), dict(attribution_prompts=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InvalidArgumentError):
        CircuitConfig(**bad)


def test_a_short_dataset_is_split_between_confirming_and_ranking(walked):
    """Fewer rows than n_prompts + attribution_prompts: at most half rank; a single prompt is refused."""
    editor, tok, data, *_ = walked
    rows = data["train"].to_list()[:5]
    c = find_circuit(editor, tok, rows, batch_size=4, z_min=1e6, progress=False)
    assert (c.meta["n_prompts"], c.meta["attribution_prompts"]) == (3, 2)
    with pytest.raises(InvalidArgumentError, match="at least 2 prompts"):
        find_circuit(editor, tok, rows[:1], progress=False)


def test_items_without_distinct_first_tokens_are_refused(walked):
    editor, tok, data, *_ = walked
    row = data["train"][0]
    clash = dict(row, items=[row["items"][0]] + row["items"])  # two candidates with one first token
    clash["target"] = row["items"][0]
    with pytest.raises(InvalidArgumentError, match="distinct"):
        find_circuit(editor, tok, [clash, clash], progress=False)


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
