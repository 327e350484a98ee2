"""Circuit discovery from the answer backward: which heads and channels carry a task's answer.

:func:`find_circuit` starts where the answer is written and walks back through the composition graph:

1. **Seed heads**: every head whose direct effect on the answer's logit difference (its output at the
   final position through the final norm, and Gemma2/3's post-attention norm, with their scales frozen;
   ``logit_diff`` of :func:`th_edit.analysis.roles.mover_scores`) is at least ``direct_fraction`` of the
   largest such effect in absolute value. No fixed head count: a model with one dominant head gets few
   seeds, a model with many similar heads gets many.
2. **One step back**: for every head of the circuit found in the previous step (the *receivers*), the OV
   components of each earlier head (the *sender*) whose composition score into the receiver (Q, K or V; the
   channel map's component level) lies ``z_min`` or more standard deviations above its random-matrix
   baseline form the sender's *channel* into that receiver. Channels are ranked by their attribution (the
   summed ``|d margin / d log-scale|`` of their components, :mod:`th_edit.analysis.attribution`, from
   ``attribution_prompts`` prompts disjoint from the confirming ones) and the ``max_candidates`` strongest
   per receiver and mode are the step's candidates. They are confirmed causally, one test per sender
   head (its candidate channels into the step's receivers overlap, so they are tested together): with
   ``confirm="scale"`` (default) each of those components is rescaled by ``exp(+-scale_step)`` in the
   direction its attribution says raises the answer, with ``confirm="remove"`` they are removed (one exact
   weight edit, undone at once), and the change of the answer's logit difference (target minus the mean
   of the other listed items) is measured on every confirming prompt. A sender is kept when
   ``|mean| / standard error >= t_min`` (reliably non-zero) and ``|mean| >= min_effect`` times the seed
   heads' summed ``|direct effect|`` (large enough to matter); it joins the circuit.
3. **Stop** when a step adds no head, when what it adds (the sum of its kept senders' ``|effect|``) is
   below ``min_gain`` times what the circuit holds already, or after ``max_depth`` steps.

Every measured channel (kept or not) is recorded with its weight score, attribution and causal effect,
so the agreement of the weight-based (and the attribution) ranking with the causal one is reported per
composition mode (Spearman).
Each head gets a data-based role (mover, inhibition, duplicate-token, induction, previous-token or other,
see :func:`head_role`); roles are reported, never required. Measurements run through one
:class:`~th_edit.core.layer_cache.LayerCache` advanced by sender layer, so the layers below each sender run
once in all. All choices use the prompts given (train or dev), never test: the first ``n_prompts`` give the
direct and causal effects, the next ``attribution_prompts`` the attribution (a shorter dataset is split,
at most half of it for the attribution).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from ..edits.plan import Edit
from ..edits.scale import make_edit
from ..errors import InvalidArgumentError
from ..tasks.batching import PromptBatch, accepts_logits_to_keep, dataset_rows, prompt_batches
from ..utils.distributed import process_rank_and_count
from ..utils.progress import progress_bar
from ..utils.settings import Settings
from ..utils.sharding import gather_from_processes
from .attribution import answer_margins, component_attribution
from .protocol import HeadEditor
from .roles import mover_scores, prompt_cache, sequence_roles

__all__ = ["CircuitConfig", "CircuitHead", "CircuitChannel", "CircuitEdge", "Circuit", "find_circuit", "head_role"]

logger = logging.getLogger(__name__)

Head = tuple[int, int]
ROLES = ("mover", "inhibition", "duplicate_token", "induction", "previous_token", "other")


@dataclass
class CircuitConfig(Settings):
    """Settings of :func:`find_circuit` (saved in ``Circuit.meta["config"]``).

    >>> CircuitConfig(t_min=3.0).t_min
    3.0
    """

    n_prompts: int = field(default=32, metadata={"help": "task prompts for the direct and causal effects"})
    attribution_prompts: int = field(default=16, metadata={
        "help": "further prompts (after the first n_prompts) for the attribution that ranks the candidates"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    direct_fraction: float = field(default=0.25, metadata={
        "help": "seed heads: |direct effect| at least this fraction of the largest one"})
    z_min: float = field(default=3.0, metadata={"help": "candidates: composition z-score over the random baseline"})
    max_candidates: int = field(default=8, metadata={"help": "channels measured per receiver head and mode"})
    confirm: str = field(default="scale", metadata={
        "help": "causal test of a channel: 'scale' (each component by exp(+-scale_step) towards the answer, "
                "by its attribution's sign) or 'remove'"})
    scale_step: float = field(default=0.5, metadata={"help": "log-scale step of confirm='scale'"})
    t_min: float = field(default=2.5, metadata={"help": "kept: |mean effect| / standard error over prompts"})
    min_effect: float = field(default=0.35, metadata={
        "help": "kept: |mean effect| at least this fraction of the seed heads' summed |direct effect| "
                "(0: significance alone)"})
    min_gain: float = field(default=0.05, metadata={
        "help": "stop when a step adds less than this fraction of the circuit's total effect"})
    max_depth: int = field(default=3, metadata={"help": "composition steps back from the seed heads"})
    modes: tuple[str, ...] = field(default=("q", "k", "v"), metadata={"help": "composition modes followed"})
    seed: int = field(default=0, metadata={"help": "seed of the role sequences and the channel map's baselines"})

    def validate(self) -> None:
        self.modes = tuple(self.modes)
        problems = []
        for name in ("n_prompts", "attribution_prompts", "batch_size", "max_candidates", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("direct_fraction", "z_min", "t_min", "min_gain", "min_effect", "scale_step"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name}={value!r} must be a finite number >= 0")
        if not 0 < self.direct_fraction <= 1:
            problems.append(f"direct_fraction={self.direct_fraction!r} must lie in (0, 1]")
        if self.confirm not in ("scale", "remove"):
            problems.append(f"confirm={self.confirm!r} must be 'scale' or 'remove'")
        if self.confirm == "scale" and not self.scale_step > 0:
            problems.append(f"scale_step={self.scale_step!r} must be > 0 with confirm='scale'")
        if not self.modes or set(self.modes) - {"q", "k", "v"}:
            problems.append(f"modes={self.modes!r} must be a non-empty subset of ('q', 'k', 'v')")
        if problems:
            raise InvalidArgumentError("CircuitConfig: " + "; ".join(problems) + ".")


@dataclass
class CircuitHead:
    """A head of the circuit: ``step`` 0 for a seed head, k for a head found k composition steps back;
    ``direct_effect`` its direct logit-difference effect; ``role`` its data-based role; ``scores`` the
    role scores behind it."""

    layer: int
    head: int
    step: int
    direct_effect: float
    role: str
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class CircuitChannel:
    """A candidate channel: the OV ``components`` of the ``sender`` head that compose into the ``receiver``
    head in ``mode`` above baseline. ``weight_z``: the largest of their composition scores as a z-score over
    the random baseline (``weight_score`` raw). ``attribution``: their summed ``|d margin / d log-scale|``."""

    sender: Head
    components: tuple[int, ...]
    receiver: Head
    mode: str
    weight_score: float
    weight_z: float
    attribution: float


@dataclass
class CircuitEdge(CircuitChannel):
    """A measured :class:`CircuitChannel`. ``effect``: mean change of the answer's logit difference under
    the causal test of the sender's channels of that step (``confirm`` of the config: scaled towards the
    answer, or removed, where negative means they helped the answer), ``t`` that mean over its standard
    error; ``kept``: whether it passed ``t_min`` and ``min_effect``."""

    effect: float
    t: float
    kept: bool


@dataclass
class Circuit:
    """What :func:`find_circuit` found: heads, measured edges (``kept`` ones form the circuit) and
    ``meta`` (settings, Spearman per mode, why the walk stopped, timings)."""

    heads: list[CircuitHead]
    edges: list[CircuitEdge]
    meta: dict[str, Any] = field(default_factory=dict)

    def head_list(self) -> list[Head]:
        """The circuit's heads, sorted, as ``fit_edit(heads=...)`` takes them."""
        return sorted((h.layer, h.head) for h in self.heads)

    def kept_edges(self) -> list[CircuitEdge]:
        return [e for e in self.edges if e.kept]

    def evidence(self, k: int = 5) -> list[dict[str, Any]]:
        """The ``k`` kept edges of largest causal effect, as rows for the model card."""
        top = sorted(self.kept_edges(), key=lambda e: -abs(e.effect))[:k]
        return [{"sender": f"{e.sender[0]}.{e.sender[1]}{list(e.components)}", "receiver": f"{e.receiver[0]}.{e.receiver[1]}",
                 "mode": e.mode, "score": e.weight_score, "baseline": None, "cosine": None} for e in top]

    def to_frame(self) -> pd.DataFrame:
        """One row per measured edge."""
        return pd.DataFrame([{"sender_layer": e.sender[0], "sender_head": e.sender[1],
                              "components": " ".join(map(str, e.components)), "receiver_layer": e.receiver[0],
                              "receiver_head": e.receiver[1], "mode": e.mode, "weight_score": e.weight_score,
                              "weight_z": e.weight_z, "attribution": e.attribution, "effect": e.effect, "t": e.t,
                              "kept": e.kept} for e in self.edges])

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [asdict(h) for h in self.heads], "edges": [asdict(e) for e in self.edges], "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Circuit":
        heads = [CircuitHead(**h) for h in data["heads"]]
        edges = [CircuitEdge(**{**e, "sender": tuple(e["sender"]), "components": tuple(e["components"]),
                                "receiver": tuple(e["receiver"])}) for e in data["edges"]]
        return cls(heads=heads, edges=edges, meta=dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """Write the circuit as JSON (no pickle) and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=float))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _is_mover(scores: dict[str, float], threshold: float = 0.3) -> bool:
    """Attends more to the answer than to the other items, writes it, and has a mover score at least
    ``threshold`` of the model's strongest mover (``mover_share``)."""
    return (scores.get("mover_share", 0.0) >= threshold and scores.get("logit_diff", 0.0) > 0
            and scores.get("attn_target", 0.0) > scores.get("attn_others", 0.0))


def head_role(scores: dict[str, float], *, has_mover_edge: bool, threshold: float = 0.3) -> str:
    """The data-based role of a circuit head from its ``scores``:

    ``mover`` when it attends more to the answer than to the other items and writes it (positive
    ``logit_diff``) with ``mover_share >= threshold`` of the strongest mover in the model; else the
    strongest of ``duplicate_token``, ``induction`` and ``previous_token`` when at least ``threshold``;
    else ``inhibition`` when it composes into a mover's query or key (``has_mover_edge``); else ``other``.

    >>> head_role({"mover_share": 0.9, "attn_target": 0.5, "attn_others": 0.1, "logit_diff": 1.0}, has_mover_edge=False)
    'mover'
    >>> head_role({"induction": 0.6, "duplicate_token": 0.1}, has_mover_edge=True)
    'induction'
    """
    if _is_mover(scores, threshold):
        return "mover"
    pattern = {k: scores.get(k, 0.0) for k in ("duplicate_token", "induction", "previous_token")}
    best = max(pattern, key=pattern.get)
    if pattern[best] >= threshold:
        return best
    return "inhibition" if has_mover_edge else "other"


def _check_single_token_targets(batches: Sequence[PromptBatch]) -> None:
    for pb in batches:
        for cands in pb.candidates:
            if len(set(cands)) != len(cands):
                raise InvalidArgumentError(
                    "the listed items do not start with distinct tokens, so the answer's logit cannot be told "
                    "apart; build the dataset with th_edit.data (it filters item pools per tokenizer).")


def _all_margins(cache, batches: Sequence[PromptBatch]) -> torch.Tensor:
    """``[N]`` answer margins (:func:`~th_edit.analysis.attribution.answer_margins`) over all prompts,
    running only the cache's layers."""
    out = []
    with torch.no_grad():
        for i, pb in enumerate(batches):
            width = pb.input_ids.shape[1]
            keep = {"logits_to_keep": int(width - int(pb.last.min()))} if accepts_logits_to_keep(cache.model) else {}
            out.append(answer_margins(cache.forward(i, **keep).logits, pb, width).cpu())
    return torch.cat(out)


def _seed_heads(movers: pd.DataFrame, cfg: CircuitConfig) -> dict[Head, float]:
    """Heads whose |direct effect| is at least ``direct_fraction`` of the largest: ``{head: effect}``."""
    effects = {(int(r.layer), int(r.head)): float(r.logit_diff) for r in movers.itertuples()}
    top = max((abs(v) for v in effects.values()), default=0.0)
    if not math.isfinite(top) or top == 0.0:
        return {}
    return {h: v for h, v in effects.items() if abs(v) >= cfg.direct_fraction * top}


def _candidates(cmap, receivers: Sequence[Head], n_heads: int, grads: torch.Tensor,
                cfg: CircuitConfig) -> list[CircuitChannel]:
    """Each earlier head's channel into each receiver and mode (its components ``z_min`` or more baseline
    deviations up), the ``max_candidates`` of largest attribution per receiver and mode."""
    mean, std = cmap.baselines["component"]
    out = []
    for receiver in receivers:
        senders = [(l, h) for l in range(receiver[0]) for h in range(n_heads)]
        for mode in cfg.modes:
            found = []
            for sender in senders:
                scores = cmap.component_scores(mode, sender, receiver)
                z = (scores - mean) / (std if std > 0 else 1.0)
                comps = torch.nonzero(z >= cfg.z_min).flatten()
                if comps.numel():
                    found.append(CircuitChannel(sender, tuple(comps.tolist()), receiver, mode, float(scores[comps].max()),
                                                float(z[comps].max()), float(grads[sender][comps].abs().sum())))
            found.sort(key=lambda ch: (-ch.attribution, -ch.weight_z))
            out += found[:cfg.max_candidates]
    return out


#: a causal test: a sender head and the components of it that the test rescales (or removes)
SenderTest = tuple[Head, tuple[int, ...]]


def _sender_tests(cands: Sequence[CircuitChannel]) -> dict[Head, SenderTest]:
    """One causal test per sender head of a step: the union of its candidate channels' components (into
    all of the step's receivers and modes). The test says whether that head's channels into the circuit
    move the answer; the channels of one sender overlap heavily, so testing each alone would mostly
    repeat the same forward passes."""
    comps: dict[Head, set[int]] = {}
    for ch in cands:
        comps.setdefault(ch.sender, set()).update(ch.components)
    return {h: (h, tuple(sorted(c))) for h, c in comps.items()}


def _test_key(test: SenderTest, cfg: CircuitConfig) -> tuple:
    """What a causal test depends on: the memo key of :func:`_measure`."""
    (layer, head), components = test
    return (layer, head, components, cfg.confirm, cfg.scale_step if cfg.confirm == "scale" else None)


def _measure(editor: HeadEditor, batches: Sequence[PromptBatch], tests: Sequence[SenderTest], grads: torch.Tensor,
             base: torch.Tensor, cfg: CircuitConfig, progress: bool) -> dict[tuple, tuple[float, float]]:
    """``{key: (mean effect, t)}`` (keys of :func:`_test_key`): the change of the answer margin under each
    causal test (exact edits, undone before the next one), through one layer cache advanced by sender
    layer. Under ``accelerate launch`` each process runs every N-th test (in layer order) and all get the
    whole result."""
    rank, world = process_rank_and_count()
    todo = {_test_key(test, cfg): test for test in tests}
    mine = [todo[k] for k in sorted(todo)][rank::world]
    out: dict[tuple, tuple[float, float]] = {}
    if mine:
        cache = prompt_cache(editor, batches, mine[0][0][0])
        with progress_bar(total=len(mine), desc="circuit: causal effects", enabled=progress and rank == 0) as bar:
            for test in mine:
                cache.advance(test[0][0])
                out[_test_key(test, cfg)] = _effect(editor, cache, batches, test, grads, base, cfg)
                bar.update(1)
    return {k: v for part in gather_from_processes(out, world) for k, v in part.items()}


def _test_edit(editor: HeadEditor, test: SenderTest, grads: torch.Tensor, cfg: CircuitConfig) -> Edit:
    """The causal test as one exact edit of its sender's OV circuit (every component scaled from the same
    SVD): removal, or each component by ``exp(+-scale_step)``, up where its attribution is >= 0."""
    (layer, head), components = test
    if cfg.confirm == "remove":
        alphas = [0.0] * len(components)
    else:
        g = grads[layer, head]
        alphas = [math.exp(cfg.scale_step if g[c] >= 0 else -cfg.scale_step) for c in components]
    return make_edit(editor.layout, layer, head, "ov", list(components), 1.0, folded=editor.folded, alphas=alphas,
                     warn_partial=False)


def _effect(editor: HeadEditor, cache, batches: Sequence[PromptBatch], test: SenderTest, grads: torch.Tensor,
            base: torch.Tensor, cfg: CircuitConfig) -> tuple[float, float]:
    """``(mean, t)`` of the per-prompt margin change under the causal ``test`` (undone before returning)."""
    editor.apply_edit(_test_edit(editor, test, grads, cfg))
    try:
        diff = _all_margins(cache, batches) - base
    finally:
        editor.undo()
    n, mean = base.numel(), float(diff.mean())
    se = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return mean, (mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean)))


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3:
        return float("nan")
    return float(pd.Series(list(a)).rank().corr(pd.Series(list(b)).rank()))


