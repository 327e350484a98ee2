"""A self-contained Markdown report with PNG figures (written by ``th-edit demo`` and ``th-edit eval``).

Sections appear when their inputs are given: accuracy by list length and by target position (before /
after, 95% Wilson intervals), the Q-composition heatmap into the top mover head, the component profile
of the top inhibition head, the channels found, the edit table, the guard-metric change, run metadata.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from ..tasks.evaluate import EvalResult
from .plots import pyplot, plot_component_profile, plot_receiver_heatmap

__all__ = ["plot_accuracy", "write_report"]


def plot_accuracy(results: dict[str, EvalResult], key: str, path: str | os.PathLike, *, title: str) -> str:
    """Accuracy by ``key`` (``"list_length"`` or ``"target_index"``) for each labelled result, with 95%
    Wilson intervals as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    n = len(results)
    for i, (label, res) in enumerate(results.items()):
        table = res.by_length() if key == "list_length" else res.by_position()
        x = table[key].to_numpy(dtype=float) + (i - (n - 1) / 2) * 0.12
        y = table["accuracy"].to_numpy()
        err = [y - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - y]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("list length" if key == "list_length" else "target position in the list (0 = first)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _table(frame, floats: str = "{:.3f}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" ---: " for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    before: EvalResult,
    after: EvalResult | None = None,
    channel_map=None,
    findings=None,
    search=None,
    edits: list[dict[str, Any]] | None = None,
    guard: tuple[float, float] | None = None,
    meta: dict[str, Any] | None = None,
    extra: list[str] | None = None,
) -> Path:
    """Write ``report.md`` and its figures into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"before": before} if after is not None else {"model": before}
    if after is not None:
        results["after"] = after
    lines = [f"# {title}", ""]
    plot_accuracy(results, "list_length", out / "accuracy_by_length.png", title="Laundry List accuracy by list length")
    plot_accuracy(results, "target_index", out / "accuracy_by_position.png", title="Accuracy by target position")
    lines += ["## Accuracy", "", "![accuracy by list length](accuracy_by_length.png)", ""]
    if search is not None:
        lines += [_table(search.summary()), ""]
    else:
        cols = ["list_length", "n", "accuracy", "ci_low", "ci_high", "vocab_accuracy", "mean_p_target"]
        for label, res in results.items():
            lines += [f"**{label}**", "", _table(res.by_length()[cols]), ""]
    lines += ["![accuracy by target position](accuracy_by_position.png)", ""]
    if guard is not None:
        b, a = guard
        lines += ["## Guard metric", "",
                  f"Loss on th_edit's fixed English paragraphs: {b:.4f} before, {a:.4f} after "
                  f"({100 * (a / b - 1):+.2f}%; perplexity {math.exp(b):.2f} -> {math.exp(a):.2f}).", ""]
    if findings is not None:
        movers = findings.meta["movers"]
        lines += ["## Channels found", "", "Mover heads (attention to the answer x its direct logit effect): "
                  + ", ".join(f"{l}.{h}" for l, h in movers) + ".", "",
                  "Inhibition heads (strongest causal inhibition of the movers): "
                  + ", ".join(f"{l}.{h}" for l, h in findings.inhibition_heads) + ".", "",
                  "Spearman correlation between the weight-based and the causal ranking: "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in findings.rank_correlation.items()) + ".", ""]
        cols = ["kind", "mode", "sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head",
                "score", "score_over_baseline", "inhibition_score"]
        for kind in ("inhibition", "duplicate"):
            lines += [f"**{kind} channels**", "", _table(findings.top(kind, 8)[cols], "{:.4f}"), ""]
        if channel_map is not None and movers:
            plot_receiver_heatmap(channel_map, "q", movers[0], out / "heatmap_top_mover.png", baseline="zscore")
            lines += [f"![Q-composition into mover head {movers[0][0]}.{movers[0][1]}](heatmap_top_mover.png)", ""]
            if findings.inhibition_heads:
                inh = findings.inhibition_heads[0]
                receivers = [m for m in movers if m[0] > inh[0]]
                if receivers:
                    plot_component_profile(channel_map, "q", inh, receivers, out / "profile_top_inhibition.png")
                    lines += [f"![components of inhibition head {inh[0]}.{inh[1]}](profile_top_inhibition.png)", ""]
    if edits is not None:
        lines += ["## Edit", ""]
        if edits:
            import pandas as pd

            lines += [_table(pd.DataFrame(edits), "{:.4g}"), ""]
        else:
            lines += ["No edit improved the dev split within the guard tolerance; the model is unchanged.", ""]
    if search is not None:
        lines += [f"Chosen on the dev split (accuracy {search.dev_before:.3f} -> {search.dev_after:.3f}) from "
                  f"{len(search.trials)} trials; the test split was evaluated only afterwards.", ""]
    lines += list(extra or [])
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), **(meta or {})}
    lines += ["## Run", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
