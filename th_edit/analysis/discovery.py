"""Channel discovery and edit search: the paper's pipeline, from data-based roles and the channel map.

:func:`find_channels`
    1. **Mover heads**: the heads with the highest :func:`th_edit.analysis.roles.mover_scores` on the prompts.
    2. **Inhibition channels**: sender OV components of earlier heads ranked by their Q-composition
       component score into each mover head (weight-based, with the random-matrix baseline), then
       measured causally with :func:`th_edit.analysis.roles.inhibition_score` (component removed). A few
       lower-ranked components (seeded sample) are measured too, so that the rank correlation between
       the weight-based and the causal ranking is not computed on the top of the list alone.
    3. **Duplicate-detection channels**: OV components of the strongest duplicate-token and
       previous-token heads, ranked by V- and K-composition into the top inhibition heads; causal
       evidence is their inhibition score on the mover heads (the downstream effect).

The channels' heads (:meth:`ChannelFindings.heads`) are what ``fit_edit(heads="roles")`` fits; the
grid search over single components lives in :mod:`th_edit.analysis.edit_search`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from ..errors import InvalidArgumentError
from ..tasks.batching import prompt_batches
from ..utils.distributed import process_rank_and_count
from ..utils.progress import progress_bar
from ..utils.settings import Settings
from ..utils.sharding import gather_from_processes
from .protocol import HeadEditor
from .roles import inhibition_score, mover_scores, prompt_cache, receiver_gap, sequence_roles

__all__ = ["DiscoveryConfig", "ChannelFindings", "find_channels"]

logger = logging.getLogger(__name__)

_CHANNEL_COLUMNS = ["kind", "mode", "sender_layer", "sender_head", "sender_component", "receiver_layer",
                    "receiver_head", "score", "baseline", "score_over_baseline", "inhibition_score", "control"]


@dataclass
class ChannelFindings:
    """What :func:`find_channels` found. ``channels`` has one row per (sender component, receiver head):
    kind (``inhibition`` or ``duplicate``), mode, sender layer/head/component, receiver layer/head,
    weight-based score, its baseline and ratio, the causal inhibition score, and ``control`` (True for the
    randomly sampled lower-ranked components measured only for the rank correlation)."""

    movers: pd.DataFrame
    channels: pd.DataFrame
    roles: dict[str, torch.Tensor]
    rank_correlation: dict[str, float]
    inhibition_heads: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def top(self, kind: str = "inhibition", k: int = 10, by: str = "inhibition_score") -> pd.DataFrame:
        """The ``k`` strongest non-control channels of ``kind``, ranked by ``by``."""
        rows = self.channels[(self.channels.kind == kind) & ~self.channels.control]
        return rows.sort_values(by, ascending=False).head(k).reset_index(drop=True)

    def evidence(self, k: int = 5) -> list[dict[str, Any]]:
        """Rows for the model card (see :mod:`th_edit.sharing.cards`)."""
        return [
            {"sender": f"{r.sender_layer}.{r.sender_head}[{r.sender_component}]",
             "receiver": f"{r.receiver_layer}.{r.receiver_head}", "mode": r.mode, "score": float(r.score),
             "baseline": float(r.baseline), "cosine": None}
            for r in self.top("inhibition", k).itertuples()
        ]

    def heads(self) -> list[tuple[int, int]]:
        """The discovered heads, sorted: the movers, the inhibition heads and the duplicate-detection senders."""
        dup = self.channels[(self.channels.kind == "duplicate") & ~self.channels.control]
        found = set(map(tuple, self.meta.get("movers", []))) | set(self.inhibition_heads)
        found |= {(int(r.sender_layer), int(r.sender_head)) for r in dup.itertuples()}
        return sorted(found)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = pd.Series(list(a)).rank(), pd.Series(list(b)).rank()  # average ranks for ties (no scipy)
    return float(ra.corr(rb))


def _component_rows(cmap, mode: str, senders, receivers, kind: str) -> list[dict[str, Any]]:
    mean, _ = cmap.baselines["component"]
    rows = []
    for r in receivers:
        for s in senders:
            if s[0] >= r[0]:
                continue
            scores = cmap.component_scores(mode, s, r)
            for c, v in enumerate(scores.tolist()):
                rows.append({"kind": kind, "mode": mode, "sender_layer": s[0], "sender_head": s[1], "sender_component": c,
                             "receiver_layer": r[0], "receiver_head": r[1], "score": v, "baseline": mean,
                             "score_over_baseline": v / mean if mean else float("nan")})
    return rows


@dataclass
class DiscoveryConfig(Settings):
    """Settings of :func:`find_channels` (recorded in ``ChannelFindings.meta["config"]``).

    Attributes:
        n_movers: mover heads to explain.
        n_inhibition: top weight-ranked inhibition components measured causally.
        n_control: extra lower-ranked components (seeded sample) measured for the rank correlation.
        n_duplicate: duplicate-detection components measured.
        n_inhibition_heads: inhibition heads kept (the receivers of the duplicate-detection search).
        n_prompts: prompts used for the data-based scores.
        batch_size: prompts per forward pass.
        seed: seed of the role sequences, the control sample and the baselines.
    """

    n_movers: int = field(default=3, metadata={"help": "mover heads to explain"})
    n_inhibition: int = field(default=12, metadata={"help": "inhibition components measured causally"})
    n_control: int = field(default=8, metadata={"help": "lower-ranked control components measured"})
    n_duplicate: int = field(default=6, metadata={"help": "duplicate-detection components measured"})
    n_inhibition_heads: int = field(default=3, metadata={"help": "inhibition heads kept"})
    n_prompts: int = field(default=32, metadata={"help": "prompts for the data-based scores"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of roles, controls and baselines"})

    def validate(self) -> None:
        bad = {k: v for k, v in self.to_dict().items() if k != "seed" and (not isinstance(v, int) or v < (0 if k == "n_control" else 1))}
        if bad:
            raise InvalidArgumentError(f"DiscoveryConfig {bad}: counts must be positive integers (n_control may be 0).")


def _measure(editor: HeadEditor, batches, movers, base_gap, rows: list[dict[str, Any]], desc: str, progress: bool) -> None:
    """Fill each row's causal ``inhibition_score`` (the sender component removed).

    Rows are measured in order of sender layer through one :class:`~th_edit.core.layer_cache.LayerCache`
    advanced to each sender layer: removing a component changes nothing below it, so the layers below run
    once in all, and each measurement runs only the layers from its sender up. Under ``accelerate launch``
    each process measures every N-th row (in that order) and every process gets all the scores."""
    rank, world = process_rank_and_count()
    mine = sorted(range(len(rows)), key=lambda i: rows[i]["sender_layer"])[rank::world]
    scores: dict[int, float] = {}
    if mine:
        cache = prompt_cache(editor, batches, int(rows[mine[0]]["sender_layer"]))
        with progress_bar(total=len(mine), desc=desc, enabled=progress and rank == 0) as bar:
            for i in mine:
                scores[i] = _inhibition_of(editor, batches, movers, base_gap, rows[i], cache)
                bar.update(1)
    for part in gather_from_processes(scores, world):
        for i, value in part.items():
            rows[i]["inhibition_score"] = value


def _inhibition_of(editor: HeadEditor, batches, movers, base_gap, row: dict[str, Any], cache) -> float:
    """The causal score of one row: its receiver's inhibition (inhibition rows) or the mean over the movers."""
    cache.advance(int(row["sender_layer"]))
    receivers = [m for m in movers if m[0] >= cache.first_layer]
    gap = base_gap[[movers.index(m) for m in receivers]]
    sender = (row["sender_layer"], row["sender_head"], row["sender_component"])
    effect = dict(zip(receivers, inhibition_score(editor, batches, sender, receivers, base_gap=gap,
                                                  cache=cache).tolist()))
    effect.update({m: 0.0 for m in movers if m not in effect})  # a head cannot affect layers below it
    if row["kind"] == "inhibition":
        return float(effect[(row["receiver_layer"], row["receiver_head"])])
    return float(sum(effect[m] for m in movers) / len(movers))


