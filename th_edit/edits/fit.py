"""Fit an edit of communication channels: one learnable log-scale per singular component.

The greedy :func:`th_edit.discovery.search_edit` tries a handful of components at a few fixed scales.
:func:`fit_edit` instead learns a scale ``alpha_i = exp(theta_i)`` for every singular component of the
chosen heads' circuits (OV by default, QK optional), by gradient descent on

    loss = CE(target among the listed items, at the answer position)
           + guard_weight * KL(unedited || edited) on neutral text   (the guard, th_edit.guard_text)
           + l1_weight * sum_i |theta_i|,

then keeps the ``k`` largest ``|theta_i|`` (``k`` up to ``budget``), refits only those, and picks ``k`` and
the term weights on ``dev`` (the best dev accuracy whose guard change stays within
``max_guard_change``; a candidate over it is also tried with its log-scales shrunk by each factor of
``guard_shrink``, until one is within). The result is applied as ordinary :class:`th_edit.plan.Edit` s, one per head and
circuit with per-component ``alphas``, so undo/reset, plans, ``from_plan`` and model cards work unchanged.

Exactness. ``scale_component`` changes the OV circuit by ``(alpha - 1) s_i u_i v_i^T`` and writes it into
``W_O[h]`` as ``pinv(W_V^f) u_i (alpha - 1) s_i v_i^T`` (:func:`th_edit.linalg.ov_edit_factors`). With all
components at once the change is ``P diag(exp(theta) - 1) V^T``, ``P = pinv(W_V^f) U diag(S)``,
precomputed per head: differentiable in ``theta`` and exact. During fitting it is added by a forward
hook on the output projection (``x_h @ Delta W_O[h]`` for each fitted head ``h``), so the model's
parameters are never written and keep ``requires_grad=False``. QK likewise through ``W_Q[h]``
(:func:`th_edit.linalg.qk_edit_factors`, a hook on the query projection). Key/value weights, shared
under grouped-query attention, are never touched.

Speed. Layers below the lowest fitted layer compute the same thing on every step: their output is
cached once per batch (:mod:`th_edit.layer_cache`) and neither run again nor differentiated. Only the
answer position's logits are computed for the task loss (``logits_to_keep``).

>>> result = fit_edit(editor, tokenizer, data["train"], data["dev"], FitConfig(budget=256))  # doctest: +SKIP
>>> result.dev_before, result.dev_after, result.guard_change                               # doctest: +SKIP
>>> editor.export_plan().save("plan")                                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd
import torch

from ..errors import FitError, FitInterruptedError, InvalidArgumentError
from ..tasks.evaluate import evaluate
from ..utils.progress import progress_bar
from .fit_config import FitConfig, FitResult
from ..utils.distributed import all_reduce_sum, process_rank_and_count
from .fit_data import FitProblem, split_rows, task_ce
from .reparam import ChannelFit

__all__ = ["FitConfig", "FitResult", "fit_edit", "resolve_heads", "ChannelFit"]

logger = logging.getLogger(__name__)


# ----- heads --------------------------------------------------------------------------------------
def resolve_heads(editor, spec: Any, *, findings=None, tokenizer=None, train=None) -> list[tuple[int, int]]:
    """The ``(layer, head)`` list of a head spec: ``"all"``, ``"upper"`` (every head of layers
    ``>= n_layers // 2``: cheaper to fit, the layer cache skips the lower half), ``"discovered"`` or
    explicit pairs."""
    if isinstance(spec, str):
        if spec in ("all", "upper"):
            first = editor.n_layers // 2 if spec == "upper" else 0
            return [(l, h) for l in range(first, editor.n_layers) for h in range(editor.n_heads)]
        if spec == "discovered":
            if findings is None:
                raise InvalidArgumentError(
                    "heads='discovered' needs the channel findings: pass findings=editor.find_channels(train), "
                    "or call ChannelEditor.fit_edit, which finds them on the train split."
                )
            return findings.heads()
        raise InvalidArgumentError(
            f"heads={spec!r} is not a head spec: use 'all', 'upper', 'discovered' or a list of (layer, head) pairs."
        )
    try:
        heads = sorted({(int(l), int(h)) for l, h in spec})
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"heads={spec!r} is not a head spec: use 'all', 'upper', 'discovered' or a list of (layer, head) pairs."
        ) from exc
    if not heads:
        raise InvalidArgumentError("heads=[] names no head: give at least one (layer, head) pair.")
    for l, h in heads:
        editor.layout.check(l, h)
    return heads


def _train(problem: FitProblem, fit: ChannelFit, steps: int, guard_weight: float, l1_weight: float, *,
           seed: int, bar, phase: str, lr: float) -> list[float]:
    """Adam on ``fit.theta`` (active entries) for ``steps`` steps; returns the losses."""
    cfg = problem.config
    cache, train, _, guard = problem.data_from(fit.first_layer())
    theta = fit.theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
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
        with fit.hooks(theta):
            ce, cl = task_ce(problem, cache, b, theta, world)
            gi = step % len(guard)
            kl = problem.guard_kl(cache, guard[gi], gi * g_per) if guard_weight > 0 else torch.zeros(())
        # under N processes each computes the whole guard and L1 terms: 1/N of them each, summed by the all-reduce
        loss = ce + (guard_weight * kl + l1_weight * (theta * fit.mask).abs().sum()) / world
        loss.backward()
        if world > 1:  # one all-reduce of the gradient and the loss: every process takes the same step
            reduced = all_reduce_sum(torch.cat([theta.grad.flatten(), loss.detach().reshape(1).to(theta.grad)]))
            theta.grad.copy_(reduced[:-1].view_as(theta.grad))
            loss = reduced[-1]
        if not torch.isfinite(loss):
            raise FitError(
                f"the {phase} loss became non-finite at step {step + 1} (ce={float(ce):.4g}, kl={float(kl):.4g}); "
                "the model was left unchanged. Lower FitConfig.lr or max_log_scale, or raise guard_weights."
            )
        theta.grad.mul_(fit.mask)
        opt.step()
        with torch.no_grad():
            theta.clamp_(-cfg.max_log_scale, cfg.max_log_scale)
            theta.mul_(fit.mask)
        loss = loss.detach()
        losses.append(float(loss))
        logger.debug("%s step %d/%d: loss %.4f (ce %.4f, kl %.5f)", phase, step + 1, steps, float(loss),
                     float(ce.detach()), float(kl.detach()))
        acc = float((cl.argmax(1) == b.target).float().mean()) if cl is not None else float("nan")
        bar.set_postfix_str(f"{phase} loss={float(loss):.3f} ce={float(ce.detach()):.3f} kl={float(kl.detach()):.4f} train_acc={acc:.2f}")
        bar.update(1)
    fit.theta = theta.detach().clone()
    return losses


def _attribution(problem: FitProblem, fit: ChannelFit) -> torch.Tensor:
    """``|theta * dCE/dtheta|`` summed over ``attribution_prompts`` training prompts (seeded batches), at
    the current log-scales."""
    cache, train, _, _ = problem.data_from(fit.first_layer())
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


def _check(train_rows, dev_rows, config: FitConfig) -> None:
    if len(train_rows) < 2:
        raise InvalidArgumentError(
            f"the train split has {len(train_rows)} example(s); fitting needs at least 2 (use 16 or more)."
        )
    if len(dev_rows) < 1:
        raise InvalidArgumentError("the dev split is empty; k and the term weights are chosen on dev, so give some.")
    config.validate()


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
        self.best: tuple | None = None  # (key, candidate, dev accuracy, guard, trial index)

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
                        _train(problem, cand, cfg.refit_steps, gw, l1, seed=cfg.seed + 1, bar=bar,
                               phase=f"refit k={size}", lr=cfg.refit_lr)
            with _timed(self.timings, "dev_selection"):
                self._try_on_dev(bar, cand, gw, l1)

    def _try_on_dev(self, bar, cand: ChannelFit, gw: float, l1: float) -> None:
        """Dev accuracy and guard of ``cand``, then of its log-scales shrunk by each ``guard_shrink``
        factor (toward scale 1) until the guard change is within ``max_guard_change``."""
        fitted = cand.theta.clone()
        for shrink in (1.0, *self.config.guard_shrink):
            cand.theta = fitted * shrink
            acc = self.problem.dev_accuracy(cand)
            guard = self.problem.guard(cand)
            change = guard / self.guard_before - 1.0
            row = {"guard_weight": gw, "l1_weight": l1, "k": cand.n_active, "shrink": shrink,
                   "dev_accuracy": acc["all"], "guard_change": change, "chosen": False,
                   **{f"dev_{n}": v for n, v in acc.items() if n != "all"}}
            self.trials.append(row)
            bar.set_postfix_str(f"k={cand.n_active} x{shrink:g} dev_acc={acc['all']:.3f} guard={change:+.2%}")
            ok = change <= self.config.max_guard_change
            key = (ok, acc["all"] if ok else -change, -cand.n_active)
            if self.best is None or key > self.best[0]:
                self.best = (key, cand.copy(), acc, guard, len(self.trials) - 1)
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
    """``editor.evaluation`` for the model card: test accuracy by length when a test split was given,
    else dev accuracy."""
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
            f"{result.n_components} singular components in {len(result.edits)} head circuits (th_edit.fit, "
            f"budget {config.budget}, heads {config.heads if isinstance(config.heads, str) else len(heads)}). "
            f"Fitted on {fd['n_train']} prompts (templates {', '.join(fd['train_templates'])}; "
            f"lengths {fd['train_lengths']}); k and term weights chosen on {fd['n_dev']} dev prompts "
            f"(dev accuracy {result.dev_before['all']:.3f} -> {result.dev_after['all']:.3f}). Guard loss on neutral "
            f"text {result.guard_before:.4f} -> {result.guard_after:.4f} ({result.guard_change:+.2%}).")
    return {"before": before, "after": after, "note": note}


def _state_fingerprint(model) -> list[tuple[str, bool]]:
    return [(n, p.requires_grad) for n, p in model.named_parameters()]


def fit_edit(editor, tokenizer, train, dev, config: FitConfig | None = None, *, test=None, findings=None,
             dense_from: FitResult | None = None, **overrides: Any) -> FitResult:
    """Fit per-component scales on ``train``, choose ``k`` and the term weights on ``dev``, apply the edit.

    Args:
        editor: a :class:`th_edit.ChannelEditor`; the chosen edits are applied to it (``editor.reset()``
            or ``undo()`` removes them).
        tokenizer: the model's tokenizer.
        train, dev: Laundry List splits (rows with ``prompt``, ``items``, ``target``; see :mod:`th_edit.data`).
        config: a :class:`FitConfig`; keyword ``overrides`` replace its fields (``budget=64``...).
        test: optional split evaluated once, before and after, for the report and the model card
            (never used to choose anything).
        findings: :class:`th_edit.analysis.discovery.ChannelFindings` for ``heads="discovered"``
            (:meth:`th_edit.ChannelEditor.fit_edit` finds them on ``train`` when omitted).
        dense_from: a previous :class:`FitResult` on the same heads and circuits whose dense fit is
            reused (its log-scales start every setting's prune-and-refit; the dense phase is skipped),
            e.g. to try several budgets without refitting the dense model.

    Returns:
        :class:`FitResult`; ``editor.evaluation`` is filled for the model card.

    Raises:
        InvalidArgumentError: bad splits, budget, circuits or head spec (nothing changed).
        FitError: the loss became non-finite (nothing changed).
        FitInterruptedError: Ctrl-C while fitting (nothing changed; also a ``KeyboardInterrupt``).
    """
    config = FitConfig() if config is None else config
    if overrides:
        config = FitConfig.from_dict({**config.to_dict(), **overrides})
    train_rows, dev_rows = split_rows(train, "train"), split_rows(dev, "dev")
    _check(train_rows, dev_rows, config)
    heads = resolve_heads(editor, config.heads, findings=findings, tokenizer=tokenizer, train=train)
    _check_dense_from(dense_from, heads, config.circuits)
    folded = editor.folded if config.folded is None else bool(config.folded)
    model = editor.model
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    grad_flags = _state_fingerprint(model)
    was_training = model.training
    n_applied = 0
    test_before = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        if test is not None:
            test_before = evaluate(model, tokenizer, test, progress=False).accuracy_by_length()
        torch.manual_seed(config.seed)
        with _timed(timings, "setup"):
            problem = FitProblem(editor, tokenizer, train_rows, dev_rows, config)
            base = ChannelFit(editor, heads, config.circuits, folded)
            dev_before = problem.dev_accuracy(None, layer=base.first_layer())  # the cache the dense fit uses
            guard_before = problem.guard(None, layer=base.first_layer())
        search = _Search(problem, base, config, guard_before, timings)
        with progress_bar(total=search.total_steps(), desc="fitting channel scales", enabled=config.progress) as bar:
            search.run(bar, dense_from)
        (within_guard, *_), chosen, dev_after, guard_after, ti = search.best
        search.trials[ti]["chosen"] = True
        if not within_guard:
            logger.warning("no dev candidate kept the guard change within %.2g; chose the one with the smallest "
                           "guard change (%+.2f%%)", config.max_guard_change, 100 * (guard_after / guard_before - 1.0))
        edits = chosen.edits()
        for e in edits:
            editor.apply_edit(e)
            n_applied += 1
    except KeyboardInterrupt as exc:
        for _ in range(n_applied):
            editor.undo()
        raise FitInterruptedError("fitting was interrupted; the model was left exactly as it was.") from exc
    except BaseException:
        for _ in range(n_applied):
            editor.undo()
        raise
    finally:
        for (name, flag), (_, p) in zip(grad_flags, model.named_parameters()):
            p.requires_grad_(flag)
        model.train(was_training)
    timings["total_fit"] = time.perf_counter() - t0
    test_after = None
    if test is not None:
        test_after = evaluate(model, tokenizer, test, progress=False).accuracy_by_length()
    result = FitResult(
        edits=edits, components=chosen.component_table(), dev_before=dev_before, dev_after=dev_after,
        guard_before=guard_before, guard_after=guard_after, trials=pd.DataFrame(search.trials), dense=search.dense,
        config=config, fit_data=_fit_data(train_rows, dev_rows), timings=timings, heads=heads,
        test_before={str(k): v for k, v in test_before.items()} if test_before else None,
        test_after={str(k): v for k, v in test_after.items()} if test_after else None,
    )
    result.plan = editor.export_plan()
    editor.evaluation = _evaluation_record(result, config, test is not None)
    logger.info("fitted %d components in %.1f s: dev %.3f -> %.3f, guard %+.2f%%", result.n_components,
                timings["total_fit"], dev_before["all"], dev_after["all"], 100 * result.guard_change)
    return result
