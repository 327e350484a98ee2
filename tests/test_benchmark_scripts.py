"""The science scripts of benchmarks/ run end to end on a tiny model (their real runs take an hour on the
bundled models): every condition is recorded with per-prompt outcomes, the LoRA anchor is evaluated as
trained, the circuit's threshold is chosen on dev, and options are chosen on a split disjoint from test."""

import json
import sys
from pathlib import Path

import pytest
from tiny_models import laundry_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import fit_options
    import fit_science

    def load(name, **_):
        return laundry_model("llama", seed=5, every_pool=True, num_hidden_layers=3)

    for module in (fit_science, fit_options):
        monkeypatch.setattr(module, "load_model", load)
    monkeypatch.setitem(fit_science.SETTINGS, "tiny", dict(weak=(3, 4), n_train=16))
    yield fit_science, fit_options
    for name in ("fit_science", "fit_options"):
        sys.modules.pop(name, None)


def _args(fit_science, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["fit_science.py", *argv])
    return fit_science._parse_args()


def test_fit_science_runs_every_condition_on_a_tiny_model(scripts, monkeypatch, tmp_path):
    fit_science, _ = scripts
    out = tmp_path / "science.json"
    args = _args(fit_science, monkeypatch, "--model", "tiny", "--out", str(out), "--n-test", "6", "--steps", "2",
                 "--refit-steps", "2", "--lora-steps", "2", "--train", "varied", "--circuit-grid", "0.5,0.0",
                 "--fit", json.dumps({"coupling_band": 4, "lr_schedule": "cosine"}),
                 "--only", "a_dense_all,b_budget_256,e_transfer_256,f_lora_r8,c_discovered_32,h_fit_heads_32,"
                           "i_circuit_32,i_random_32_seed0")
    run = fit_science.Science(args)
    run.dense_all_fit()
    run.budget_fit(256)
    run.transfer_256()
    run.find_heads()
    run.discovered_vs_random_32()
    run.lora_r8()
    run.fit_heads_32()
    run.circuit_32()
    run.circuit_random_32()
    run.finish()
    res = json.loads(out.read_text())
    conds = res["conditions"]
    assert {"b_budget_256", "e_transfer_256", "f_lora_r8"} <= set(conds)
    for name, row in conds.items():
        assert len(row["test_outcomes"]) == res["data"]["test"], name
        assert row["test"]["all"]["n"] == res["data"]["test"] and "test_margin_change" in row
    assert res["fit_options"]["fit"] == {"coupling_band": 4, "lr_schedule": "cosine"}
    assert res["data"]["train"] == 3 * 16  # the varied streams added as many prompts again, twice
    sel = res.get("circuit_selection")
    if sel is not None:  # a random tiny model may have no head above the thresholds
        assert [t["min_effect"] for t in sel["tried"]] == [0.5, 0.0]
        if "i_circuit_32" in conds:
            assert res["circuit"]["min_effect"] in (0.5, 0.0)
            circuit = {tuple(h) for h in res["circuit"]["heads"]}
            control = {tuple(h) for h in conds["i_random_32_seed0"]["heads"]}
            assert control and len(control) <= len(circuit) and not control & circuit
    # a second run on the same file and other prompts is refused instead of mixing prompt sets
    args2 = _args(fit_science, monkeypatch, "--model", "tiny", "--out", str(out), "--n-test", "7")
    with pytest.raises(SystemExit, match="other test prompts"):
        fit_science.Science(args2)


def test_fit_science_ioi_runs_the_head_set_conditions(scripts, monkeypatch, tmp_path):
    """--task ioi: IOI is the fitted task; the budget-256 plan gives (h), and the circuit and its random
    controls are fitted and read on IOI's own test split."""
    fit_science, _ = scripts
    out = tmp_path / "ioi.json"
    args = _args(fit_science, monkeypatch, "--model", "tiny", "--task", "ioi", "--out", str(out), "--n-test", "4",
                 "--steps", "2", "--refit-steps", "2", "--circuit-grid", "0.0",
                 "--only", "b_budget_256,c_discovered_32,h_fit_heads_32,i_circuit_32,i_random_32_seed0,"
                           "h_fit_heads_32_circuit_size")
    run = fit_science.Science(args)
    run.dense_all_fit()
    run.budget_fit(256)
    run.find_heads()
    run.discovered_vs_random_32()
    run.fit_heads_32()
    run.circuit_32()
    run.circuit_random_32()
    run.fit_heads_circuit_size()
    run.finish()
    res = json.loads(out.read_text())
    assert res["data"]["task"] == "ioi" and res["data"]["test"] == 12
    conds = res["conditions"]
    assert {"b_budget_256", "c_discovered_32", "h_fit_heads_32"} <= set(conds)
    if "i_circuit_32" in conds:  # a random tiny model may have no head above the thresholds
        mass, _ = fit_science.plan_head_mass(out.with_suffix(".plan256"))
        top = sorted(sorted(mass, key=lambda h: -mass[h])[:len(res["circuit"]["heads"])])
        assert [tuple(h) for h in conds["h_fit_heads_32_circuit_size"]["heads"]] == top
    for name, row in conds.items():
        assert len(row["test_outcomes"]) == 12 and set(row) >= {"test", "test_margin_change"}, name


def test_fit_options_scores_on_a_split_disjoint_from_test(scripts, monkeypatch, tmp_path):
    fit_science, fit_options = scripts
    monkeypatch.setitem(fit_options.VARIANTS, "tiny_a", (dict(steps=2, refit_steps=2), "omitted"))
    monkeypatch.setitem(fit_options.VARIANTS, "tiny_b", (dict(steps=2, refit_steps=2, coupling_band=4), "varied"))
    out = tmp_path / "options.json"
    monkeypatch.setattr(sys, "argv", ["fit_options.py", "--model", "tiny", "--out", str(out), "--only",
                                      "tiny_a,tiny_b", "--budgets", "4,8", "--n-select", "4"])
    fit_options.main()
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"tiny_a@4", "tiny_a@8", "tiny_b@4", "tiny_b@8"}
    for v in res["variants"].values():
        assert len(v["select_outcomes"]) == res["select_n"] == 8 and v["n_components"] <= v["budget"]
