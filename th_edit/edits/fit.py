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
from typing import Any

import pandas as pd
import torch

from ..errors import FitError, FitInterruptedError, InvalidArgumentError
from ..tasks.evaluate import evaluate
from ..utils.progress import progress_bar
from .fit_config import FitConfig, FitResult
from .fit_data import FitProblem, split_rows
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
    for step in range(steps):
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        b = train[order.pop()]
        opt.zero_grad(set_to_none=True)
        with fit.hooks(theta):
            cl = problem.candidate_logits(cache, b)
            ce = torch.nn.functional.cross_entropy(cl, b.target)
            gi = step % len(guard)
            kl = problem.guard_kl(cache, guard[gi], gi * g_per) if guard_weight > 0 else torch.zeros(())
        loss = ce + guard_weight * kl + l1_weight * (theta * fit.mask).abs().sum()
        if not torch.isfinite(loss):
            raise FitError(
                f"the {phase} loss became non-finite at step {step + 1} (ce={float(ce):.4g}, kl={float(kl):.4g}); "
                "the model was left unchanged. Lower FitConfig.lr or max_log_scale, or raise guard_weights."
            )
        loss.backward()
        theta.grad.mul_(fit.mask)
        opt.step()
        with torch.no_grad():
            theta.clamp_(-cfg.max_log_scale, cfg.max_log_scale)
            theta.mul_(fit.mask)
        loss = loss.detach()
        losses.append(float(loss))
        logger.debug("%s step %d/%d: loss %.4f (ce %.4f, kl %.5f)", phase, step + 1, steps, float(loss),
                     float(ce.detach()), float(kl.detach()))
        acc = float((cl.argmax(1) == b.target).float().mean())
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
        with fit.hooks(theta):
            ce = torch.nn.functional.cross_entropy(problem.candidate_logits(cache, b), b.target, reduction="sum")
        (g,) = torch.autograd.grad(ce, theta)
        total += g
    return (fit.theta * total).abs() * fit.mask


def _k_values(config: FitConfig, n_total: int) -> list[int]:
    ks = {max(1, min(n_total, int(round(f * config.budget)))) for f in config.k_fractions}
    return sorted(ks, reverse=True)


