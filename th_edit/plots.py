"""PNG figures of channel maps (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .channels import ChannelMap

__all__ = ["plot_receiver_heatmap", "plot_component_profile"]

_MODE_NAMES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


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
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
