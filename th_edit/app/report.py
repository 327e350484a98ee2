"""The report of ``th-edit demo`` and ``th-edit eval``: ``report.md`` with PNG figures beside it, and the same
as one self-contained ``report.html`` (figures inlined).

It opens with a summary paragraph (what was done, the headline accuracy change with its 95% interval, the
guard-metric change, whether the evaluation prompts were kept apart from the edit's data), then accuracy by
list length and by target position (95% Wilson intervals; every plotted point says how many prompts it
stands on, and positions with fewer than :data:`MIN_PROMPTS` are left out), the channels found, the edit,
the guard metric and the run's metadata. Tables use readable column names.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ..tasks.evaluate import EvalResult
from .plots import plot_component_profile, plot_receiver_heatmap, pyplot, save_figure
from .report_html import markdown_to_html

__all__ = ["MIN_PROMPTS", "COLUMN_NAMES", "plot_accuracy", "accuracy_change", "write_report"]

#: fewest prompts behind a plotted point (fewer: the point is left out, and the caption says so)
MIN_PROMPTS = 10

#: readable names of the columns th_edit's tables carry (others: underscores become spaces)
COLUMN_NAMES = {
    "list_length": "list length", "target_index": "target position", "n": "prompts", "accuracy": "accuracy",
    "interval": "95% interval", "vocab_accuracy": "top-1 over the vocabulary", "mean_p_target": "mean P(answer)",
    "kind": "kind", "mode": "composition", "sender": "sender (layer.head[component])", "receiver": "receiver (layer.head)",
    "score": "composition score", "score_over_baseline": "x random baseline", "inhibition_score": "inhibition score",
    "alpha": "scale", "alphas": "scales", "layer": "layer", "head": "head", "circuit": "circuit",
    "components": "components", "singular_values": "singular values", "dev_before": "dev accuracy before",
    "dev_after": "dev accuracy after", "guard_change": "guard change",
}


def _name(col: str) -> str:
    return COLUMN_NAMES.get(col, col.replace("_", " "))


def _points(res: EvalResult, key: str) -> pd.DataFrame:
    table = res.by_length() if key == "list_length" else res.by_position()
    return table[table["n"] >= MIN_PROMPTS] if key == "target_index" else table


def plot_accuracy(results: dict[str, EvalResult], key: str, path: str | os.PathLike, *, title: str) -> tuple[str, int]:
    """Accuracy by ``key`` (``"list_length"`` or ``"target_index"``) for each labelled result, with 95%
    Wilson intervals, each point labelled with its number of prompts. Target positions with fewer than
    :data:`MIN_PROMPTS` prompts are left out. Returns ``(path, points left out)``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    k, dropped = len(results), 0
    for i, (label, res) in enumerate(results.items()):
        full = res.by_length() if key == "list_length" else res.by_position()
        table = _points(res, key)
        dropped = max(dropped, len(full) - len(table))
        x = table[key].to_numpy(dtype=float) + (i - (k - 1) / 2) * 0.14
        y = table["accuracy"].to_numpy()
        err = [y - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - y]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        if i == 0:
            for xi, n in zip(table[key].to_numpy(), table["n"].to_numpy()):
                ax.annotate(f"n={n}", (xi, -0.02), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=7, color="grey")
    ax.set_xlabel("list length" if key == "list_length" else "target position in the list (0 = first)")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(-0.05, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title if not dropped else f"{title} (positions with < {MIN_PROMPTS} prompts left out)")
    return save_figure(fig, path), dropped


def accuracy_change(before: EvalResult, after: EvalResult) -> tuple[float, float, float, bool]:
    """``(change, low, high, paired)``: after minus before accuracy with a 95% normal interval, paired by
    prompt when both scored the same prompts in the same order (then the interval is that of the mean
    per-prompt difference), else from the two independent proportions."""
    b, a = before.records, after.records
    keys = ["list_length", "target_index", "example_id"]
    paired = len(a) == len(b) and all(k in a and k in b for k in keys) and a[keys].equals(b[keys])
    if paired:
        d = a["correct"].astype(float).to_numpy() - b["correct"].astype(float).to_numpy()
        mean = float(d.mean())
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    else:
        pa, pb = float(a["correct"].mean()), float(b["correct"].mean())
        mean = pa - pb
        se = math.sqrt(pa * (1 - pa) / len(a) + pb * (1 - pb) / len(b))
    return mean, mean - 1.96 * se, mean + 1.96 * se, paired


def _summary(before: EvalResult, after: EvalResult | None, guard, overlap, what: str | None, split: str) -> list[str]:
    n = len(before.records)
    parts = [what.rstrip(".") + "." if what else ""]
    if after is None:
        parts.append(f"Accuracy on {n} {split} prompts: {before.accuracy:.1%}.")
    else:
        change, lo, hi, paired = accuracy_change(before, after)
        parts.append(f"On {n} {split} prompts, accuracy went from {before.accuracy:.1%} to {after.accuracy:.1%}: "
                     f"**{100 * change:+.1f} points** (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}"
                     f"{', paired by prompt' if paired else ''}).")
    if guard is not None:
        b, a = guard
        parts.append(f"The guard loss on neutral English text changed by {100 * (a / b - 1):+.2f}% "
                     f"(perplexity {math.exp(b):.2f} -> {math.exp(a):.2f}).")
    if overlap is not None:
        parts.append("None of the evaluation prompts was used to fit or choose the edit." if overlap.checked and
                     not overlap.total else f"Caution: {overlap.describe()}.")
    return [" ".join(p for p in parts if p), ""]