def _inhibition_rows(cmap, all_heads, movers, cfg: DiscoveryConfig) -> tuple[list[dict], list[dict]]:
    """Sender components Q-composing into the movers: the top ``n_inhibition`` and a seeded control sample."""
    inh = sorted(_component_rows(cmap, "q", all_heads, movers, "inhibition"), key=lambda r: -r["score"])
    chosen = inh[:cfg.n_inhibition]
    seen = {(r["sender_layer"], r["sender_head"], r["sender_component"]) for r in chosen}
    rest = [r for r in inh[cfg.n_inhibition:] if (r["sender_layer"], r["sender_head"], r["sender_component"]) not in seen]
    controls = random.Random(cfg.seed).sample(rest, min(cfg.n_control, len(rest)))
    for r in chosen:
        r["control"] = False
    for r in controls:
        r["control"] = True
    return chosen, controls


def _strongest_heads(rows: list[dict[str, Any]], k: int) -> list[tuple[int, int]]:
    by_head: dict[tuple[int, int], float] = {}
    for r in rows:
        key = (r["sender_layer"], r["sender_head"])
        by_head[key] = max(by_head.get(key, float("-inf")), r["inhibition_score"])
    return [h for h, _ in sorted(by_head.items(), key=lambda kv: -kv[1])][:k]