def _walk(editor: HeadEditor, batches, cmap, seeds: dict[Head, float], base: torch.Tensor, grads: torch.Tensor,
          cfg: CircuitConfig, progress: bool, measured: dict) -> tuple[dict[Head, int], list[CircuitEdge], str]:
    """The backward walk (steps 2-3 of the module docstring): ``(head -> step, edges, why it stopped)``.
    ``measured`` memoises the causal effects (read and filled)."""
    steps = {h: 0 for h in seeds}
    total = sum(abs(v) for v in seeds.values())
    floor = cfg.min_effect * total
    edges: list[CircuitEdge] = []
    frontier, reason = sorted(seeds), f"reached max_depth={cfg.max_depth}"
    for depth in range(1, cfg.max_depth + 1):
        cands = _candidates(cmap, frontier, editor.n_heads, grads, cfg)
        if not cands:
            reason = f"step {depth}: no sender component composes above z_min={cfg.z_min}"
            break
        tests = _sender_tests(cands)
        measured.update(_measure(editor, batches, [x for x in tests.values() if _test_key(x, cfg) not in measured],
                                 grads, base, cfg, progress))
        step_edges = []
        for ch in cands:
            mean, t = measured[_test_key(tests[ch.sender], cfg)]
            step_edges.append(CircuitEdge(**asdict(ch), effect=mean, t=t,
                                          kept=abs(t) >= cfg.t_min and abs(mean) >= floor))
        kept = {e.sender: e for e in step_edges if e.kept}  # one test per sender head
        gain = sum(abs(e.effect) for e in kept.values())
        new_heads = kept.keys() - steps.keys()
        if not new_heads or gain < cfg.min_gain * total:
            for e in step_edges:
                e.kept = e.kept and bool(new_heads) and gain >= cfg.min_gain * total
            edges += step_edges
            reason = (f"step {depth}: no new head passed t_min={cfg.t_min} and min_effect={cfg.min_effect}"
                      if not new_heads else
                      f"step {depth}: it would add {gain:.3g}, under min_gain={cfg.min_gain} of {total:.3g}")
            break
        edges += step_edges
        steps.update({h: depth for h in new_heads})
        total += gain
        frontier = sorted(new_heads)
    return steps, edges, reason


