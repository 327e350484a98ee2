"""The report a person reads: summary first, headline change with its interval (checked against a plain
computation), readable columns, prompts per point, one self-contained HTML file, signed learned scales."""

import math
import re

import numpy as np
import pandas as pd

from th_edit.app.plots import plot_learned_scales
from th_edit.app.report import MIN_PROMPTS, accuracy_change, write_report
from th_edit.tasks.evaluate import EvalResult
from th_edit.tasks.provenance import Overlap


def _result(correct: np.ndarray, lengths: np.ndarray, positions: np.ndarray) -> EvalResult:
    n = len(correct)
    return EvalResult(pd.DataFrame({
        "example_id": np.arange(n), "list_length": lengths, "target_index": positions, "template": "omitted",
        "correct": correct.astype(bool), "correct_vocab": correct.astype(bool), "p_target": correct * 0.5 + 0.1,
        "logit_diff": correct - 0.5}))


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.repeat([3, 8], 40)
    positions = np.concatenate([rng.integers(0, 3, 40), rng.integers(0, 8, 40)])
    before = rng.random(80) < 0.4
    after = before | (rng.random(80) < 0.3)
    return _result(before, lengths, positions), _result(after, lengths, positions), before, after


def test_headline_change_is_the_paired_mean_difference_with_its_interval():
    b, a, before, after = _pair()
    change, lo, hi, paired = accuracy_change(b, a)
    d = after.astype(float) - before.astype(float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert paired and math.isclose(change, d.mean()) and math.isclose(lo, d.mean() - half) and math.isclose(hi, d.mean() + half)


def test_report_opens_with_a_summary_and_is_self_contained(tmp_path):
    b, a, before, after = _pair()
    path = write_report(tmp_path, title="demo", before=b, after=a, guard=(3.0, 3.03), summary="A fitted edit rescaled 5 components",
                        overlap=Overlap(n_eval=80, in_train=0, in_dev=0))
    text = path.read_text()
    first = text.split("\n\n")[1]
    d = after.mean() - before.mean()
    assert first.startswith("A fitted edit rescaled 5 components.") and f"{100 * d:+.1f} points" in first
    assert "95% interval" in first and "+1.00%" in first and "None of the evaluation prompts" in first
    for raw in ("ci_low", "list_length", "mean_p_target", "vocab_accuracy"):
        assert raw not in text
    assert "| list length | prompts | accuracy before |" in text
    # positions of the 8-item lists have < MIN_PROMPTS prompts each and are dropped, and the report says so
    counts = b.by_position().n
    assert (counts < MIN_PROMPTS).any() and "fewer than 10 prompts are not plotted" in text
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and not re.search(r'src="[^d]', html)
    assert "<table>" in html and "<strong>" in html


def test_learned_scales_are_signed_and_counted(tmp_path, monkeypatch):
    comps = pd.DataFrame({"layer": [2, 2, 3, 3, 3], "head": [0, 0, 1, 2, 2], "log_scale": [0.5, -0.7, 0.2, -0.1, 0.3]})
    titles = []
    import th_edit.app.plots as plots

    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, p: (titles.append(fig.axes[0].get_title()),
                                                              titles.append(fig.axes[0].images[0].get_array()),
                                                              real(fig, p))[-1])
    plot_learned_scales(comps, 4, 3, tmp_path / "s.png")
    assert titles[0] == "5 components in 3 heads: 3 amplified, 2 suppressed"
    grid = titles[1]
    assert grid[2, 0] == -0.7 and grid[3, 2] == 0.3 and grid[3, 1] == 0.2 and grid.mask[0, 0]
