"""Every script in examples/ runs on a tiny model, so they never rot."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path / "plan")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "undo restores the logits bit for bit: True" in out
    assert (tmp_path / "plan" / "edit_plan.json").is_file()
