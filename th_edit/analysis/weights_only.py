"""The channel map in bounded memory: sender chunks against one receiver layer at a time.

The in-memory :func:`~th_edit.analysis.channel_map.channel_map` computes the SVD of every head first
(``U, V [heads, d, d_h]`` float32 per circuit: ~86 GB for Llama-3-70B). :func:`bounded_channel_map`
gives the same map while holding only

* a chunk of senders' write directions ``V [n, d, d_h]`` (as many heads as the budget allows, at least
  one layer), computed one layer at a time;
* one receiver layer's read directions per mode (its OV and QK SVDs), recomputed for each chunk;
* the layout's cached raw layers (a :class:`~th_edit.core.checkpoint_layout.CheckpointLayout` loads each layer
  from disk when asked) and one layer's SVD working set;
* the streaming blocks of :func:`~th_edit.analysis.channel_stream.stream_mode`;

plus the result itself (head ``[Ns, Nr]`` and component ``[Ns, d_h, Nr]`` float32 scores per mode).
Every score is the same per-element computation as the in-memory map (the same SVDs, the same block
products and reductions), and the kept pairs are chosen the same way, so the two maps are equal.
Under ``accelerate launch`` the senders are split over the processes exactly as the in-memory map does
(:func:`~th_edit.analysis.channel_shards.sender_blocks`) and merged with the same exact top-k.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.circuits import MODES, receiver_side, select_heads, svd_of_heads
from ..core.layout import AttentionLayout
from ..utils.distributed import process_rank_and_count
from ..utils.progress import progress_bar
from ..utils.sharding import gather_from_processes
from .channel_map import MATMUL_DTYPES, ChannelMapConfig
from .channel_shards import canonical_top, sender_blocks
from .channel_stream import ChannelMap, ModeData, expected_abs_cosine, monte_carlo_baselines, stream_mode

__all__ = ["bounded_channel_map", "MemoryPlan", "plan_memory"]

logger = logging.getLogger(__name__)

Head = tuple[int, int]
#: float32 ``[H, d, d_h]`` stacks alive at the peak of one layer's SVD (factors, their QRs, U, V, copies)
SVD_STACKS = 10


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory limit is spent (bytes). ``chunk_heads``: senders held at once; ``block_bytes``: the
    streaming blocks' budget; ``minimum``: what one layer needs whatever the limit (cached raw layers, one
    layer's SVD, one receiver layer, one sender layer, the smallest blocks); ``bound``: the planned peak
    working memory, ``max(limit, minimum)``, not counting the result."""

    limit: int
    minimum: int
    bound: int
    chunk_heads: int
    block_bytes: int