def _circuit_heads(editor: HeadEditor, steps: dict[Head, int], movers: pd.DataFrame, edges: Sequence[CircuitEdge],
                   seed: int) -> list[CircuitHead]:
    """Each head of the walk with its direct effect, role scores and role (:func:`head_role`)."""
    roles = sequence_roles(editor.model, seed=seed)
    by_head = {(int(r.layer), int(r.head)): r for r in movers.itertuples()}
    best_mover = max(float(movers.mover_score.max()), 1e-12)
    mover_heads = {h for h, r in by_head.items()
                   if _is_mover({"mover_share": r.mover_score / best_mover, "logit_diff": r.logit_diff,
                                 "attn_target": r.attn_target, "attn_others": r.attn_others})}
    out = []
    for (layer, head), step in sorted(steps.items()):
        row = by_head[(layer, head)]
        scores = {k: float(v[layer, head]) for k, v in roles.items()}
        scores.update(attn_target=float(row.attn_target), attn_others=float(row.attn_others),
                      logit_diff=float(row.logit_diff), mover_share=float(row.mover_score) / best_mover)
        into_mover = any(e.kept and e.sender == (layer, head) and e.receiver in mover_heads and e.mode in "qk"
                         for e in edges)
        out.append(CircuitHead(layer=layer, head=head, step=step, direct_effect=float(row.logit_diff),
                               role=head_role(scores, has_mover_edge=into_mover), scores=scores))
    return out


