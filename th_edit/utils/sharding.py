"""Sharing work out over Accelerate processes: contiguous balanced blocks, and gathering the parts back.

Used by the channel map (senders split over ``accelerate launch --num_processes N``); the process count
and rank come from :func:`th_edit.utils.distributed.process_rank_and_count`, the gather is Accelerate's
``gather_object`` (``torch.distributed.all_gather_object`` underneath: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import InvalidArgumentError, ThEditError

__all__ = ["balanced_blocks", "gather_from_processes"]


def balanced_blocks(work: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Cut ``range(len(work))`` into ``parts`` contiguous ``(start, stop)`` blocks of similar total work.

    Block ``p`` ends at the first index whose cumulative work reaches ``(p + 1) / parts`` of the total,
    so the cut depends only on ``work`` and ``parts`` (every process computes the same blocks). Blocks may
    be empty (more parts than items, or zero work).

    >>> balanced_blocks([3, 3, 1, 1, 1, 1], 2)
    [(0, 2), (2, 6)]
    >>> balanced_blocks([1, 1], 3)
    [(0, 1), (1, 1), (1, 2)]
    """
    if parts < 1:
        raise InvalidArgumentError(f"parts={parts} must be at least 1.")
    n = len(work)
    if any(w < 0 for w in work):
        raise InvalidArgumentError("work per item must be non-negative.")
    total = float(sum(work))
    if total <= 0:  # no work to balance: cut by count
        cuts = [round(n * (p + 1) / parts) for p in range(parts)]
    else:
        cuts, acc, i = [], 0.0, 0
        for p in range(parts - 1):
            goal = total * (p + 1) / parts
            while i < n and acc + work[i] / 2 <= goal:  # an item goes where most of its work lies
                acc += work[i]
                i += 1
            cuts.append(i)
        cuts.append(n)
    starts = [0] + cuts[:-1]
    return [(s, max(s, c)) for s, c in zip(starts, cuts)]


def gather_from_processes(part: Any, world: int) -> list[Any]:
    """Every process's ``part`` in rank order, on every process (``[part]`` when ``world`` is 1).

    ``part`` must be picklable; tensors should be on the CPU (they travel pickled).
    """
    if world <= 1:
        return [part]
    from accelerate.utils import gather_object

    gathered = gather_object([part])
    if len(gathered) != world:
        raise ThEditError(f"gathered {len(gathered)} parts from {world} processes; all processes must call this.")
    return gathered
