"""Running a test script in one process and under ``accelerate launch`` with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched test script: no progress bars, one thread per process, the project and
    ``tests/`` importable, plus ``extra``."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "TH_EDIT_DISABLE_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_alone(script: str | Path, *args: str, env: dict[str, str] | None = None) -> None:
    """``python script args`` in one process; raises if it fails."""
    subprocess.run([sys.executable, str(script), *args], check=True, env=env or launch_env(), capture_output=True)


def launch_two(script: str | Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """``accelerate launch --num_processes 2 script args`` on the CPU; asserts that it succeeded (with the
    end of its stderr)."""
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), *args],
        env=env or launch_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
