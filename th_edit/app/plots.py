"""PNG figures of channel maps (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd
import torch

from ..analysis.channel_stream import ChannelMap
from ..analysis.subspace import PositionalSubspace

__all__ = ["pyplot", "save_figure", "plot_receiver_heatmap", "plot_component_profile", "plot_subspace", "plot_traversal"]

_MODE_NAMES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}


def pyplot():
    """``matplotlib.pyplot`` on the headless ``Agg`` backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    """Lay out, write ``fig`` as a 120-dpi PNG at ``path``, close it and return the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return str(path)


def plot_receiver_heatmap(
    cmap: ChannelMap, mode: str, receiver: tuple[int, int], path: str | os.PathLike, *, baseline: str | None = None
) -> str:
    """Heatmap of every earlier head's composition score into one receiver head (layers x heads).

    Args:
        cmap: a channel map; mode: ``"q"``, ``"k"`` or ``"v"``; receiver: ``(layer, head)``.
        path: PNG file to write; baseline: None, ``"subtract"`` or ``"zscore"`` (see ``head_scores``).

    Returns:
        The path written.
    """
    plt = pyplot()
    rl, rh = receiver
    scores = cmap.head_scores(mode, baseline=baseline)[:rl, :, rl, rh]  # [rl, H]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * cmap.n_heads + 2), max(2.5, 0.4 * rl + 1.5)))
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="upper")
    ax.set_xlabel("sender head")
    ax.set_ylabel("sender layer")
    ax.set_xticks(range(cmap.n_heads))
    ax.set_yticks(range(rl))
    label = {None: "score", "subtract": "score - random baseline", "zscore": "z-score vs random"}[baseline]
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(f"{_MODE_NAMES[mode]} into head {rl}.{rh}")
    return save_figure(fig, path)


def plot_component_profile(
    cmap: ChannelMap, mode: str, sender: tuple[int, int], receivers: Sequence[tuple[int, int]],
    path: str | os.PathLike, *, top: int | None = 16,
) -> str:
    """Per-component score profile of one sender head against one or more receivers.

    Bars: each sender component's score against the whole receiver circuit; the dashed line is the
    random-matrix baseline mean; the sender's singular values are drawn on a second axis.

    Returns:
        The path written.
    """
    plt = pyplot()
    r = cmap.d_head if top is None else min(top, cmap.d_head)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * r + 2), 3.2))
    width = 0.8 / max(1, len(receivers))
    for n, rec in enumerate(receivers):
        scores = cmap.component_scores(mode, sender, rec)[:r]
        ax.bar(torch.arange(r) + n * width - 0.4 + width / 2, scores.numpy(), width, label=f"into {rec[0]}.{rec[1]}")
    if "component" in cmap.baselines:
        ax.axhline(cmap.baselines["component"][0], color="grey", linestyle="--", label="random baseline")
    ax.set_xlabel(f"component of head {sender[0]}.{sender[1]} (OV, descending singular value)")
    ax.set_ylabel("component score")
    ax.set_xticks(range(r))
    ax2 = ax.twinx()
    idx = cmap.senders.index(tuple(sender))
    ax2.plot(range(r), cmap.sender_S[idx, :r].detach().numpy(), color="black", marker=".", linewidth=1)
    ax2.set_ylabel("singular value")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{_MODE_NAMES[mode]}: components of {sender[0]}.{sender[1]}")
    return save_figure(fig, path)


def plot_subspace(subspace: PositionalSubspace, path: str | os.PathLike, *, length: int | None = None) -> str:
    """Scatter of the first two coordinates coloured by target position (one list length, or all)."""
    plt = pyplot()
    keep = torch.ones_like(subspace.target_index, dtype=torch.bool) if length is None else subspace.list_length == length
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    sc = ax.scatter(subspace.coords[keep, 0], subspace.coords[keep, 1], c=subspace.target_index[keep], cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label="target position in the list")
    ax.set_xlabel(f"PC 1 ({100 * float(subspace.explained[0]):.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * float(subspace.explained[1]):.0f}% of variance)")
    which = "all lengths" if length is None else f"lists of {length}"
    ax.set_title(f"head {subspace.layer}.{subspace.head}, components {subspace.components}: {which}")
    return save_figure(fig, path)


def plot_traversal(frame: pd.DataFrame, path, *, title: str) -> str:
    """Two panels over the traversal grid: mean predicted item position and mean attended item position."""
    plt = pyplot()
    g = frame.groupby(["x", "y"]).agg(predicted=("predicted_index", "mean"), attended=("attended_index", "mean")).reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "predicted", "predicted item position"), (axes[1], "attended", "mover's most-attended item")):
        sc = ax.scatter(g.x, g.y, c=g[key], cmap="viridis", s=140, marker="s")
        fig.colorbar(sc, ax=ax, label=f"mean {label}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(label)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_learned_scales(components: pd.DataFrame, n_layers: int, n_heads: int, path: str | os.PathLike) -> str:
    """Heatmap (layers x heads) of each head's signed learned change, from a fit's component table (columns
    layer, head, log_scale): the ``log alpha`` of the head's largest change, red where it amplifies
    (``alpha > 1``), blue where it suppresses (``alpha < 1``), blank where nothing changed. The title counts
    the changed components and the heads they sit in."""
    import numpy as np

    plt = pyplot()
    grid = np.full((n_layers, n_heads), np.nan)
    for r in components.itertuples():
        l, h, v = int(r.layer), int(r.head), float(r.log_scale)
        if np.isnan(grid[l, h]) or abs(v) > abs(grid[l, h]):
            grid[l, h] = v
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n_heads + 2.5), max(3.0, 0.22 * n_layers + 1.5)))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=-bound, vmax=bound, origin="upper")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="log scale of the head's largest change\n(> 0 amplified, < 0 suppressed)")
    up, down = int((components.log_scale > 0).sum()), int((components.log_scale < 0).sum())
    heads = len(components[["layer", "head"]].drop_duplicates())
    ax.set_title(f"{len(components)} components in {heads} heads: {up} amplified, {down} suppressed", fontsize=10)
    return save_figure(fig, path)
