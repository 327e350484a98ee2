"""Discovery under ``accelerate launch --num_processes 2`` (gloo on CPU): the causal measurements of
find_channels and find_circuit are split over the processes and equal the single-process ones."""

import json
from pathlib import Path

import pytest
from launching import launch_two, run_alone

SCRIPT = str(Path(__file__).resolve().parent / "_discovery_launch.py")


def test_two_processes_measure_what_one_does(tmp_path):
    run_alone(SCRIPT, str(tmp_path / "one.json"))
    launch_two(SCRIPT, str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    alone = json.loads((tmp_path / "one.json.rank0").read_text())
    split = [json.loads((tmp_path / f"two.json.rank{r}").read_text()) for r in (0, 1)]
    for name in ("_inhibition_of", "_effect"):  # the measurements are shared out, not repeated
        assert split[0][name] + split[1][name] == alone[name] and 0 < split[1][name] <= split[0][name] < alone[name]
    assert one["world"] == 1 and two["world"] == 2
    assert len(one["channels"]) == len(two["channels"]) > 0
    for a, b in zip(one["channels"], two["channels"]):
        assert {k: v for k, v in a.items() if k != "inhibition_score"} == {k: v for k, v in b.items() if k != "inhibition_score"}
        assert b["inhibition_score"] == pytest.approx(a["inhibition_score"], rel=1e-4, abs=1e-6)
    c1, c2 = one["circuit"], two["circuit"]
    assert [h["layer"] * 100 + h["head"] for h in c1["heads"]] == [h["layer"] * 100 + h["head"] for h in c2["heads"]]
    assert len(c1["edges"]) == len(c2["edges"]) > 0
    for a, b in zip(c1["edges"], c2["edges"]):
        assert (a["sender"], a["receiver"], a["mode"], a["kept"]) == (b["sender"], b["receiver"], b["mode"], b["kept"])
        assert b["effect"] == pytest.approx(a["effect"], rel=1e-4, abs=1e-6)
