"""The demo's controls: do the discovered heads carry the fitted edit, or would any heads do?

Two comparisons, both read the test split only for the report:

* :func:`heads_carrying_edit` (always run, cheap): the fitted edit restricted to its components in the
  discovered heads, against the same edit restricted to as many randomly drawn other fitted heads. Nothing is
  refitted; each restriction is one test evaluation.
* :func:`refit_on_heads` (``--compare-heads``, several minutes): a new fit on the discovered heads against
  one on as many random heads, ``budget`` components each.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..tasks.evaluate import evaluate

__all__ = ["heads_carrying_edit", "refit_on_heads"]

#: the refit comparison's fits: one dev candidate (k = budget) and short fits
QUICK_FIT = dict(k_fractions=(1.0,), steps=8, refit_steps=6)


def _draw(pool: Sequence[tuple[int, int]], n: int, seed: int) -> list[tuple[int, int]]:
    return sorted(random.Random(seed).sample(list(pool), min(n, len(pool))))


def heads_carrying_edit(editor, fit, discovered, test, *, seed: int, progress: bool = False) -> dict[str, Any]:
    """Test accuracy by length of ``fit``'s edit restricted to the discovered heads and to as many random
    fitted heads (one seeded draw). The editor holds ``fit``'s edit before and after (re-applied bit for
    bit); returns ``{}`` when no discovered head was fitted.

    Returns ``{"discovered": {...}, "random": {...}}``, each with ``heads``, ``n_components`` and
    ``test_after`` (accuracy by list length) and ``mean_p_target`` (the target's mean probability).
    """
    fitted = {tuple(h) for h in fit.heads}
    mine = sorted(fitted & {tuple(h) for h in discovered})
    if not mine:
        return {}
    subsets = {"discovered": mine, "random": _draw(sorted(fitted - set(mine)), len(mine), seed)}
    edits = editor.reset()[::-1]  # oldest first, as applied
    out: dict[str, Any] = {}
    try:
        for name, heads in subsets.items():
            keep = [e for e in edits if (e.layer, e.head) in set(heads)]
            for e in keep:
                editor.apply_edit(e)
            acc = evaluate(editor.model, editor.tokenizer, test, progress=progress, desc=f"test ({name} heads only)")
            out[name] = {"heads": [list(h) for h in heads], "n_components": sum(len(e.components) for e in keep),
                         "test_after": acc.accuracy_by_length(), "mean_p_target": float(acc.records["p_target"].mean())}
            editor.reset()
    finally:
        editor.reset()
        for e in edits:
            editor.apply_edit(e)
    return out


def refit_on_heads(editor, train, dev, test, discovered, *, budget: int, seed: int, progress: bool) -> dict[str, Any]:
    """Fit ``budget`` components on the discovered heads and on as many random other heads; test each once."""
    others = [(l, h) for l in range(editor.n_layers) for h in range(editor.n_heads) if (l, h) not in set(discovered)]
    out = {}
    for name, heads in (("discovered", discovered), ("random", _draw(others, len(discovered), seed))):
        r = editor.fit_edit(train, dev, heads=heads, budget=budget, test=test, seed=seed, progress=progress, **QUICK_FIT)
        out[name] = {"heads": [list(h) for h in heads], "n_components": r.n_components, "test_before": r.test_before,
                     "test_after": r.test_after, "guard_change": r.guard_change}
        editor.reset()
    return out