def _duplicate_rows(cmap, roles, n_heads: int, inhibition_heads, n_duplicate: int) -> list[dict[str, Any]]:
    """Duplicate/previous-token heads' components composing (V, K) into the inhibition heads."""
    role_strength = torch.maximum(roles["duplicate_token"], roles["previous_token"])
    order = role_strength.flatten().argsort(descending=True).tolist()
    dup_heads = [(i // n_heads, i % n_heads) for i in order[:2 * n_duplicate]]
    dup: list[dict[str, Any]] = []
    for mode in ("v", "k"):
        dup += _component_rows(cmap, mode, dup_heads, inhibition_heads, "duplicate")
    dup.sort(key=lambda r: -r["score"])
    chosen, seen = [], set()
    for r in dup:
        key = (r["sender_layer"], r["sender_head"], r["sender_component"])
        if key not in seen:
            seen.add(key)
            r["control"] = False
            chosen.append(r)
        if len(chosen) == n_duplicate:
            break
    return chosen


def find_channels(
    editor: HeadEditor, tokenizer, dataset, config: DiscoveryConfig | None = None, *, channel_map=None,
    progress: bool = True, **overrides: Any,
) -> ChannelFindings:
    """Find inhibition and duplicate-detection channels (see the module docstring).

    Args:
        dataset: task prompts (e.g. the ``train`` split of :func:`th_edit.data.laundry_list`); the first
            ``n_prompts`` are used for the data-based scores.
        config: a :class:`DiscoveryConfig`; keyword ``overrides`` replace its fields (e.g. ``n_movers=2``).
        channel_map: a precomputed :class:`th_edit.analysis.channel_stream.ChannelMap` with modes q, k, v.

    Returns:
        :class:`ChannelFindings`.
    """
    cfg = DiscoveryConfig.merged(config, **overrides)
    t0 = time.perf_counter()
    roles = sequence_roles(editor.model, seed=cfg.seed)
    movers = mover_scores(editor, tokenizer, dataset, batch_size=cfg.batch_size, limit=cfg.n_prompts, progress=progress)
    top_movers = [(int(r.layer), int(r.head)) for r in movers[movers.layer > 0].head(cfg.n_movers).itertuples()]
    if channel_map is None:
        channel_map = editor.channel_map(modes=("q", "k", "v"), progress=progress, baseline_samples=32, seed=cfg.seed)
    all_heads = [(l, h) for l in range(editor.n_layers) for h in range(editor.n_heads)]
    batches = prompt_batches(tokenizer, dataset, cfg.batch_size, cfg.n_prompts)
    base_gap = receiver_gap(editor.model, batches, top_movers)
    chosen, controls = _inhibition_rows(channel_map, all_heads, top_movers, cfg)
    _measure(editor, batches, top_movers, base_gap, chosen + controls, "inhibition evidence", progress)
    inhibition_heads = _strongest_heads(chosen, cfg.n_inhibition_heads)
    dup_chosen = _duplicate_rows(channel_map, roles, editor.n_heads, inhibition_heads, cfg.n_duplicate)
    _measure(editor, batches, top_movers, base_gap, dup_chosen, "duplicate-detection evidence", progress)
    frame = pd.DataFrame(chosen + controls + dup_chosen, columns=_CHANNEL_COLUMNS)
    corr = {kind: _spearman(frame[frame.kind == kind].score, frame[frame.kind == kind].inhibition_score)
            for kind in ("inhibition", "duplicate")}
    logger.info("found channels in %.1f s; spearman(weight, causal) = %s", time.perf_counter() - t0, corr)
    return ChannelFindings(movers=movers, channels=frame, roles=roles, rank_correlation=corr,
                           inhibition_heads=inhibition_heads,
                           meta={"movers": top_movers, "n_prompts": cfg.n_prompts, "seed": cfg.seed,
                                 "config": cfg.to_dict(), "seconds": time.perf_counter() - t0})