def _check(editor, train_rows, dev_rows, config: FitConfig) -> None:
    if len(train_rows) < 2:
        raise InvalidArgumentError(
            f"the train split has {len(train_rows)} example(s); fitting needs at least 2 (use 16 or more)."
        )
    if len(dev_rows) < 1:
        raise InvalidArgumentError("the dev split is empty; k and the term weights are chosen on dev, so give some.")
    if isinstance(config.budget, bool) or not isinstance(config.budget, int) or config.budget < 1:
        raise InvalidArgumentError(f"budget={config.budget!r} must be an integer >= 1 (components to keep).")
    for c in config.circuits:
        if c not in ("ov", "qk"):
            raise InvalidArgumentError(f"circuit {c!r} is not one of ('ov', 'qk').")
    if not config.circuits:
        raise InvalidArgumentError("circuits=() names no circuit: use ('ov',), ('qk',) or both.")
    for name in ("steps", "refit_steps", "rounds", "batch_size", "guard_tokens", "guard_texts_per_step",
                 "attribution_prompts"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < (0 if name == "refit_steps" else 1):
            raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive integer.")
    for name in ("lr", "refit_lr"):
        v = getattr(config, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive finite number.")
    if config.rank_by not in ("attribution", "effect", "log_scale"):
        raise InvalidArgumentError(
            f"FitConfig.rank_by={config.rank_by!r} must be 'attribution', 'effect' or 'log_scale'.")
    if any(not (isinstance(f, (int, float)) and 0 < f < 1) for f in config.guard_shrink):
        raise InvalidArgumentError(f"FitConfig.guard_shrink={config.guard_shrink!r}: each factor must lie in (0, 1).")
    if not config.k_fractions or not config.guard_weights or not config.l1_weights:
        raise InvalidArgumentError("k_fractions, guard_weights and l1_weights each need at least one value.")


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
    _check(editor, train_rows, dev_rows, config)
    heads = resolve_heads(editor, config.heads, findings=findings, tokenizer=tokenizer, train=train)
    if dense_from is not None:
        missing = {(l, h, c) for c in config.circuits for l, h in heads} - set(dense_from.dense)
        if missing:
            raise InvalidArgumentError(
                f"dense_from has no dense fit for {len(missing)} of the chosen head circuits (e.g. {sorted(missing)[0]}); "
                "pass a result fitted on the same heads and circuits, or dense_from=None."
            )
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
        problem = FitProblem(editor, tokenizer, train_rows, dev_rows, config)
        logger.debug("setup: guard reference after %.1f s", time.perf_counter() - t0)
        base = ChannelFit(editor, heads, config.circuits, folded)
        logger.debug("setup: factors of %d head circuits after %.1f s", len(base.units), time.perf_counter() - t0)
        n_total = base.n_active
        ks = _k_values(config, n_total)
        dev_before = problem.dev_accuracy(None, layer=base.first_layer())  # the cache the dense fit uses
        logger.debug("setup: dev baseline after %.1f s", time.perf_counter() - t0)
        guard_before = problem.guard(None, layer=base.first_layer())
        logger.debug("setup: guard baseline after %.1f s", time.perf_counter() - t0)
        timings["setup"] = time.perf_counter() - t0
        n_settings = len(config.guard_weights) * len(config.l1_weights)
        refits = sum(config.rounds for k in ks if k < n_total)
        total = n_settings * (config.steps + refits * config.refit_steps)
        trials, dense, best = [], {}, None
        with progress_bar(total=total, desc="fitting channel scales", enabled=config.progress) as bar:
            for gw in config.guard_weights:
                for l1 in config.l1_weights:
                    fit = base.copy()
                    t1 = time.perf_counter()
                    if dense_from is not None:
                        fit.theta = torch.stack([dense_from.dense[(u.layer, u.head, u.circuit)] for u in fit.units])
                        bar.update(config.steps)
                    else:
                        _train(problem, fit, config.steps, gw, l1, seed=config.seed, bar=bar, phase="dense", lr=config.lr)
                    timings.setdefault("dense_fit", 0.0)
                    timings["dense_fit"] += time.perf_counter() - t1
                    if not dense:
                        dense = {(u.layer, u.head, u.circuit): fit.theta[i].clone() for i, u in enumerate(fit.units)}
                    dense_theta = fit.theta.clone()
                    importance = None
                    if config.rank_by == "attribution" and any(k < n_total for k in ks):
                        t1 = time.perf_counter()
                        importance = _attribution(problem, fit)
                        timings["attribution"] = timings.get("attribution", 0.0) + time.perf_counter() - t1
                    for k in ks:
                        cand = base.copy()
                        cand.theta = dense_theta.clone()
                        t1 = time.perf_counter()
                        if k < n_total:
                            sizes = [min(n_total, k * 4 ** (config.rounds - 1 - r)) for r in range(config.rounds)]
                            for r_, size in enumerate(sizes):
                                cand.keep_top(size, by=config.rank_by if r_ == 0 or config.rank_by != "attribution"
                                              else "effect", importance=importance)
                                _train(problem, cand, config.refit_steps, gw, l1, seed=config.seed + 1, bar=bar,
                                       phase=f"refit k={size}", lr=config.refit_lr)
                        timings.setdefault("refit", 0.0)
                        timings["refit"] += time.perf_counter() - t1
                        t1 = time.perf_counter()
                        fitted = cand.theta.clone()
                        for shrink in (1.0, *config.guard_shrink):
                            cand.theta = fitted * shrink  # scaled back toward 1 when the guard is exceeded
                            acc = problem.dev_accuracy(cand)
                            g = problem.guard(cand)
                            row = {"guard_weight": gw, "l1_weight": l1, "k": cand.n_active, "shrink": shrink,
                                   "dev_accuracy": acc["all"], "guard_change": g / guard_before - 1.0, "chosen": False,
                                   **{f"dev_{n}": v for n, v in acc.items() if n != "all"}}
                            trials.append(row)
                            bar.set_postfix_str(f"k={cand.n_active} x{shrink:g} dev_acc={acc['all']:.3f} "
                                                f"guard={row['guard_change']:+.2%}")
                            ok = row["guard_change"] <= config.max_guard_change
                            key = (ok, acc["all"] if ok else -row["guard_change"], -cand.n_active)
                            if best is None or key > best[0]:
                                best = (key, cand.copy(), acc, g, len(trials) - 1)
                            if ok:
                                break
                        timings.setdefault("dev_selection", 0.0)
                        timings["dev_selection"] += time.perf_counter() - t1
        _, chosen, dev_after, guard_after, ti = best
        trials[ti]["chosen"] = True
        if not best[0][0]:
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
    fit_data = {
        "n_train": len(train_rows), "n_dev": len(dev_rows),
        "train_lengths": sorted({int(r.get("list_length", len(r["items"]))) for r in train_rows}),
        "train_templates": sorted({str(r.get("template", "")) for r in train_rows}),
        "train_items": len({w for r in train_rows for w in r["items"]}),
    }
    result = FitResult(
        edits=edits, components=chosen.component_table(), dev_before=dev_before, dev_after=dev_after,
        guard_before=guard_before, guard_after=guard_after, trials=pd.DataFrame(trials), dense=dense, config=config,
        fit_data=fit_data, timings=timings, heads=heads,
        test_before={str(k): v for k, v in test_before.items()} if test_before else None,
        test_after={str(k): v for k, v in test_after.items()} if test_after else None,
    )
    result.plan = editor.export_plan()
    split, before, after = (("test", test_before, test_after) if test is not None
                            else ("dev", {int(k): v for k, v in dev_before.items() if k != "all"},
                                  {int(k): v for k, v in dev_after.items() if k != "all"}))
    editor.evaluation = {
        "before": before, "after": after,
        "note": (f"Accuracy on the {split} split by list length, before and after a fitted edit of "
                 f"{result.n_components} singular components in {len(edits)} head circuits (th_edit.fit, "
                 f"budget {config.budget}, heads {config.heads if isinstance(config.heads, str) else len(heads)}). "
                 f"Fitted on {fit_data['n_train']} prompts (templates {', '.join(fit_data['train_templates'])}; "
                 f"lengths {fit_data['train_lengths']}); k and term weights chosen on {fit_data['n_dev']} dev prompts "
                 f"(dev accuracy {dev_before['all']:.3f} -> {dev_after['all']:.3f}). Guard loss on neutral text "
                 f"{guard_before:.4f} -> {guard_after:.4f} ({result.guard_change:+.2%})."),
    }
    logger.info("fitted %d components in %.1f s: dev %.3f -> %.3f, guard %+.2f%%", result.n_components,
                timings["total_fit"], dev_before["all"], dev_after["all"], 100 * result.guard_change)
    return result