def plan_memory(layout: AttentionLayout, memory_limit_mb: float, modes: Sequence[str]) -> MemoryPlan:
    """Split ``memory_limit_mb`` between the sender chunk and the streaming blocks (a quarter, at least
    what one receiver head needs) after the fixed parts; see :class:`MemoryPlan`."""
    H, d, r = layout.n_heads, layout.d_model, layout.d_head
    stack = H * d * r * 4
    raw = getattr(layout, "layer_nbytes", 0) * getattr(layout, "cache_layers", 0)
    recv = (2 if ("q" in modes or "k" in modes) else 0) + (1 if "v" in modes else 0)
    fixed = raw + SVD_STACKS * stack + (recv + 1) * stack  # + the result S/U of the receiver's other circuit
    limit = int(memory_limit_mb * 2**20)
    min_blocks = 6 * r * r * H + d * r * 4 * 2
    minimum = fixed + stack + min_blocks
    block_bytes = max(min_blocks, (limit - fixed) // 4)
    chunk_heads = max(H, (limit - fixed - block_bytes) // (d * r * 4))
    return MemoryPlan(limit=limit, minimum=minimum, bound=max(limit, minimum), chunk_heads=int(chunk_heads),
                      block_bytes=int(block_bytes))


class _Top:
    """The running strongest pairs of one mode: share, global row and col, signed cosine."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.parts: list[torch.Tensor] = [torch.empty(0), torch.empty(0, dtype=torch.long),
                                          torch.empty(0, dtype=torch.long), torch.empty(0)]

    def add(self, share, row, col, cos) -> None:
        self.parts = [torch.cat([a, b.cpu()]) for a, b in zip(self.parts, (share, row, col, cos))]
        if len(self.parts[0]) > 4 * self.k:
            self.parts = _select(*self.parts, self.k)


def _select(share, row, col, cos, k):
    """:func:`canonical_top` of ``(share, row, col)`` with each pair's cosine carried along."""
    if len(share) == 0:
        return [share, row, col, cos]
    key = row * (int(col.max()) + 1) + col
    share_k, row_k, col_k = canonical_top(share, row, col, k)
    key_k = row_k * (int(col.max()) + 1) + col_k
    order = torch.argsort(key)
    pos = order[torch.searchsorted(key[order], key_k)]
    return [share_k, row_k, col_k, cos[pos]]


def _chunks(senders: list[Head], chunk_heads: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` chunks of ``senders`` (sorted), cut at layer boundaries, each of at most
    ``chunk_heads`` heads (or one whole layer, whichever is larger)."""
    out, start = [], 0
    while start < len(senders):
        stop = start
        while stop < len(senders):
            layer_end = stop
            while layer_end < len(senders) and senders[layer_end][0] == senders[stop][0]:
                layer_end += 1
            if stop > start and layer_end - start > chunk_heads:
                break
            stop = layer_end
        out.append((start, stop))
        start = stop
    return out


def _sender_svd(layout, heads: list[Head], folded: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``S [n, r], V [n, d, r]`` of the senders' OV circuits, one layer at a time (U is dropped)."""
    S, V = [], []
    for layer in sorted({l for l, _ in heads}):
        res = svd_of_heads(layout, [h for h in heads if h[0] == layer], "ov", folded=folded, device=device)
        S.append(res.S)
        V.append(res.V)
        del res
    return torch.cat(S), torch.cat(V)


def bounded_channel_map(
    layout: AttentionLayout,
    config: ChannelMapConfig | None = None,
    *,
    folded: bool = True,
    senders: Sequence[Head] | None = None,
    receivers: Sequence[Head] | None = None,
    layers: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ChannelMap:
    """The channel map of :func:`~th_edit.analysis.channel_map.channel_map`, equal to it, in bounded memory.

    Memory bound: the working memory stays below ``max(memory_limit_mb, minimum)`` where ``minimum`` is one
    layer's worth (:func:`plan_memory`: the layout's cached raw layers, ~10 float32 ``[H, d, d_h]`` stacks
    for one layer's SVD, one receiver layer's read directions, one sender layer, the smallest blocks), plus
    the result: ``4 * Ns * (d_h + 1) * Nr`` bytes per mode (Llama-3-70B, all heads: 13.4 GB per mode; map
    fewer receivers or modes to shrink it). ``memory_limit_mb`` is shared by the sender chunk and the
    streaming blocks (a quarter). A smaller limit means more sender chunks, and each chunk recomputes the
    SVDs of the receiver layers after it (time grows, memory does not).
    """
    config = config or ChannelMapConfig()
    senders_l = select_heads(layout, senders, layers)
    receivers_l = select_heads(layout, receivers, layers)
    plan = plan_memory(layout, config.memory_limit_mb, config.modes)
    if plan.minimum > plan.limit:
        logger.warning("memory_limit_mb=%g is below one layer's working set; using %.0f MB", config.memory_limit_mb,
                       plan.minimum / 2**20)
    r, Nr = layout.d_head, len(receivers_l)
    rank, world = process_rank_and_count()
    blocks = sender_blocks([l for l, _ in senders_l], [l for l, _ in receivers_l], world) if world > 1 else [(0, len(senders_l))]
    lo, hi = blocks[rank]
    chunks = [(lo + a, lo + b) for a, b in _chunks(senders_l[lo:hi], plan.chunk_heads)]
    heads = {m: torch.zeros(hi - lo, Nr) for m in config.modes}
    comps = {m: torch.zeros(hi - lo, r, Nr) for m in config.modes}
    tops = {m: _Top(config.keep_top) for m in config.modes}
    sender_S = torch.zeros(hi - lo, r)
    recv_layers = sorted({l for l, _ in receivers_l})
    steps = sum(sum(1 for rl in recv_layers if rl > senders_l[a][0]) for a, _ in chunks)
    bar = progress_bar(enabled=progress and rank == 0 and steps > 0, total=steps, desc="channel map (weights only)")
    receiver_T: dict[str, torch.Tensor] = {m: torch.zeros(Nr, r) for m in config.modes}
    visited: set[int] = set()
    with bar:
        for a, b in chunks:
            S, V = _sender_svd(layout, senders_l[a:b], folded, device)
            sender_S[a - lo:b - lo] = S.cpu()
            send_w = S / S.norm(dim=1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
            send_layer = torch.tensor([l for l, _ in senders_l[a:b]], device=V.device, dtype=torch.long)
            for rl in (l for l in recv_layers if l > senders_l[a][0]):
                _receiver_layer(layout, receivers_l, rl, config, folded, V, send_w, send_layer, plan,
                                (a, lo), heads, comps, tops, receiver_T)
                visited.add(rl)
                bar.update(1)
            del S, V, send_w
    _fill_receiver_S(layout, receivers_l, config, folded, device, receiver_T, visited)
    return _assemble(layout, config, folded, senders_l, receivers_l, blocks, world, sender_S, heads, comps, tops,
                     receiver_T, plan, len(chunks))


def _receiver_layer(layout, receivers_l, rl, config, folded, V, send_w, send_layer, plan, offsets,
                    heads, comps, tops, receiver_T) -> None:
    """Stream one sender chunk against receiver layer ``rl`` for every mode; write into the outputs."""
    a, lo = offsets
    r = layout.d_head
    idx = [i for i, (l, _) in enumerate(receivers_l) if l == rl]
    rheads = [receivers_l[i] for i in idx]
    ov = svd_of_heads(layout, rheads, "ov", folded=folded, device=V.device) if "v" in config.modes else None
    qk = svd_of_heads(layout, rheads, "qk", folded=folded, device=V.device) if {"q", "k"} & set(config.modes) else None
    recv_layer = torch.full((len(idx),), rl, dtype=torch.long, device=V.device)
    idx_t = torch.tensor(idx)
    for mode in (m for m in MODES if m in config.modes):
        T, A = receiver_side(mode, ov, qk)
        receiver_T[mode][idx_t] = T.cpu()
        recv_w = T / T.norm(dim=1, keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
        h, c, tv, tr, tc = stream_mode(V, send_w, send_layer, A, recv_w, recv_layer, budget_bytes=plan.block_bytes,
                                        keep_top=config.keep_top, progress=progress_bar(total=0, desc="", enabled=False),
                                        matmul_dtype=MATMUL_DTYPES[config.matmul_dtype])
        n = V.shape[0]
        heads[mode][a - lo:a - lo + n, idx_t] = h.cpu()
        comps[mode][a - lo:a - lo + n, :, idx_t] = c.cpu()
        if len(tv):
            cos = (V[tr // r, :, tr % r] * A[tc // r, :, tc % r]).sum(-1)
            tops[mode].add(tv, tr.cpu() + a * r, idx_t[(tc // r).cpu()] * r + (tc % r).cpu(), cos)


def _fill_receiver_S(layout, receivers_l, config, folded, device, receiver_T, visited) -> None:
    """Singular values of the receivers no sender chunk reached (layers at or before this process's first
    sender): the map reports every receiver's ``receiver_S``."""
    for rl in sorted({l for l, _ in receivers_l} - visited):
        idx = torch.tensor([i for i, (l, _) in enumerate(receivers_l) if l == rl])
        rheads = [receivers_l[i] for i in idx.tolist()]
        ov = svd_of_heads(layout, rheads, "ov", folded=folded, device=device) if "v" in config.modes else None
        qk = svd_of_heads(layout, rheads, "qk", folded=folded, device=device) if {"q", "k"} & set(config.modes) else None
        for mode in config.modes:
            receiver_T[mode][idx] = receiver_side(mode, ov, qk)[0].cpu()


def _assemble(layout, config, folded, senders_l, receivers_l, blocks, world, sender_S, heads, comps, tops,
              receiver_T, plan, n_chunks) -> ChannelMap:
    """Gather the processes' parts (as the in-memory map does) and build the :class:`ChannelMap`."""
    modes: dict[str, ModeData] = {}
    for mode in config.modes:
        part = (heads[mode], comps[mode], *tops[mode].parts)
        parts = gather_from_processes(part, world) if world > 1 else [part]
        head = torch.cat([p[0] for p in parts])
        comp = torch.cat([p[1] for p in parts])
        share, row, col, cos = _select(*(torch.cat([p[i] for p in parts]) for i in range(2, 6)), config.keep_top)
        modes[mode] = ModeData(head=head, component=comp, top_share=share, top_row=row, top_col=col, top_cos=cos,
                                receiver_S=receiver_T[mode])
    if world > 1:
        sender_S = torch.cat(gather_from_processes(sender_S, world))
    d, r = layout.d_model, layout.d_head
    baselines = monte_carlo_baselines(d, r, samples=config.baseline_samples, seed=config.seed) if config.baseline_samples else {}
    baselines["pair_cosine"] = (expected_abs_cosine(d), math.sqrt(max(1.0 / d - expected_abs_cosine(d) ** 2, 0.0)))
    meta = {"processes": world, "sender_blocks": blocks, "config": config.to_dict(),
            "weights_only": {"sender_chunks": n_chunks, "chunk_heads": plan.chunk_heads, "block_bytes": plan.block_bytes,
                             "memory_bound_mb": plan.bound / 2**20}}
    return ChannelMap(n_layers=layout.n_layers, n_heads=layout.n_heads, d_model=d, d_head=r, folded=folded,
                      senders=senders_l, receivers=receivers_l, sender_S=sender_S, modes=modes, baselines=baselines,
                      meta=meta)
