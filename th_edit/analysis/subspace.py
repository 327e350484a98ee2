"""The positional subspace of an inhibition head, its traversal, and steering search.

- :func:`fit_positional_subspace`: the head's output at the final position of each prompt, projected on
  the write directions ``V_k`` of chosen OV components (coefficients ``c = o V_k``, ``[N, k]``), then PCA
  to ``n_dims`` (2-3) dimensions. How well the target's position in the list can be read from those
  coordinates is measured per list length with a nearest-centroid classifier on held-out prompts
  (a seeded random half of the prompts fits the centroids, the other half is scored; chance is 1/N).
- :func:`traverse`: steer the head's output inside the subspace to each point of a grid (its component
  coefficients replaced by the point's, at the final position only) and record which item the model
  predicts and which item a mover head attends to most: the paper's "traversing the subspace indexes
  items" experiment.
- :func:`search_steering`: choose a steering scale for the components on the dev split, report test
  accuracy with steering at the final position (no test data in the choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from ..core.circuits import check_components
from ..core.layer_cache import reuse_lower_layers
from ..errors import InvalidArgumentError
from ..tasks.batching import dataset_rows, eager_attention, prompt_batches
from ..tasks.evaluate import EvalResult, evaluate
from .protocol import HeadEditor

__all__ = ["PositionalSubspace", "head_final_outputs", "fit_positional_subspace", "traverse", "search_steering"]


def head_final_outputs(editor: HeadEditor, tokenizer, dataset, layer: int, head: int, *, batch_size: int = 8,
                       limit: int | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Head ``(layer, head)``'s output ``z W_O[h]`` at each prompt's final token: ``[N, d]`` float32, and the rows."""
    rows = dataset_rows(dataset)
    rows = rows[:limit] if limit else rows
    W_O = editor.layout.out_weight(layer, head).detach().float().cpu()
    cols, captured, outs = editor.layout.head_slice(head), {}, []
    handle = editor.layout.out_module(layer).register_forward_pre_hook(lambda m, a: captured.__setitem__("z", a[0].detach()))
    try:
        with torch.no_grad():
            for pb in prompt_batches(tokenizer, rows, batch_size):
                pb.run(editor.model)
                z = captured["z"][torch.arange(len(pb)), pb.last, cols].float().cpu()
                outs.append(z @ W_O)
    finally:
        handle.remove()
    return torch.cat(outs), rows


@dataclass
class PositionalSubspace:
    """A head's low-dimensional positional subspace (see the module docstring)."""

    layer: int
    head: int
    components: list[int]
    V: torch.Tensor  # [d, k] write directions
    mean: torch.Tensor  # [k] mean coefficient
    axes: torch.Tensor  # [k, n_dims] principal axes (orthonormal columns) in coefficient space
    coords: torch.Tensor  # [N, n_dims]
    target_index: torch.Tensor  # [N]
    list_length: torch.Tensor  # [N]
    explained: torch.Tensor  # [n_dims] fraction of coefficient variance per axis
    decodability: pd.DataFrame = field(default_factory=pd.DataFrame)

    def coefficients(self, point: torch.Tensor) -> torch.Tensor:
        """Component coefficients ``[k]`` of a point ``[n_dims]`` of the subspace."""
        return self.mean + self.axes @ point.float()


