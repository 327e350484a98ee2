"""Several processes in tests: a script alone and under ``accelerate launch`` with 2 CPU processes (gloo), and
every rank of a split computation simulated in one process."""

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


def simulated_ranks(module, world: int, monkeypatch, run, *, same_work=None) -> list:
    """Every rank of a ``world``-process run, computed in this process, for code in ``module`` that splits its
    work with ``process_rank_and_count`` and merges it with ``gather_from_processes``: first each rank's parts
    are recorded, then each rank is rerun with its i-th gather answering every rank's i-th part. Returns what
    ``run()`` gave on each rank in the second pass. ``same_work(part, recorded)``, when given, checks that a
    rerun gathers the same part it recorded."""
    parts: dict[int, list] = {}
    results = []
    for phase in ("record", "merge"):
        for rank in range(world):
            calls = iter(range(100))

            def gather(part, n, rank=rank, calls=calls, phase=phase):
                if phase == "record":
                    parts.setdefault(rank, []).append(part)
                    return [part] * n
                i = next(calls)
                if same_work is not None:
                    same_work(part, parts[rank][i])
                return [parts[q][i] for q in range(n)]

            monkeypatch.setattr(module, "process_rank_and_count", lambda r=rank: (r, world))
            monkeypatch.setattr(module, "gather_from_processes", gather)
            result = run()
            if phase == "merge":
                results.append(result)
    monkeypatch.undo()
    return results
