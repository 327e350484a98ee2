"""The circuit of :func:`th_edit.analysis.circuit_discovery.find_circuit` drawn as a layered graph (PNG or SVG).

Heads sit at (head index, layer), coloured by role; a kept edge is an arrow from the sender head to the
receiver head, its style naming the composition mode (Q solid, K dashed, V dotted) and its width the
causal effect.
"""

from __future__ import annotations

import os

from ..analysis.circuit_discovery import Circuit
from .plots import pyplot, save_figure

__all__ = ["plot_circuit", "ROLE_COLOURS"]

ROLE_COLOURS = {"mover": "tab:red", "inhibition": "tab:blue", "duplicate_token": "tab:green", "induction": "tab:purple",
                "previous_token": "tab:olive", "other": "tab:gray"}
_STYLES = {"q": "-", "k": "--", "v": ":"}


def plot_circuit(circuit: Circuit, path: str | os.PathLike, *, n_heads: int | None = None) -> str:
    """Draw ``circuit`` into ``path`` (the suffix, ``.png`` or ``.svg``, picks the format); returns the path."""
    plt = pyplot()
    heads = {(h.layer, h.head): h for h in circuit.heads}
    width = n_heads or (max((h for _, h in heads), default=0) + 1)
    layers = [l for l, _ in heads] or [0]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * width + 2), max(3.0, 0.45 * (max(layers) - min(layers) + 1) + 1.5)))
    edges = circuit.kept_edges()
    top = max((abs(e.effect) for e in edges), default=1.0) or 1.0
    for e in edges:
        (sl, sh), (rl, rh) = e.sender[:2], e.receiver
        ax.annotate("", xy=(rh, rl), xytext=(sh, sl), arrowprops=dict(
            arrowstyle="->", linestyle=_STYLES[e.mode], lw=0.5 + 2.5 * abs(e.effect) / top, alpha=0.7, color="black"))
    for role, colour in ROLE_COLOURS.items():
        pts = [(h.head, h.layer) for h in heads.values() if h.role == role]
        if pts:
            ax.scatter(*zip(*pts), s=220, color=colour, label=role, zorder=3, edgecolors="white")
    for (l, h) in heads:
        ax.text(h, l, f"{l}.{h}", ha="center", va="center", fontsize=6, color="white", zorder=4)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(min(layers) - 0.8, max(layers) + 0.8)
    ax.set_title(f"circuit: {len(heads)} heads, {len(edges)} edges (Q solid, K dashed, V dotted)", fontsize=9)
    if heads:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)