def _split_prompts(tokenizer, dataset, cfg: CircuitConfig) -> tuple[list[PromptBatch], list[PromptBatch]]:
    """``(confirming batches, attribution batches)``: the first ``n_prompts`` rows and the next
    ``attribution_prompts``; a shorter dataset gives at most half of its rows to the attribution."""
    items = dataset_rows(dataset)
    n_attr = min(cfg.attribution_prompts, len(items) // 2)
    n_conf = min(cfg.n_prompts, len(items) - n_attr)
    if n_conf < 1 or n_attr < 1:
        raise InvalidArgumentError(f"find_circuit needs at least 2 prompts (it has {len(items)}): some confirm the "
                                   "channels, others rank them; pass the train (or dev) split.")
    if n_attr < cfg.attribution_prompts:
        logger.warning("circuit: %d prompts, so %d confirm and %d rank the channels (asked: %d and %d)", len(items),
                       n_conf, n_attr, cfg.n_prompts, cfg.attribution_prompts)
    conf = prompt_batches(tokenizer, items[:n_conf], cfg.batch_size)
    return conf, prompt_batches(tokenizer, items[n_conf:n_conf + n_attr], cfg.batch_size)


def find_circuit(editor: HeadEditor, tokenizer, dataset, config: CircuitConfig | None = None, *,
                 channel_map=None, measurements: dict | None = None, progress: bool = True,
                 **overrides: Any) -> Circuit:
    """Discover the circuit that writes the answer, walking back from it (see the module docstring).

    Args:
        editor: a :class:`th_edit.ChannelEditor` (left bit-identical: every test edit is undone).
        tokenizer: the model's tokenizer.
        dataset: task prompts with ``prompt``, ``items``, ``target`` (e.g. the train split of
            :func:`th_edit.data.laundry_list`); the first ``n_prompts`` confirm, the next
            ``attribution_prompts`` rank. Never pass test prompts.
        config: a :class:`CircuitConfig`; keyword ``overrides`` replace its fields.
        channel_map: a precomputed map holding ``config.modes`` (else one is computed).
        measurements: a dict memoising the attribution and the causal effects: pass the same dict to
            several calls on the same model and prompts (e.g. trying thresholds on dev) and each channel
            is measured once.

    Returns:
        A :class:`Circuit`. It is empty, with ``meta["reason"]``, when no head writes the answer.

    Raises:
        InvalidArgumentError: bad settings, fewer than 2 prompts, or listed items without distinct first
        tokens.

    Example::

        circuit = editor.find_circuit(data["train"], min_effect=0.1)
        circuit.head_list()          # [(15, 3), (23, 3), ...], as fit_edit(heads=...) takes them
    """
    cfg = CircuitConfig.merged(config, **overrides)
    t0 = time.perf_counter()
    batches, attr_batches = _split_prompts(tokenizer, dataset, cfg)
    _check_single_token_targets(batches + attr_batches)
    n_conf = sum(len(pb) for pb in batches)
    movers = mover_scores(editor, tokenizer, dataset, batch_size=cfg.batch_size, limit=n_conf, progress=progress)
    seeds = _seed_heads(movers, cfg)
    meta: dict[str, Any] = {"config": cfg.to_dict(), "n_prompts": n_conf,
                            "attribution_prompts": sum(len(pb) for pb in attr_batches), "seeds": sorted(seeds)}
    if not seeds:
        meta["reason"] = "no head has a non-zero direct effect on the answer's logit difference"
        return Circuit(heads=[], edges=[], meta=meta)
    cmap = channel_map if channel_map is not None else editor.channel_map(modes=cfg.modes, progress=progress, seed=cfg.seed)
    base = _all_margins(prompt_cache(editor, batches, 0), batches)
    memo = measurements if measurements is not None else {}
    if "attribution" not in memo:
        memo["attribution"] = component_attribution(editor, attr_batches, progress=progress)
    steps, edges, reason = _walk(editor, batches, cmap, seeds, base, memo["attribution"], cfg, progress, memo)
    heads = _circuit_heads(editor, steps, movers, edges, cfg.seed)
    meta.update(reason=reason, base_margin=float(base.mean()), seconds=time.perf_counter() - t0,
                spearman={m: _spearman([e.weight_z for e in edges if e.mode == m],
                                       [abs(e.effect) for e in edges if e.mode == m]) for m in cfg.modes},
                spearman_attribution={m: _spearman([e.attribution for e in edges if e.mode == m],
                                                   [abs(e.effect) for e in edges if e.mode == m]) for m in cfg.modes})
    logger.info("circuit: %d heads, %d kept edges (%s) in %.1f s", len(heads), sum(e.kept for e in edges), reason,
                meta["seconds"])
    return Circuit(heads=heads, edges=edges, meta=meta)
