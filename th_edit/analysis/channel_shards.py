"""Splitting the channel map's senders over Accelerate processes and merging the parts exactly.

Under ``accelerate launch --num_processes N`` every process computes the map for one contiguous block of
senders (the rows of the big product ``V_s^T A_r``) against all receivers; the blocks are balanced by
work (a sender in layer ``l`` meets every receiver in a later layer). The parts are gathered and merged:
head ``[Ns, Nr]`` and component ``[Ns, r, Nr]`` scores are the rank blocks stacked in sender order, and
the kept pairs are the exact top ``keep_top`` of the union of every rank's own top ``keep_top`` (the
global top k is a subset of that union), in the canonical order of :func:`canonical_top`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..utils.sharding import balanced_blocks

__all__ = ["sender_blocks", "canonical_top", "merge_parts"]

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def sender_blocks(send_layers: Sequence[int], recv_layers: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` sender blocks, one per process, balanced by the number of later
    receivers of each sender (its share of the matmul work). ``send_layers`` sorted ascending."""
    recv = sorted(recv_layers)
    work = [len(recv) - _count_le(recv, layer) for layer in send_layers]
    return balanced_blocks(work, world)


def _count_le(sorted_values: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_right(sorted_values, x)


def canonical_top(share: torch.Tensor, row: torch.Tensor, col: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The ``k`` largest ``share [n]`` with their ``row, col [n]``, ordered by share descending, ties by
    ``(row, col)`` ascending: the same result however the candidates were split or ordered."""
    if len(share) == 0:
        return share, row, col
    order = torch.argsort(row * (int(col.max()) + 1) + col)
    share, row, col = share[order], row[order], col[order]
    order = torch.sort(share, descending=True, stable=True).indices[:k]
    return share[order], row[order], col[order]


def merge_parts(parts: Sequence[Part], keep_top: int) -> Part:
    """Merge per-rank ``(head [ns, Nr], component [ns, r, Nr], top_share, top_row, top_col)`` in rank
    order (``top_row`` already global) into the full map's tensors."""
    head = torch.cat([p[0] for p in parts], dim=0)
    comp = torch.cat([p[1] for p in parts], dim=0)
    share, row, col = (torch.cat([p[i] for p in parts]) for i in (2, 3, 4))
    return (head, comp, *canonical_top(share, row, col, keep_top))
