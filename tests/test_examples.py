"""Every script in examples/ runs on a tiny model, so they never rot."""


def test_quickstart(tmp_path, run_example):
    out = run_example("quickstart.py", "--out", str(tmp_path / "plan"))
    assert "undo restores the logits bit for bit: True" in out
    assert (tmp_path / "plan" / "edit_plan.json").is_file()
