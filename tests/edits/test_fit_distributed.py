"""fit_edit under ``accelerate launch --num_processes 2`` (gloo on CPU): each step's prompts split over the
processes, the log-scale gradients all-reduced; the fitted edit equals the single-process fit (fp32)."""

import json
from pathlib import Path

import pytest
from launching import launch_two, run_alone

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "_fit_launch.py")


def test_two_processes_fit_the_same_edit_as_one(tmp_path):
    run_alone(SCRIPT, str(tmp_path / "one.json"))
    launch_two(SCRIPT, str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["world"] == 1 and two["world"] == 2
    assert one["dense"].keys() == two["dense"].keys()
    for k in one["dense"]:
        assert two["dense"][k] == pytest.approx(one["dense"][k], rel=1e-4, abs=1e-5), k
    pick = [(c["layer"], c["head"], c["circuit"], c["component"]) for c in one["components"]]
    assert pick == [(c["layer"], c["head"], c["circuit"], c["component"]) for c in two["components"]]
    for a, b in zip(one["components"], two["components"]):
        assert b["alpha"] == pytest.approx(a["alpha"], rel=1e-4)
    assert two["dev_after"] == one["dev_after"]
    assert two["guard_after"] == pytest.approx(one["guard_after"], rel=1e-5)
