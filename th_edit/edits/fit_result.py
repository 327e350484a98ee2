"""What :func:`th_edit.edits.fit.fit_edit` returns: :class:`FitResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..errors import InvalidArgumentError
from .fit_config import FitConfig
from .plan import Edit

__all__ = ["FitResult"]


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
        plan: the editor's :class:`~th_edit.edits.plan.EditPlan` after the fit (set by
            :meth:`th_edit.ChannelEditor.fit_edit`, which records it).
        evaluation: the model card's evaluation record (``before``, ``after`` accuracy by list length and a
            ``note``): test accuracy when a test split was given, else dev accuracy.
        test_results: ``{"before": EvalResult, "after": EvalResult}`` of the test split (when given).
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
    evaluation: dict[str, Any] | None = None
    test_results: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def guard_change(self) -> float:
        """Relative change of the guard loss (0.01 = 1% worse)."""
        return self.guard_after / self.guard_before - 1.0

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_couplings(self) -> int:
        """Non-zero couplings of the applied edits (``FitConfig.coupling_band``; 0 without)."""
        return sum(len(e.couplings or ()) for e in self.edits)

    @property
    def n_numbers(self) -> int:
        """Numbers the edit changes: one scale per component plus one per coupling."""
        return self.n_components + self.n_couplings

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
            "n_components": self.n_components, "n_couplings": self.n_couplings, "n_edits": len(self.edits), "heads": [list(h) for h in self.heads],
            "dev_before": self.dev_before, "dev_after": self.dev_after, "test_before": self.test_before,
            "test_after": self.test_after, "guard_before": self.guard_before, "guard_after": self.guard_after,
            "guard_change": self.guard_change, "fit_data": self.fit_data, "timings": self.timings,
            "config": self.config.to_dict(),
        }


