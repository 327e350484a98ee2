"""Accelerate process gating: which process writes, and a barrier for the others.

On machines without CUDA the processes talk over gloo (``PartialState(cpu=True)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["distributed_state", "is_main_process", "wait_for_everyone", "process_rank_and_count", "run_on_main_process",
           "all_reduce_sum"]


def distributed_state():
    """Accelerate's ``PartialState`` for this launch, or None in a single process.

    On machines without CUDA the processes talk over gloo (``PartialState(cpu=True)``), so
    ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``) also splits work over CPU processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def is_main_process() -> bool:
    """True outside distributed runs, and on the main process of an Accelerate launch."""
    state = distributed_state()
    return state is None or state.is_main_process


def wait_for_everyone() -> None:
    """Barrier across Accelerate processes (no-op in a single process)."""
    state = distributed_state()
    if state is not None:
        state.wait_for_everyone()


def process_rank_and_count() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside distributed runs)."""
    state = distributed_state()
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def run_on_main_process(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process only; every process then returns its result, or raises its error.

    All processes must call this (it is a collective, like a barrier). Outside distributed runs it is just
    ``fn()``. The result travels pickled; an error that does not pickle arrives as a
    :class:`~th_edit.errors.ThEditError` carrying its message, so no process is left waiting at a barrier
    when the main process fails."""
    rank, world = process_rank_and_count()
    if world <= 1:
        return fn()
    from .sharding import gather_from_processes

    outcome = payload = None
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - told to the other processes, then re-raised here
            outcome = ("error", exc)
        payload = _picklable(outcome)
    shared = gather_from_processes(payload, world)[0]
    kind, value = outcome if rank == 0 else shared
    if kind == "error":
        raise value
    return value


def _picklable(outcome: tuple[str, Any]) -> tuple[str, Any]:
    import pickle

    from ..errors import ThEditError

    kind, value = outcome
    try:
        pickle.loads(pickle.dumps(value))
        return outcome
    except Exception:  # noqa: BLE001 - anything that does not survive the trip
        if kind == "error":
            return kind, ThEditError(f"the main process failed: {type(value).__name__}: {value}")
        return kind, None
def all_reduce_sum(tensor):
    """Sum ``tensor`` over the Accelerate processes, in place, and return it (unchanged in a single
    process). Every process must call it with a tensor of the same shape and dtype (gloo on CPU, NCCL on
    GPU: then the tensor must be on this process's GPU)."""
    state = distributed_state()
    if state is None or state.num_processes <= 1:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
