"""Settings and results of :func:`th_edit.edits.fit.fit_edit` (JSON round trip, recorded in plans and cards)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import pandas as pd
import torch

from ..errors import InvalidArgumentError
from .plan import Edit

__all__ = ["FitConfig", "FitResult"]


@dataclass
class FitConfig:
    """Settings of :func:`fit_edit` (every field has a default; JSON round trip with
    :meth:`to_dict` / :meth:`from_dict`)."""

    heads: Any = "all"
    """``"all"``, ``"upper"`` (every head of layers ``>= n_layers // 2``), ``"discovered"`` (mover,
    inhibition and duplicate heads of ``find_channels``) or a list of ``(layer, head)`` pairs."""
    circuits: tuple[str, ...] = ("ov",)
    """Circuits whose components get a scale: ``("ov",)``, ``("qk",)`` or both."""
    budget: int = 256
    """Most components the final edit may change."""
    k_fractions: tuple[float, ...] = (1.0, 0.5, 0.25)
    """Numbers of kept components tried on dev, as fractions of ``budget``."""
    guard_weights: tuple[float, ...] = (1.0,)
    """Weights of the guard KL term tried on dev."""
    l1_weights: tuple[float, ...] = (1e-4,)
    """Weights of the L1 penalty on the log-scales (summed over components) tried on dev."""
    steps: int = 12
    """Adam steps of the dense fit (every component of the chosen heads)."""
    refit_steps: int = 10
    """Adam steps of each refit of the kept components."""
    rounds: int = 1
    """Prune-and-refit rounds: each keeps 4x fewer components than the last, ending at ``k``."""
    lr: float = 0.05
    """Adam learning rate of the dense fit (Adam moves every log-scale by about ``lr`` per step, so keep it
    small when thousands of components are fitted at once)."""
    refit_lr: float = 0.1
    """Adam learning rate of the refits of the kept components."""
    batch_size: int = 8
    """Training prompts per step (cycled through ``train`` in a seeded order)."""
    guard_tokens: int = 32
    """Tokens of each guard paragraph used in the KL term while fitting."""
    guard_texts_per_step: int = 4
    """Guard paragraphs per step (rotating through all of them)."""
    rank_by: str = "attribution"
    """How the kept components are chosen from the dense fit: ``"attribution"`` (``|theta * dCE/dtheta|`` at
    the dense solution over the training set: the first-order task-loss increase of resetting the
    component), ``"effect"`` (``|alpha - 1| * s``, the size of the change) or ``"log_scale"`` (``|theta|``;
    Adam moves every log-scale by about the same amount, so this ranks poorly after a short fit)."""
    attribution_prompts: int = 64
    """Training prompts (whole batches, in a seeded order) over which the attribution ranking is summed."""
    max_log_scale: float = 3.0
    """Bound on ``|theta|`` (scales between ``exp(-3)`` and ``exp(3)``)."""
    max_guard_change: float = 0.01
    """Largest relative guard-loss increase a dev candidate may have to be chosen."""
    guard_shrink: tuple[float, ...] = (0.75, 0.5)
    """Factors a candidate's log-scales are shrunk by, in turn, while its guard change exceeds
    ``max_guard_change`` (each tried on dev; ``()`` turns this off)."""
    folded: bool | None = None
    """Components of the folded (norm folded in) or raw circuits; None: the editor's default."""
    seed: int = 0
    """Seed of the training order (the fit is deterministic for a seed)."""
    cache_bytes: int = 1 << 30
    """Memory bound of the layer cache; batches beyond it are recomputed."""
    progress: bool = True
    """Show a progress bar (loss, train and dev accuracy)."""

    def validate(self) -> None:
        """Raise :class:`th_edit.errors.InvalidArgumentError` naming the first bad field (called by
        :func:`fit_edit` before anything is changed).

        >>> FitConfig(budget=0).validate()
        Traceback (most recent call last):
        ...
        th_edit.errors.InvalidArgumentError: budget=0 must be an integer >= 1 (components to keep).
        """
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise InvalidArgumentError(f"budget={self.budget!r} must be an integer >= 1 (components to keep).")
        if not self.circuits:
            raise InvalidArgumentError("circuits=() names no circuit: use ('ov',), ('qk',) or both.")
        for c in self.circuits:
            if c not in ("ov", "qk"):
                raise InvalidArgumentError(f"circuit {c!r} is not one of ('ov', 'qk').")
        for name in ("steps", "refit_steps", "rounds", "batch_size", "guard_tokens", "guard_texts_per_step",
                     "attribution_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "refit_steps" else 1):
                raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive integer.")
        for name in ("lr", "refit_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive finite number.")
        if self.rank_by not in ("attribution", "effect", "log_scale"):
            raise InvalidArgumentError(
                f"FitConfig.rank_by={self.rank_by!r} must be 'attribution', 'effect' or 'log_scale'.")
        if any(not (isinstance(f, (int, float)) and 0 < f < 1) for f in self.guard_shrink):
            raise InvalidArgumentError(f"FitConfig.guard_shrink={self.guard_shrink!r}: each factor must lie in (0, 1).")
        if not self.k_fractions or not self.guard_weights or not self.l1_weights:
            raise InvalidArgumentError("k_fractions, guard_weights and l1_weights each need at least one value.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["heads"], (list, tuple)):
            d["heads"] = [list(h) for h in d["heads"]]
        for k in ("circuits", "k_fractions", "guard_weights", "l1_weights", "guard_shrink"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"unknown FitConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        d = dict(data)
        if isinstance(d.get("heads"), list):
            d["heads"] = [tuple(int(x) for x in h) for h in d["heads"]]
        for k in ("circuits", "k_fractions", "guard_weights", "l1_weights", "guard_shrink"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class FitResult:
    """What :func:`fit_edit` found and applied.

    Attributes:
        edits: the applied :class:`Edit` s (one per head and circuit; per-component ``alphas``).
        components: one row per changed component: layer, head, circuit, component, singular value,
            log_scale, alpha.
        dev_before, dev_after: dev accuracy by list length (and ``"all"``) before/after.
        guard_before, guard_after: :func:`th_edit.evaluate.guard_loss` before/after.
        test_before, test_after: test accuracy by length (only when ``test`` was given).
        trials: every dev candidate (guard and L1 weight, k, dev accuracy, guard change, chosen).
        dense: the dense fit's log-scales per unit, ``{(layer, head, circuit): tensor [d_h]}``.
        config: the :class:`FitConfig`. fit_data: description of the training data.
        timings: seconds per phase. heads: the fitted heads.
    """

    edits: list[Edit]
    components: pd.DataFrame
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    guard_before: float
    guard_after: float
    trials: pd.DataFrame
    dense: dict[tuple[int, int, str], torch.Tensor]
    config: FitConfig
    fit_data: dict[str, Any]
    timings: dict[str, float]
    heads: list[tuple[int, int]]
    test_before: dict[str, float] | None = None
    test_after: dict[str, float] | None = None
    plan: Any = None

    @property
    def guard_change(self) -> float:
        """Relative change of the guard loss (0.01 = 1% worse)."""
        return self.guard_after / self.guard_before - 1.0

    @property
    def n_components(self) -> int:
        return len(self.components)

    def head_mass(self) -> pd.Series:
        """Sum of ``|log_scale|`` over each head's changed components, indexed by ``(layer, head)``."""
        c = self.components
        return c.assign(m=c.log_scale.abs()).groupby(["layer", "head"]).m.sum()

    def top_heads(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` heads holding most of the edit: largest sum of ``|log_scale|`` over their changed
        components (ties by layer, head), sorted by (layer, head). Built from train and dev only, so it can
        choose the heads of a smaller refit; on SmolLM2 and Gemma-3-270M the nine or ten heads holding most
        of a budget-256 edit, refitted at budget 32, beat the discovered heads by 13-16 points (README,
        science condition h).

        >>> wide = editor.fit_edit(train, dev, heads="all", budget=256)      # doctest: +SKIP
        >>> heads = wide.top_heads(9); editor.reset()                          # doctest: +SKIP
        >>> narrow = editor.fit_edit(train, dev, heads=heads, budget=32, test=test)  # doctest: +SKIP
        """
        if not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"top_heads(n={n!r}): n must be a positive integer.")
        ranked = sorted(self.head_mass().items(), key=lambda kv: (-kv[1], kv[0]))
        return sorted((int(l), int(h)) for (l, h), _ in ranked[:n])

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for reports and model cards)."""
        return {
            "n_components": self.n_components, "n_edits": len(self.edits), "heads": [list(h) for h in self.heads],
            "dev_before": self.dev_before, "dev_after": self.dev_after, "test_before": self.test_before,
            "test_after": self.test_after, "guard_before": self.guard_before, "guard_after": self.guard_after,
            "guard_change": self.guard_change, "fit_data": self.fit_data, "timings": self.timings,
            "config": self.config.to_dict(),
        }


