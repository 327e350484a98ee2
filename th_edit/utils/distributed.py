"""Accelerate process gating: which process writes, and a barrier for the others.

On machines without CUDA the processes talk over gloo (``PartialState(cpu=True)``).
"""

from __future__ import annotations

import os

__all__ = ["distributed_state", "is_main_process", "wait_for_everyone", "process_rank_and_count", "all_reduce_sum"]


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
