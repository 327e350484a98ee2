"""Every script in examples/ runs on a tiny model, so they never rot."""

import pytest


def test_quickstart(tmp_path, run_example):
    out = run_example("quickstart.py", "--out", str(tmp_path / "plan"))
    assert "undo restores the logits bit for bit: True" in out
    assert (tmp_path / "plan" / "edit_plan.json").is_file()


@pytest.fixture
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def test_edit_and_save(tiny_dir, tmp_path, run_example):
    out = run_example("edit_and_save.py", str(tiny_dir), "--out", str(tmp_path / "e"))
    assert "identical logits: True" in out and (tmp_path / "e" / "README.md").is_file()


def test_find_channels(tiny_dir, tmp_path, run_example):
    out = run_example("find_channels.py", str(tiny_dir), "--out", str(tmp_path / "f"), "--n-prompts", "6")
    assert "mover heads:" in out
    assert (tmp_path / "f" / "heatmap.png").is_file() and (tmp_path / "f" / "channels.csv").is_file()


def test_push_to_hub(tiny_dir, hub, run_example):
    out = run_example("push_to_hub.py", str(tiny_dir), "alice/example-edit", "--token", hub.token)
    assert "identical logits: True" in out and ("model", "alice/example-edit-plan") in hub.repos


def test_scripted_eval_single_process(tiny_dir, tmp_path, run_example):
    out = run_example("scripted_eval.py", "--model", str(tiny_dir), "--lengths", "2", "4", "--n", "8",
                      "--out", str(tmp_path / "r.json"))
    assert "list_length" in out and (tmp_path / "r.json").is_file()


def test_positional_subspace(tiny_dir, tmp_path, run_example):
    out = run_example("positional_subspace.py", str(tiny_dir), "--out", str(tmp_path / "s"), "--n-prompts", "6",
                      "--n", "16", "--grid", "2", "--traverse-prompts", "2")
    assert "decodable" in out and (tmp_path / "s" / "traversal.png").is_file()


def test_ioi_channels(tiny_dir, run_example):
    out = run_example("ioi_channels.py", str(tiny_dir), "--n", "24", "--n-prompts", "6")
    assert "removing top inhibition channel" in out and "removing control" in out


def test_sparse_fit(tiny_dir, tmp_path, run_example):
    out = run_example("sparse_fit.py", str(tiny_dir), "--lengths", "3", "5", "--n", "16", "--wide-budget", "12",
                      "--heads", "2", "--budget", "4", "--out", str(tmp_path / "p"))
    assert "heads holding most of it:" in out and "those heads only" in out
    assert (tmp_path / "p" / "edit_plan.json").is_file()
