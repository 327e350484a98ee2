"""Fit an edit of communication channels: one learnable log-scale per singular component.

The greedy :func:`th_edit.analysis.edit_search.search_edit` tries a handful of components at a few fixed scales.
:func:`fit_edit` instead learns a scale ``alpha_i = exp(theta_i)`` for every singular component of the
chosen heads' circuits (OV by default, QK optional), by gradient descent on

    loss = CE(target among the listed items, at the answer position)
           + guard_weight * KL(unedited || edited) on neutral text   (the guard, th_edit.tasks.guard_text)
           + l1_weight * sum_i |theta_i|,

then keeps the ``k`` largest ``|theta_i|`` (``k`` up to ``budget``), refits only those, and picks ``k`` and
the term weights on ``dev`` (the best dev accuracy whose guard change stays within
``max_guard_change``; a candidate over it is also tried with its log-scales shrunk by each factor of
``guard_shrink``, until one is within). The result is applied as ordinary :class:`th_edit.edits.plan.Edit` s, one per head and
circuit with per-component ``alphas``, so undo/reset, plans, ``from_plan`` and model cards work unchanged.

Exactness. ``scale_component`` changes the OV circuit by ``(alpha - 1) s_i u_i v_i^T`` and writes it into
``W_O[h]`` as ``pinv(W_V^f) u_i (alpha - 1) s_i v_i^T`` (:func:`th_edit.core.linalg.ov_edit_factors`). With all
components at once the change is ``P diag(exp(theta) - 1) V^T``, ``P = pinv(W_V^f) U diag(S)``,
precomputed per head: differentiable in ``theta`` and exact. During fitting it is added by a forward
hook on the output projection (``x_h @ Delta W_O[h]`` for each fitted head ``h``), so the model's
parameters are never written and keep ``requires_grad=False``. QK likewise through ``W_Q[h]``
(:func:`th_edit.core.linalg.qk_edit_factors`, a hook on the query projection). Key/value weights, shared
under grouped-query attention, are never touched.

Speed. Layers below the lowest fitted layer compute the same thing on every step: their output is
cached once per batch (:mod:`th_edit.core.layer_cache`) and neither run again nor differentiated. Only the
answer position's logits are computed for the task loss (``logits_to_keep``).

The facade :meth:`th_edit.ChannelEditor.fit_edit` resolves the settings and heads, calls :func:`fit_edit`
and records the card and the plan; called directly, the fit takes only explicit inputs:

>>> result = fit_edit(editor.layout, editor.log, tokenizer, data["train"], data["dev"],
...                   FitConfig(budget=256))                                                # doctest: +SKIP
>>> result.dev_before, result.dev_after, result.guard_change                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import pandas as pd
import torch

from ..core.layer_cache import reuse_lower_layers
from ..core.layout import AttentionLayout
from ..errors import FitError, FitInterruptedError, InvalidArgumentError
from ..tasks.data import Rows
from ..tasks.evaluate import EvalResult, evaluate
from ..utils.distributed import all_reduce_sum, process_rank_and_count
from ..utils.progress import progress_bar
from .fit_config import FitConfig
from .fit_hooks import ChannelFit, frozen_parameters
from .fit_problem import FitProblem, split_rows, task_ce
from .fit_result import FitResult
from .scale import EditLog

__all__ = ["FitConfig", "FitResult", "Candidate", "fit_edit", "resolve_heads", "ChannelFit"]

logger = logging.getLogger(__name__)


# ----- heads --------------------------------------------------------------------------------------
_HEAD_SPEC = "use 'all', 'upper', 'discovered' (= 'circuit'), 'roles' or a list of (layer, head) pairs"


def resolve_heads(layout: AttentionLayout, spec: Any, findings: Any = None) -> list[tuple[int, int]]:
    """The sorted ``(layer, head)`` list of a head spec: ``"all"``, ``"upper"`` (every head of layers
    ``>= n_layers // 2``: cheaper to fit, the layer cache skips the lower half), ``"discovered"`` or
    ``"circuit"`` (the heads of ``findings``, a :class:`~th_edit.analysis.circuit_discovery.Circuit`; for
    ``"discovered"`` a :class:`~th_edit.analysis.discovery.ChannelFindings` is accepted too), ``"roles"`` (the
    heads of ``findings``, a :class:`~th_edit.analysis.discovery.ChannelFindings`: the paper's three-role
    reading) or explicit pairs. Pure: reads only the layout's geometry."""
    if isinstance(spec, str):
        if spec in ("all", "upper"):
            first = layout.n_layers // 2 if spec == "upper" else 0
            return [(l, h) for l in range(first, layout.n_layers) for h in range(layout.n_heads)]
        if spec == "roles" or (spec == "discovered" and findings is not None and not hasattr(findings, "head_list")):
            if findings is None or not hasattr(findings, "inhibition_heads"):
                raise InvalidArgumentError(
                    f"heads={spec!r} needs the channel findings: pass findings=editor.find_channels(train), "
                    "or call ChannelEditor.fit_edit, which finds them on the train split."
                )
            return findings.heads()
        if spec in ("circuit", "discovered"):
            if findings is None or not hasattr(findings, "head_list"):
                raise InvalidArgumentError(
                    f"heads={spec!r} needs a circuit: pass findings=editor.find_circuit(train), or call "
                    "ChannelEditor.fit_edit, which finds it on the train split."
                )
            heads = findings.head_list()
            if not heads:
                raise InvalidArgumentError(
                    f"the circuit is empty ({findings.meta.get('reason', 'no head found')}), so there is nothing to "
                    "fit: loosen CircuitConfig (direct_fraction, z_min, t_min, min_effect) or name the heads yourself."
                )
            return heads
        raise InvalidArgumentError(f"heads={spec!r} is not a head spec: {_HEAD_SPEC}.")
    try:
        heads = sorted({(int(l), int(h)) for l, h in spec})
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"heads={spec!r} is not a head spec: {_HEAD_SPEC}.") from exc
    if not heads:
        raise InvalidArgumentError("heads=[] names no head: give at least one (layer, head) pair.")
    for l, h in heads:
        layout.check(l, h)
    return heads


