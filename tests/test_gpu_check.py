"""benchmarks/gpu_check.py runs on the CPU (``--device cpu --small``) so it cannot rot: every correctness
check passes (the device is the CPU here, so it checks the code paths, not a GPU) and the throughput
section reports every measure."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_small_on_cpu(tmp_path, monkeypatch):
    import gpu_check

    monkeypatch.setenv("TH_EDIT_DISABLE_PROGRESS", "1")
    report = gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path / "check.json")])
    assert json.loads((tmp_path / "check.json").read_text())["all_correct"] is True
    checks = report["correctness"]
    assert set(checks) >= {"llama", "gpt2", "gemma3_text", "qwen2", "gpt_neox", "adapter", "fit"}
    for name, check in checks.items():
        assert check["ok"], (name, check)
    assert all(checks[a]["undo_bit_for_bit"] and checks[a]["plan_on_cpu_equal"] for a in ("llama", "gpt2"))
    assert checks["fit"]["dense_theta_rel"] < 1e-6  # CPU against CPU: the same computation
    for name, r in report["throughput"].items():
        assert r["channel_map_s"] > 0 and r["eval_speedup"] > 0 and r["fit_total_s"] > 0, name
        assert r["fit_components"] >= 1
