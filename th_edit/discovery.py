"""Channel discovery and edit search: the paper's pipeline, from data-based roles and the channel map.

:func:`find_channels`
    1. **Mover heads**: the heads with the highest :func:`th_edit.roles.mover_scores` on the prompts.
    2. **Inhibition channels**: sender OV components of earlier heads ranked by their Q-composition
       component score into each mover head (weight-based, with the random-matrix baseline), then
       measured causally with :func:`th_edit.roles.inhibition_score` (component removed). A few
       lower-ranked components (seeded sample) are measured too, so that the rank correlation between
       the weight-based and the causal ranking is not computed on the top of the list alone.
    3. **Duplicate-detection channels**: OV components of the strongest duplicate-token and
       previous-token heads, ranked by V- and K-composition into the top inhibition heads; causal
       evidence is their inhibition score on the mover heads (the downstream effect).

:func:`search_edit`
    Rescales candidate components (the top inhibition channels' sender OV components and the mover
    heads' QK components they feed) by each scale of a grid, keeps the best on the **dev** split
    (accuracy, then mean logit difference), greedily adds up to ``max_edits`` edits while dev accuracy
    improves and the guard loss stays within ``guard_tolerance``, and only then evaluates the **test**
    split before and after. No choice looks at test data.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from .evaluate import EvalResult, evaluate, guard_loss
from .progress import progress_bar
from .roles import inhibition_score, mover_scores, prompt_batches, receiver_gap, sequence_roles

__all__ = ["ChannelFindings", "find_channels", "EditSearch", "search_edit"]

logger = logging.getLogger("th_edit")

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
        """Rows for the model card (see :mod:`th_edit.cards`)."""
        return [
            {"sender": f"{r.sender_layer}.{r.sender_head}[{r.sender_component}]",
             "receiver": f"{r.receiver_layer}.{r.receiver_head}", "mode": r.mode, "score": float(r.score),
             "baseline": float(r.baseline), "cosine": None}
            for r in self.top("inhibition", k).itertuples()
        ]


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


def find_channels(
    editor,
    tokenizer,
    dataset,
    *,
    n_movers: int = 3,
    n_inhibition: int = 12,
    n_control: int = 8,
    n_duplicate: int = 6,
    n_inhibition_heads: int = 3,
    n_prompts: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    channel_map=None,
    progress: bool = True,
) -> ChannelFindings:
    """Find inhibition and duplicate-detection channels (see the module docstring).

    Args:
        dataset: task prompts (e.g. the ``train`` split of :func:`th_edit.data.laundry_list`); the first
            ``n_prompts`` are used for the data-based scores.
        n_movers: mover heads to explain. n_inhibition / n_duplicate: top weight-ranked components
            measured causally. n_control: extra lower-ranked components measured for the correlation.
        channel_map: a precomputed :class:`th_edit.channels.ChannelMap` with modes q, k, v (optional).

    Returns:
        :class:`ChannelFindings`.
    """
    t0 = time.perf_counter()
    roles = sequence_roles(editor.model, seed=seed)
    movers = mover_scores(editor, tokenizer, dataset, batch_size=batch_size, limit=n_prompts, progress=progress)
    top_movers = [(int(r.layer), int(r.head)) for r in movers[movers.layer > 0].head(n_movers).itertuples()]
    if channel_map is None:
        channel_map = editor.channel_map(modes=("q", "k", "v"), progress=progress, baseline_samples=32, seed=seed)
    all_heads = [(l, h) for l in range(editor.n_layers) for h in range(editor.n_heads)]
    batches = prompt_batches(tokenizer, dataset, batch_size, n_prompts)
    base_gap = receiver_gap(editor.model, batches, top_movers)
    rng = random.Random(seed)

    def measure(rows: list[dict[str, Any]], desc: str) -> None:
        with progress_bar(total=len(rows), desc=desc, enabled=progress) as bar:
            for row in rows:
                sender = (row["sender_layer"], row["sender_head"], row["sender_component"])
                effect = inhibition_score(editor, batches, sender, top_movers, base_gap=base_gap)
                target = top_movers.index((row["receiver_layer"], row["receiver_head"])) if row["kind"] == "inhibition" else None
                row["inhibition_score"] = float(effect[target]) if target is not None else float(effect.mean())
                bar.update(1)

    # inhibition channels: sender components Q-composing into the mover heads
    inh = sorted(_component_rows(channel_map, "q", all_heads, top_movers, "inhibition"), key=lambda r: -r["score"])
    chosen = inh[:n_inhibition]
    seen = {(r["sender_layer"], r["sender_head"], r["sender_component"]) for r in chosen}
    rest = [r for r in inh[n_inhibition:] if (r["sender_layer"], r["sender_head"], r["sender_component"]) not in seen]
    controls = rng.sample(rest, min(n_control, len(rest)))
    for r in chosen:
        r["control"] = False
    for r in controls:
        r["control"] = True
    inh_rows = chosen + controls
    measure(inh_rows, "inhibition evidence")
    by_head: dict[tuple[int, int], float] = {}
    for r in chosen:
        key = (r["sender_layer"], r["sender_head"])
        by_head[key] = max(by_head.get(key, float("-inf")), r["inhibition_score"])
    inhibition_heads = [h for h, _ in sorted(by_head.items(), key=lambda kv: -kv[1])][:n_inhibition_heads]

    # duplicate-detection channels: duplicate/previous-token heads' components into the inhibition heads
    role_strength = torch.maximum(roles["duplicate_token"], roles["previous_token"])
    order = role_strength.flatten().argsort(descending=True).tolist()
    dup_heads = [(i // editor.n_heads, i % editor.n_heads) for i in order[:2 * n_duplicate]]
    dup: list[dict[str, Any]] = []
    for mode in ("v", "k"):
        dup += _component_rows(channel_map, mode, dup_heads, inhibition_heads, "duplicate")
    dup.sort(key=lambda r: -r["score"])
    dup_chosen, seen_dup = [], set()
    for r in dup:
        key = (r["sender_layer"], r["sender_head"], r["sender_component"])
        if key not in seen_dup:
            seen_dup.add(key)
            r["control"] = False
            dup_chosen.append(r)
        if len(dup_chosen) == n_duplicate:
            break
    measure(dup_chosen, "duplicate-detection evidence")

    frame = pd.DataFrame(inh_rows + dup_chosen, columns=_CHANNEL_COLUMNS)
    inh_frame = frame[frame.kind == "inhibition"]
    corr = {"inhibition": _spearman(inh_frame.score, inh_frame.inhibition_score),
            "duplicate": _spearman(frame[frame.kind == "duplicate"].score, frame[frame.kind == "duplicate"].inhibition_score)}
    logger.info("found channels in %.1f s; spearman(weight, causal) = %s", time.perf_counter() - t0, corr)
    return ChannelFindings(movers=movers, channels=frame, roles=roles, rank_correlation=corr,
                           inhibition_heads=inhibition_heads,
                           meta={"movers": top_movers, "n_prompts": n_prompts, "seed": seed,
                                 "seconds": time.perf_counter() - t0})


@dataclass
class EditSearch:
    """What :func:`search_edit` chose and measured."""

    edits: list[dict[str, Any]]  # layer, head, circuit, component, alpha
    trials: pd.DataFrame  # every (candidate, alpha) tried on dev, with dev accuracy and logit diff
    dev_before: float
    dev_after: float
    test_before: EvalResult
    test_after: EvalResult
    guard_before: float
    guard_after: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def guard_change(self) -> float:
        """Relative change of the guard loss (0.01 = 1% worse)."""
        return self.guard_after / self.guard_before - 1.0

    def summary(self) -> pd.DataFrame:
        """Test accuracy per list length before and after, with the change."""
        b, a = self.test_before.by_length(), self.test_after.by_length()
        out = b[["list_length", "n", "accuracy", "ci_low", "ci_high"]].rename(
            columns={"accuracy": "before", "ci_low": "before_low", "ci_high": "before_high"})
        out["after"], out["after_low"], out["after_high"] = a["accuracy"].values, a["ci_low"].values, a["ci_high"].values
        out["change"] = out["after"] - out["before"]
        return out


def _candidates(findings: ChannelFindings, editor, n_ov: int, n_qk: int) -> list[tuple[int, int, str, int]]:
    top = findings.top("inhibition", k=n_ov)
    cands = [(int(r.sender_layer), int(r.sender_head), "ov", int(r.sender_component)) for r in top.itertuples()]
    seen = set()
    for r in top.itertuples():  # the mover's QK component that reads the channel most
        if len(seen) >= n_qk:
            break
        key = (int(r.receiver_layer), int(r.receiver_head))
        if key in seen:
            continue
        share = editor.composition((int(r.sender_layer), int(r.sender_head)), key, mode="q")["share"]  # [d_h, d_h]
        c = int(share[int(r.sender_component)].abs().argmax())
        cands.append((key[0], key[1], "qk", c))
        seen.add(key)
    return cands


def search_edit(
    editor,
    tokenizer,
    dev,
    test,
    findings: ChannelFindings,
    *,
    alphas: Sequence[float] = (0.0, 0.5, 2.0, 4.0),
    n_ov: int = 6,
    n_qk: int = 2,
    max_edits: int = 2,
    guard_tolerance: float = 0.02,
    batch_size: int = 16,
    candidates: Sequence[tuple[int, int, str, int]] | None = None,
    progress: bool = True,
) -> EditSearch:
    """Choose component rescalings on ``dev``; report ``test`` before/after (see the module docstring).

    The chosen edits stay applied on ``editor`` (undo them with ``editor.reset()``); ``editor.evidence``
    and ``editor.evaluation`` are filled for the model card. ``candidates``: your own
    ``(layer, head, circuit, component)`` list instead of the ones derived from ``findings``.
    """
    t0 = time.perf_counter()
    start_edits = len(editor.edits)
    dev_eval = lambda: evaluate(editor.model, tokenizer, dev, batch_size=batch_size, progress=False)  # noqa: E731
    base_dev = dev_eval()
    guard_before = guard_loss(editor.model, tokenizer)
    best_acc, best_ld = base_dev.accuracy, float(base_dev.records.logit_diff.mean())
    cands = [tuple(c) for c in candidates] if candidates is not None else _candidates(findings, editor, n_ov, n_qk)
    trials, chosen = [], []
    for round_ in range(max_edits):
        results = []
        with progress_bar(total=len(cands) * len(alphas), desc=f"edit search (round {round_ + 1})", enabled=progress) as bar:
            for cand in cands:
                for alpha in alphas:
                    editor.scale_component(cand[0], cand[1], cand[2], cand[3], alpha)
                    try:
                        res = dev_eval()
                    finally:
                        editor.undo()
                    row = {"round": round_ + 1, "layer": cand[0], "head": cand[1], "circuit": cand[2],
                           "component": cand[3], "alpha": alpha, "dev_accuracy": res.accuracy,
                           "dev_logit_diff": float(res.records.logit_diff.mean())}
                    results.append(row)
                    trials.append(row)
                    bar.update(1)
        results.sort(key=lambda r: (-r["dev_accuracy"], -r["dev_logit_diff"]))
        accepted = False
        for row in results:
            if (row["dev_accuracy"], row["dev_logit_diff"]) <= (best_acc, best_ld) or row["dev_accuracy"] < best_acc:
                break
            editor.scale_component(row["layer"], row["head"], row["circuit"], row["component"], row["alpha"])
            if guard_loss(editor.model, tokenizer) / guard_before - 1.0 <= guard_tolerance:
                chosen.append({k: row[k] for k in ("layer", "head", "circuit", "component", "alpha")})
                best_acc, best_ld = row["dev_accuracy"], row["dev_logit_diff"]
                cands = [c for c in cands if c != (row["layer"], row["head"], row["circuit"], row["component"])]
                accepted = True
                break
            editor.undo()
        if not accepted:
            break
    edits_now = editor.edits[start_edits:]
    for _ in edits_now:  # measure the base model on test with the search's edits undone, then redo them
        editor.undo()
    test_before = evaluate(editor.model, tokenizer, test, batch_size=batch_size, progress=progress, desc="test (before)")
    for e in edits_now:
        editor.apply_edit(e)
    test_after = evaluate(editor.model, tokenizer, test, batch_size=batch_size, progress=progress, desc="test (after)")
    guard_after = guard_loss(editor.model, tokenizer)
    editor.evidence = findings.evidence()
    editor.evaluation = {"before": test_before.accuracy_by_length(), "after": test_after.accuracy_by_length(),
                         "note": "Laundry List accuracy (argmax over the listed items' first tokens) on the test split."}
    return EditSearch(edits=chosen, trials=pd.DataFrame(trials), dev_before=base_dev.accuracy, dev_after=best_acc,
                      test_before=test_before, test_after=test_after, guard_before=guard_before,
                      guard_after=guard_after, meta={"seconds": time.perf_counter() - t0, "alphas": list(alphas)})