def _nearest_centroid_accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[: len(x) // 2], order[len(x) // 2:]
    classes = sorted(set(y[train].tolist()))
    if not classes or len(test) == 0:
        return float("nan")
    centroids = torch.stack([x[train][y[train] == c].mean(0) for c in classes])
    pred = torch.tensor(classes)[torch.cdist(x[test], centroids).argmin(1)]
    return float((pred == y[test]).float().mean())


def fit_positional_subspace(editor: HeadEditor, tokenizer, dataset, layer: int, head: int, components: Sequence[int], *,
                            n_dims: int = 3, batch_size: int = 8, limit: int | None = None) -> PositionalSubspace:
    """Fit the subspace on ``dataset`` (see the module docstring); ``n_dims`` <= len(components)."""
    comps = list(check_components(list(components), editor.d_head))
    if not 2 <= n_dims <= len(comps):
        raise InvalidArgumentError(f"n_dims={n_dims} must be between 2 and the number of components ({len(comps)}).")
    _, _, V = editor.svd(layer, head, "ov")
    V = V[:, comps].float().cpu()
    outs, rows = head_final_outputs(editor, tokenizer, dataset, layer, head, batch_size=batch_size, limit=limit)
    c = outs @ V  # [N, k]
    mean = c.mean(0)
    _, S, Vt = torch.linalg.svd(c - mean, full_matrices=False)
    axes = Vt[:n_dims].T  # [k, n_dims]
    coords = (c - mean) @ axes
    pos = torch.tensor([r["target_index"] for r in rows])
    lengths = torch.tensor([r["list_length"] for r in rows])
    decod = []
    for n in sorted(set(lengths.tolist())):
        sel = lengths == n
        decod.append({"list_length": n, "n": int(sel.sum()),
                      "accuracy": _nearest_centroid_accuracy(coords[sel], pos[sel]), "chance": 1.0 / n,
                      "accuracy_all_components": _nearest_centroid_accuracy(c[sel], pos[sel])})
    return PositionalSubspace(layer, head, comps, V, mean, axes, coords, pos, lengths,
                              explained=(S[:n_dims] ** 2) / (S ** 2).sum(), decodability=pd.DataFrame(decod))


def traverse(editor: HeadEditor, tokenizer, rows: Sequence[dict[str, Any]], subspace: PositionalSubspace,
             mover: tuple[int, int], *, grid: int = 7, span: float = 1.5, batch_size: int = 8) -> pd.DataFrame:
    """For each point of a ``grid x grid`` lattice over the first two coordinates (``span`` times their
    observed range around the mean), steer the head there at the final position and record, per prompt, the
    predicted item (argmax over candidates) and the item the ``mover`` head attends to most. Returns one
    row per (point, prompt) with ``x, y, predicted_index, attended_index, target_index``."""
    lo, hi = subspace.coords[:, :2].min(0).values, subspace.coords[:, :2].max(0).values
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * span
    xs = torch.linspace(float(mid[0] - half[0]), float(mid[0] + half[0]), grid)
    ys = torch.linspace(float(mid[1] - half[1]), float(mid[1] + half[1]), grid)
    batches = prompt_batches(tokenizer, list(rows), batch_size)
    out = []
    with eager_attention(editor.model), torch.no_grad():
        for x in xs:
            for y in ys:
                point = torch.zeros(subspace.axes.shape[1])
                point[0], point[1] = x, y
                coeffs = subspace.coefficients(point)
                for pb in batches:
                    mask = torch.zeros(pb.input_ids.shape, dtype=torch.bool)
                    mask[torch.arange(len(pb)), pb.last] = True
                    with editor.steer(subspace.layer, subspace.head, component=subspace.components, alpha=0.0,
                                      add=coeffs.tolist(), positions=mask):
                        res = pb.run(editor.model, need_logits=True, output_attentions=True)
                    att = res.attentions[mover[0]][:, mover[1]].float().cpu()  # [B, T, T]
                    final = pb.final_logits(res)
                    for b in range(len(pb)):
                        logits = final[b]
                        pos = pb.positions[b]
                        out.append({"x": float(x), "y": float(y), "prompt": b,
                                    "predicted_index": int(logits[torch.tensor(pb.candidates[b])].argmax()),
                                    "attended_index": int(att[b, pb.last[b], torch.tensor(pos)].argmax()),
                                    "target_index": pb.targets[b]})
    return pd.DataFrame(out)


@dataclass
class SteeringSearch:
    alpha: float
    trials: pd.DataFrame
    test_base: EvalResult
    test_steered: EvalResult


def search_steering(editor: HeadEditor, tokenizer, dev, test, layer: int, head: int, components: Sequence[int], *,
                    alphas: Sequence[float] = (0.0, 0.5, 2.0, 4.0, 8.0), batch_size: int = 16) -> SteeringSearch:
    """Pick the steering scale of ``components`` (final position only) with the best dev accuracy (then
    logit difference), then evaluate test with and without it. Left padding keeps the final token last."""
    run = lambda data: evaluate(editor.model, tokenizer, data, batch_size=batch_size, padding_side="left", progress=False)  # noqa: E731
    trials = []
    with reuse_lower_layers(editor.model, editor.layout, layer):  # steering changes layer ``layer`` and above
        base_dev = run(dev)
        trials.append({"alpha": 1.0, "dev_accuracy": base_dev.accuracy,
                       "dev_logit_diff": float(base_dev.records.logit_diff.mean())})
        for a in alphas:
            with editor.steer(layer, head, component=list(components), alpha=a, positions="last"):
                r = run(dev)
            trials.append({"alpha": a, "dev_accuracy": r.accuracy, "dev_logit_diff": float(r.records.logit_diff.mean())})
    best = max(trials, key=lambda t: (t["dev_accuracy"], t["dev_logit_diff"]))
    test_base = run(test)
    with editor.steer(layer, head, component=list(components), alpha=best["alpha"], positions="last"):
        test_steered = run(test)
    return SteeringSearch(best["alpha"], pd.DataFrame(trials), test_base, test_steered)