def _schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of one fit phase: constant, or cosine from ``lr`` to ``lr / 20``."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=opt.defaults["lr"] / 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _train(problem: FitProblem, fit: ChannelFit, steps: int, guard_weight: float, l1_weight: float, *,
           seed: int, bar, phase: str, lr: float) -> list[float]:
    """Adam on ``fit.theta`` (active entries) for ``steps`` steps; returns the losses."""
    cfg = problem.config
    data = problem.data_from(fit.first_layer())
    cache, train, guard = data.cache, data.train, data.guard
    theta = fit.theta.clone().requires_grad_(True)
    coupling = None if fit.coupling is None else fit.coupling.clone().requires_grad_(True)
    params = [theta] if coupling is None else [theta, coupling]
    opt = torch.optim.Adam(params, lr=lr)
    sched = _schedule(opt, cfg.lr_schedule, steps)
    order: list[int] = []
    rng = random.Random(seed)
    losses = []
    g_per = cfg.guard_texts_per_step
    world = process_rank_and_count()[1]
    for step in range(steps):
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        b = train[order.pop()]
        opt.zero_grad(set_to_none=True)
        with fit.hooks(theta, coupling):
            ce, cl = task_ce(problem, cache, b, theta, world)
            gi = step % len(guard)
            kl = problem.guard_kl(cache, guard[gi], gi * g_per) if guard_weight > 0 else torch.zeros(())
        # under N processes each computes the whole guard and L1 terms: 1/N of them each, summed by the all-reduce
        l1 = (theta * fit.mask).abs().sum()
        if coupling is not None:
            l1 = l1 + (coupling * fit.coupling_mask).abs().sum()
        loss = ce + (guard_weight * kl + l1_weight * l1) / world
        loss.backward()
        for p in params:  # a process holding no prompt of the batch gets no gradient through the couplings
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world > 1:  # one all-reduce of the gradients and the loss: every process takes the same step
            reduced = all_reduce_sum(torch.cat([p.grad.flatten() for p in params] + [loss.detach().reshape(1).to(theta.grad)]))
            offset = 0
            for p in params:
                p.grad.copy_(reduced[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            loss = reduced[-1]
        if not torch.isfinite(loss):
            raise FitError(
                f"the {phase} loss became non-finite at step {step + 1} (ce={float(ce):.4g}, kl={float(kl):.4g}); "
                "the model was left unchanged. Lower FitConfig.lr or max_log_scale, or raise guard_weights."
            )
        theta.grad.mul_(fit.mask)
        if coupling is not None:
            coupling.grad.mul_(fit.coupling_mask)
        opt.step()
        sched.step()
        with torch.no_grad():
            theta.clamp_(-cfg.max_log_scale, cfg.max_log_scale)
            theta.mul_(fit.mask)
            if coupling is not None:
                coupling.clamp_(-cfg.max_log_scale, cfg.max_log_scale).mul_(fit.coupling_mask)
        loss = loss.detach()
        losses.append(float(loss))
        logger.debug("%s step %d/%d: loss %.4f (ce %.4f, kl %.5f)", phase, step + 1, steps, float(loss),
                     float(ce.detach()), float(kl.detach()))
        acc = float((cl.argmax(1) == b.target).float().mean()) if cl is not None else float("nan")
        bar.set_postfix_str(f"{phase} loss={float(loss):.3f} ce={float(ce.detach()):.3f} kl={float(kl.detach()):.4f} train_acc={acc:.2f}")
        bar.update(1)
    fit.theta = theta.detach().clone()
    if coupling is not None:
        fit.coupling = coupling.detach().clone()
    return losses


def _attribution(problem: FitProblem, fit: ChannelFit) -> torch.Tensor:
    """``|theta * dCE/dtheta|`` summed over ``attribution_prompts`` training prompts (seeded batches), at
    the current log-scales."""
    data = problem.data_from(fit.first_layer())
    cache, train = data.cache, data.train
    theta = fit.theta.clone().requires_grad_(True)
    total = torch.zeros_like(fit.theta)
    order = list(range(len(train)))
    random.Random(problem.config.seed).shuffle(order)
    n_batches = max(1, math.ceil(problem.config.attribution_prompts / problem.config.batch_size))
    for b in (train[i] for i in order[:n_batches]):
        if not b.rows:  # this process holds none of the batch's prompts
            continue
        with fit.hooks(theta):
            ce = torch.nn.functional.cross_entropy(problem.candidate_logits(cache, b), b.target, reduction="sum")
        (g,) = torch.autograd.grad(ce, theta)
        total += g
    all_reduce_sum(total)  # each process summed its share of the prompts
    return (fit.theta * total).abs() * fit.mask


def _k_values(config: FitConfig, n_total: int) -> list[int]:
    ks = {max(1, min(n_total, int(round(f * config.budget)))) for f in config.k_fractions}
    return sorted(ks, reverse=True)


def _check(train_rows: list[dict[str, Any]], dev_rows: list[dict[str, Any]]) -> None:
    if len(train_rows) < 2:
        raise InvalidArgumentError(
            f"the train split has {len(train_rows)} example(s); fitting needs at least 2 (use 16 or more)."
        )
    if len(dev_rows) < 1:
        raise InvalidArgumentError("the dev split is empty; k and the term weights are chosen on dev, so give some.")


def _check_dense_from(dense_from: FitResult | None, heads, circuits) -> None:
    if dense_from is None:
        return
    missing = {(l, h, c) for c in circuits for l, h in heads} - set(dense_from.dense)
    if missing:
        raise InvalidArgumentError(
            f"dense_from has no dense fit for {len(missing)} of the chosen head circuits (e.g. {sorted(missing)[0]}); "
            "pass a result fitted on the same heads and circuits, or dense_from=None."
        )


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t


@dataclass
class Candidate:
    """One dev trial of :class:`_Search`: its ranking ``key`` ``(within the guard, dev accuracy or minus the
    guard change, minus its component count)`` (larger is better), the scales tried (``fit``), their dev
    accuracy by length, their guard loss and the trial's row index in ``trials``."""

    key: tuple[bool, float, int]
    fit: ChannelFit
    dev: dict[str, float]
    guard: float
    trial: int

    @property
    def within_guard(self) -> bool:
        return self.key[0]


class _Search:
    """The dev-selected search of :func:`fit_edit`: for each term-weight setting, a dense fit (or the
    one of ``dense_from``), then for each ``k`` a prune-and-refit tried on dev, shrunk while the guard is
    exceeded. Keeps every dev trial and the best candidate: the best dev accuracy within the guard,
    else the smallest guard change; ties go to fewer components."""

    def __init__(self, problem: FitProblem, base: ChannelFit, config: FitConfig, guard_before: float,
                 timings: dict[str, float]) -> None:
        self.problem, self.base, self.config = problem, base, config
        self.guard_before, self.timings = guard_before, timings
        self.n_total = base.n_active
        self.ks = _k_values(config, self.n_total)
        self.trials: list[dict[str, Any]] = []
        self.dense: dict[tuple[int, int, str], torch.Tensor] = {}
        self.best: Candidate | None = None

    def total_steps(self) -> int:
        c = self.config
        refits = sum(c.rounds for k in self.ks if k < self.n_total)
        return len(c.guard_weights) * len(c.l1_weights) * (c.steps + refits * c.refit_steps)

    def run(self, bar, dense_from: FitResult | None) -> None:
        for gw in self.config.guard_weights:
            for l1 in self.config.l1_weights:
                self._setting(bar, gw, l1, dense_from)

    def _setting(self, bar, gw: float, l1: float, dense_from: FitResult | None) -> None:
        cfg, problem = self.config, self.problem
        fit = self.base.copy()
        with _timed(self.timings, "dense_fit"):
            if dense_from is not None:
                fit.theta = torch.stack([dense_from.dense[(u.layer, u.head, u.circuit)] for u in fit.units])
                bar.update(cfg.steps)
            else:
                _train(problem, fit, cfg.steps, gw, l1, seed=cfg.seed, bar=bar, phase="dense", lr=cfg.lr)
        if not self.dense:
            self.dense = {(u.layer, u.head, u.circuit): fit.theta[i].clone() for i, u in enumerate(fit.units)}
        importance = None
        if cfg.rank_by == "attribution" and any(k < self.n_total for k in self.ks):
            with _timed(self.timings, "attribution"):
                importance = _attribution(problem, fit)
        for k in self.ks:
            cand = self.base.copy()
            cand.theta = fit.theta.clone()
            with _timed(self.timings, "refit"):
                if k < self.n_total:
                    sizes = [min(self.n_total, k * 4 ** (cfg.rounds - 1 - r)) for r in range(cfg.rounds)]
                    for r, size in enumerate(sizes):
                        by = cfg.rank_by if r == 0 or cfg.rank_by != "attribution" else "effect"
                        cand.keep_top(size, by=by, importance=importance)
                        if cfg.coupling_band and r == len(sizes) - 1:
                            cand.enable_couplings(cfg.coupling_band)
                        _train(problem, cand, cfg.refit_steps, gw, l1, seed=cfg.seed + 1, bar=bar,
                               phase=f"refit k={size}", lr=cfg.refit_lr)
            with _timed(self.timings, "dev_selection"):
                self._try_on_dev(bar, cand, gw, l1)

    def _try_on_dev(self, bar, cand: ChannelFit, gw: float, l1: float) -> None:
        """Dev accuracy and guard of ``cand``, then of its log-scales shrunk by each ``guard_shrink``
        factor (toward scale 1) until the guard change is within ``max_guard_change``."""
        fitted = cand.theta.clone()
        coupled = None if cand.coupling is None else cand.coupling.clone()
        for shrink in (1.0, *self.config.guard_shrink):
            cand.theta = fitted * shrink
            if coupled is not None:
                cand.coupling = coupled * shrink
            acc = self.problem.dev_accuracy(cand)
            guard = self.problem.guard(cand)
            change = guard / self.guard_before - 1.0
            row = {"guard_weight": gw, "l1_weight": l1, "k": cand.n_active, "couplings": cand.n_couplings, "shrink": shrink,
                   "dev_accuracy": acc["all"], "guard_change": change, "chosen": False,
                   **{f"dev_{n}": v for n, v in acc.items() if n != "all"}}
            self.trials.append(row)
            bar.set_postfix_str(f"k={cand.n_active} x{shrink:g} dev_acc={acc['all']:.3f} guard={change:+.2%}")
            ok = change <= self.config.max_guard_change
            key = (ok, acc["all"] if ok else -change, -cand.n_active)
            if self.best is None or key > self.best.key:
                self.best = Candidate(key, cand.copy(), acc, guard, len(self.trials) - 1)
            if ok:
                return


def _fit_data(train_rows, dev_rows) -> dict[str, Any]:
    return {
        "n_train": len(train_rows), "n_dev": len(dev_rows),
        "train_lengths": sorted({int(r.get("list_length", len(r["items"]))) for r in train_rows}),
        "train_templates": sorted({str(r.get("template", "")) for r in train_rows}),
        "train_items": len({w for r in train_rows for w in r["items"]}),
    }


def _evaluation_record(result: FitResult, config: FitConfig, test_given: bool) -> dict[str, Any]:
    """The model card's evaluation record (:attr:`FitResult.evaluation`): test accuracy by length when a test
    split was given, else dev accuracy."""
    fd, heads = result.fit_data, result.heads
    if test_given:
        split = "test"
        before = {int(k): v for k, v in result.test_before.items()}
        after = {int(k): v for k, v in result.test_after.items()}
    else:
        split = "dev"
        before = {int(k): v for k, v in result.dev_before.items() if k != "all"}
        after = {int(k): v for k, v in result.dev_after.items() if k != "all"}
    note = (f"Accuracy on the {split} split by list length, before and after a fitted edit of "
            f"{result.n_components} singular components in {len(result.edits)} head circuits (th_edit.edits.fit, "
            f"budget {config.budget}, heads {config.heads if isinstance(config.heads, str) else len(heads)}). "
            f"Fitted on {fd['n_train']} prompts (templates {', '.join(fd['train_templates'])}; "
            f"lengths {fd['train_lengths']}); k and term weights chosen on {fd['n_dev']} dev prompts "
            f"(dev accuracy {result.dev_before['all']:.3f} -> {result.dev_after['all']:.3f}). Guard loss on neutral "
            f"text {result.guard_before:.4f} -> {result.guard_after:.4f} ({result.guard_change:+.2%}).")
    return {"before": before, "after": after, "note": note}


@contextmanager
def _all_or_nothing(log: EditLog) -> Iterator[None]:
    """Edits applied through ``log`` inside the block are undone, newest first, if it raises (the model is
    then bit-identical to before); Ctrl-C becomes :class:`FitInterruptedError` (still a KeyboardInterrupt)."""
    n_before = len(log)
    try:
        yield
    except BaseException as exc:
        while len(log) > n_before:
            log.undo()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, FitInterruptedError):
            raise FitInterruptedError("fitting was interrupted; the model was left exactly as it was.") from exc
        raise


def _apply_or_roll_back(log: EditLog, edits: list) -> None:
    """Apply ``edits`` through ``log``; if one fails, the ones already written are undone."""
    with _all_or_nothing(log):
        for e in edits:
            log.apply(e)


@contextmanager
def _test_split_reuse(model: torch.nn.Module, layout: AttentionLayout, first: int, test: Rows | None):
    """Reuse of the layers below ``first`` between the test evaluations before and after the fit (the edit
    changes layers ``>= first`` only); None when there is no test split."""
    if test is None:
        yield None
        return
    with reuse_lower_layers(model, layout, first) as reuse:
        yield reuse


def _evaluate_test(model, tokenizer, test: Rows | None, config: FitConfig, when: str) -> EvalResult | None:
    if test is None:
        return None
    return evaluate(model, tokenizer, test, progress=config.progress, desc=f"test ({when})")


def _search(problem: FitProblem, base: ChannelFit, config: FitConfig, dense_from: FitResult | None,
            timings: dict[str, float]) -> tuple[_Search, dict[str, float]]:
    """Run the dev-selected search; returns it (with the chosen :class:`Candidate` marked) and the dev
    accuracy before the fit."""
    torch.manual_seed(config.seed)
    with _timed(timings, "setup"):
        dev_before = problem.dev_accuracy(None, layer=base.first_layer())  # the cache the dense fit uses
        guard_before = problem.guard(None, layer=base.first_layer())
    search = _Search(problem, base, config, guard_before, timings)
    with progress_bar(total=search.total_steps(), desc="fitting channel scales", enabled=config.progress) as bar:
        search.run(bar, dense_from)
    best = search.best
    search.trials[best.trial]["chosen"] = True
    if not best.within_guard:
        logger.warning("no dev candidate kept the guard change within %.2g; chose the one with the smallest "
                       "guard change (%+.2f%%)", config.max_guard_change, 100 * (best.guard / guard_before - 1.0))
    return search, dev_before


def _result(search: _Search, edits: list, dev_before: dict[str, float], config: FitConfig, heads: list,
            fit_data: dict[str, Any], timings: dict[str, float], tests: dict[str, EvalResult | None]) -> FitResult:
    """The :class:`FitResult` of a finished search, with the model card's evaluation record."""
    best = search.best
    by_length = {k: ({str(n): v for n, v in r.accuracy_by_length().items()} if r is not None else None)
                 for k, r in tests.items()}
    result = FitResult(
        edits=edits, components=best.fit.component_table(), dev_before=dev_before, dev_after=best.dev,
        guard_before=search.guard_before, guard_after=best.guard, trials=pd.DataFrame(search.trials),
        dense=search.dense, config=config, fit_data=fit_data, timings=timings, heads=heads,
        test_before=by_length["before"] or None, test_after=by_length["after"] or None,
        test_results=tests if tests["before"] is not None else None,
    )
    result.evaluation = _evaluation_record(result, config, tests["before"] is not None)
    return result


def fit_edit(layout: AttentionLayout, log: EditLog, tokenizer: Any, train: Rows, dev: Rows,
             config: FitConfig | None = None, *, heads: Any = None, test: Rows | None = None,
             dense_from: FitResult | None = None, folded: bool = True) -> FitResult:
    """Fit per-component scales on ``train``, choose ``k`` and the term weights on ``dev``, apply the edit.

    Args:
        layout: the model's :class:`AttentionLayout` (``layout.model`` is fitted).
        log: the model's :class:`EditLog`; the chosen edits are applied through it (``log.reset()`` or
            ``undo()`` removes them).
        tokenizer: the model's tokenizer.
        train, dev: Laundry List splits (rows with ``prompt``, ``items``, ``target``; see :mod:`th_edit.data`).
        config: a :class:`FitConfig` (validated when built; :meth:`FitConfig.with_overrides` changes fields).
        heads: ``(layer, head)`` pairs or a head spec (see :func:`resolve_heads`); default ``config.heads``
            (``"discovered"`` needs resolving first: ``resolve_heads(layout, "discovered", findings)``).
        test: optional split evaluated once, before and after, for the report and the model card
            (never used to choose anything).
        dense_from: a previous :class:`FitResult` on the same heads and circuits whose dense fit is
            reused (its log-scales start every setting's prune-and-refit; the dense phase is skipped),
            e.g. to try several budgets without refitting the dense model.
        folded: the circuits' folding when ``config.folded`` is None.

    Returns:
        :class:`FitResult`, with :attr:`FitResult.evaluation` for the model card (the caller records it).

    Raises:
        InvalidArgumentError: bad splits, budget, circuits or head spec (nothing changed).
        FitError: the loss became non-finite (nothing changed).
        FitInterruptedError: Ctrl-C anywhere, the test evaluations included (nothing changed, the
            ``requires_grad`` flags restored; also a ``KeyboardInterrupt``).
    """
    config = FitConfig() if config is None else config
    train_rows, dev_rows = split_rows(train, "train"), split_rows(dev, "dev")
    _check(train_rows, dev_rows)
    heads = resolve_heads(layout, config.heads if heads is None else heads)
    _check_dense_from(dense_from, heads, config.circuits)
    config.check_coupling_memory(len(heads), layout.d_head)
    folded = bool(folded) if config.folded is None else bool(config.folded)
    model, timings = layout.model, {}
    first = min(l for l, _ in heads)
    with _all_or_nothing(log), _test_split_reuse(model, layout, first, test) as reuse:
        test_before = _evaluate_test(model, tokenizer, test, config, "before")
        t0 = time.perf_counter()
        with reuse.paused() if reuse is not None else nullcontext(), frozen_parameters(model):
            problem = FitProblem(model, layout, tokenizer, train_rows, dev_rows, config)
            search, dev_before = _search(problem, ChannelFit(layout, heads, config.circuits, folded), config,
                                         dense_from, timings)
            edits = search.best.fit.edits()
            _apply_or_roll_back(log, edits)
        timings["total_fit"] = time.perf_counter() - t0
        test_after = _evaluate_test(model, tokenizer, test, config, "after")
    result = _result(search, edits, dev_before, config, heads, _fit_data(train_rows, dev_rows), timings,
                     {"before": test_before, "after": test_after})
    logger.info("fitted %d components in %.1f s: dev %.3f -> %.3f, guard %+.2f%%", result.n_components,
                timings["total_fit"], dev_before["all"], result.dev_after["all"], 100 * result.guard_change)
    return result