def _accuracy_table(results: dict[str, EvalResult]) -> str:
    frames = []
    for label, res in results.items():
        t = res.by_length()
        frames.append(pd.DataFrame({
            "list length": t.list_length, "prompts": t.n, f"accuracy {label}": t.accuracy.map("{:.3f}".format),
            f"95% interval {label}": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(t.ci_low, t.ci_high)]}))
    table = frames[0]
    for f in frames[1:]:
        table = table.merge(f, on=["list length", "prompts"], how="outer")
    if len(results) == 2:
        (_, b), (_, a) = results.items()
        diff = a.by_length().accuracy.to_numpy() - b.by_length().accuracy.to_numpy()
        table["change"] = [f"{100 * d:+.1f} pts" for d in diff]
    return _table(table)


def _table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    cols = [_name(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" ---: " for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _channels_table(frame: pd.DataFrame) -> str:
    t = pd.DataFrame({
        "sender": [f"{l}.{h}[{c}]" for l, h, c in zip(frame.sender_layer, frame.sender_head, frame.sender_component)],
        "receiver": [f"{l}.{h}" for l, h in zip(frame.receiver_layer, frame.receiver_head)], "mode": frame["mode"],
        "score": frame.score, "score_over_baseline": frame.score_over_baseline, "inhibition_score": frame.inhibition_score})
    return _table(t, "{:.4f}")


def _findings_section(out: Path, findings, channel_map) -> list[str]:
    movers = findings.meta["movers"]
    lines = ["## Channels found", "", "Mover heads (attention to the answer x its direct logit effect): "
             + ", ".join(f"{l}.{h}" for l, h in movers) + ".", "",
             "Inhibition heads (strongest causal inhibition of the movers): "
             + ", ".join(f"{l}.{h}" for l, h in findings.inhibition_heads) + ".", "",
             "Spearman correlation between the weight-based and the causal ranking: "
             + ", ".join(f"{k} {v:+.2f}" for k, v in findings.rank_correlation.items()) + ".", ""]
    for kind in ("inhibition", "duplicate"):
        lines += [f"**{kind} channels**", "", _channels_table(findings.top(kind, 8)), ""]
    if channel_map is not None and movers:
        plot_receiver_heatmap(channel_map, "q", movers[0], out / "heatmap_top_mover.png", baseline="zscore")
        lines += [f"![Q-composition into mover head {movers[0][0]}.{movers[0][1]}](heatmap_top_mover.png)", ""]
        if findings.inhibition_heads:
            inh = findings.inhibition_heads[0]
            receivers = [m for m in movers if m[0] > inh[0]]
            if receivers:
                plot_component_profile(channel_map, "q", inh, receivers, out / "profile_top_inhibition.png")
                lines += [f"![components of inhibition head {inh[0]}.{inh[1]}](profile_top_inhibition.png)", ""]
    return lines


def write_report(
    out_dir: str | os.PathLike, *, title: str, before: EvalResult, after: EvalResult | None = None,
    channel_map=None, findings=None, search=None, edits: list[dict[str, Any]] | None = None,
    guard: tuple[float, float] | None = None, meta: dict[str, Any] | None = None, extra: list[str] | None = None,
    summary: str | None = None, overlap=None, split: str = "test",
) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained) and the figures into ``out_dir``; returns the
    Markdown's path. ``summary`` says what was done (the report's first sentence); ``overlap`` is the
    :class:`~th_edit.tasks.provenance.Overlap` of the evaluation set with the edit's data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"before": before, "after": after} if after is not None else {"model": before}
    lines = [f"# {title}", "", *_summary(before, after, guard, overlap, summary, split)]
    plot_accuracy(results, "list_length", out / "accuracy_by_length.png", title="Laundry List accuracy by list length")
    _, dropped = plot_accuracy(results, "target_index", out / "accuracy_by_position.png", title="Accuracy by target position")
    lines += ["## Accuracy by list length", "", "![accuracy by list length (n: prompts per point)](accuracy_by_length.png)",
              "", _table(search.summary()) if search is not None else _accuracy_table(results), "",
              "## Accuracy by target position", "", "![accuracy by target position (n: prompts per point)]"
              "(accuracy_by_position.png)", ""]
    if dropped:
        lines += [f"{dropped} target position(s) with fewer than {MIN_PROMPTS} prompts are not plotted "
                  "(long lists have few prompts per position).", ""]
    if guard is not None:
        b, a = guard
        lines += ["## Guard metric", "", f"Loss on th_edit's fixed English paragraphs: {b:.4f} before, {a:.4f} after "
                  f"({100 * (a / b - 1):+.2f}%; perplexity {math.exp(b):.2f} -> {math.exp(a):.2f}).", ""]
    if findings is not None:
        lines += _findings_section(out, findings, channel_map)
    if edits is not None:
        lines += ["## Edit", ""]
        lines += [_table(pd.DataFrame(edits), "{:.4g}"), ""] if edits else [
            "No edit improved the dev split within the guard tolerance; the model is unchanged.", ""]
    if search is not None:
        lines += [f"Chosen on the dev split (accuracy {search.dev_before:.3f} -> {search.dev_after:.3f}) from "
                  f"{len(search.trials)} trials; the test split was evaluated only afterwards.", ""]
    lines += list(extra or [])
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), **(meta or {})}
    lines += ["## Run", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    path = out / "report.md"
    text = "\n".join(lines)
    path.write_text(text)
    (out / "report.html").write_text(markdown_to_html(text, out, title=title))
    return path
