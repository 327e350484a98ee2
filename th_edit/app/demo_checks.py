"""The demo's controls: do the discovered heads carry the fitted edit, or would any heads do?

Two comparisons, both read the test split only for the report:

* :func:`heads_carrying_edit` (always run, cheap): the fitted edit restricted to its components in the
  discovered heads, against the same edit restricted to as many randomly drawn other fitted heads, and to as
  many of its components drawn at random outside the discovered heads. Nothing is refitted; each restriction
  is one test evaluation.
* :func:`refit_on_heads` (``--compare-heads``, several minutes): a new fit on the discovered heads against
  one on as many random heads, ``budget`` components each.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..edits.scale import make_edit
from ..tasks.evaluate import evaluate

__all__ = ["heads_carrying_edit", "refit_on_heads"]

#: the refit comparison's fits: one dev candidate (k = budget) and short fits
QUICK_FIT = dict(k_fractions=(1.0,), steps=8, refit_steps=6)


def _draw(pool: Sequence[tuple[int, int]], n: int, seed: int) -> list[tuple[int, int]]:
    return sorted(random.Random(seed).sample(list(pool), min(n, len(pool))))


def _random_components(editor, edits, n: int, seed: int):
    """``n`` of the components of ``edits`` drawn at random, each keeping its fitted scale, as new edits of the
    unedited model (components of one head's circuit are orthogonal, so any subset is exact on its own)."""
    pool = [(e, c, a) for e in edits for c, a in zip(e.components, e.scales)]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    by_edit: dict[int, list] = {}
    for i in picked:
        e, c, a = pool[i]
        by_edit.setdefault(id(e), [e, []])[1].append((c, a))
    return [make_edit(editor.layout, e.layer, e.head, e.circuit, [c for c, _ in ca], 1.0, folded=e.folded,
                      alphas=[a for _, a in ca]) for e, ca in by_edit.values()]


def heads_carrying_edit(editor, fit, discovered, test, *, seed: int, progress: bool = False) -> dict[str, Any]:
    """Test accuracy by length of ``fit``'s edit restricted to (a) its components in the discovered heads,
    (b) its components in as many random other fitted heads, (c) as many of its components as (a) holds,
    drawn at random outside the discovered heads (one seeded draw each). The editor holds ``fit``'s edit
    before and after (re-applied bit for bit); returns ``{}`` when no discovered head was fitted.

    Returns ``{"discovered": {...}, "random": {...}, "random_components": {...}}``, each with ``heads``,
    ``n_components``, ``test_after`` (accuracy by list length) and ``mean_p_target`` (the target's mean
    probability); ``random_components`` also lists its ``components`` as ``[layer, head, component]``.
    """
    fitted = {tuple(h) for h in fit.heads}
    mine = sorted(fitted & {tuple(h) for h in discovered})
    if not mine:
        return {}
    heads = {"discovered": mine, "random": _draw(sorted(fitted - set(mine)), len(mine), seed)}
    edits = editor.reset()[::-1]  # oldest first, as applied
    out: dict[str, Any] = {}
    try:
        keep_sets = {name: set(hs) for name, hs in heads.items()}
        restricted = {name: [e for e in edits if (e.layer, e.head) in keep] for name, keep in keep_sets.items()}
        outside = [e for e in edits if (e.layer, e.head) not in keep_sets["discovered"]]
        n_mine = sum(len(e.components) for e in restricted["discovered"])
        restricted["random_components"] = _random_components(editor, outside, n_mine, seed)
        heads["random_components"] = sorted({(e.layer, e.head) for e in restricted["random_components"]})
        for name, keep in restricted.items():
            for e in keep:
                editor.apply_edit(e)
            acc = evaluate(editor.model, editor.tokenizer, test, progress=progress, desc=f"test ({name} only)")
            out[name] = {"heads": [list(h) for h in heads[name]], "n_components": sum(len(e.components) for e in keep),
                         "test_after": acc.accuracy_by_length(), "mean_p_target": float(acc.records["p_target"].mean())}
            editor.reset()
        out["random_components"]["components"] = sorted(
            [e.layer, e.head, c] for e in restricted["random_components"] for c in e.components)
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
