"""The demo pipeline: load a real model, map its channels, find the inhibition channels, fit an edit,
check which heads carry it (the circuit traced back from the answer against random heads), and write a Markdown report with figures.

Every choice is made on the train and dev splits; the test split is evaluated only for the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.layer_cache import reuse_lower_layers
from ..editor import ChannelEditor
from ..edits.fit import FitResult
from ..sharing.bundled_models import load_model
from ..tasks.data import Rows, laundry_list
from ..utils.devices import runtime_record
from .circuit_plot import plot_circuit
from .demo_checks import heads_carrying_edit, refit_on_heads
from .plots import plot_learned_scales
from .report import write_report

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    report: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


#: the demo's fit: one dev candidate (k = budget) and short fits, so the whole demo stays within minutes
#: the demo's circuit: two composition steps, the 4 strongest candidates per receiver and mode (seconds, not minutes)
_DEMO_CIRCUIT = dict(max_depth=2, max_candidates=4)
_MAIN_FIT = dict(k_fractions=(1.0,), steps=12, refit_steps=30, guard_weights=(2.0,), attribution_prompts=32)


class _Laps:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self._t, 2)
        self._t = time.perf_counter()
        logger.info("demo stage %s: %.1f s", name, self.timings[name])


def run_demo(
    out_dir: str | Path,
    *,
    model: str = "smollm2",
    seed: int = 0,
    lengths: Sequence[int] = (3, 5, 8, 10, 15, 20),
    n_per_length: int = 100,
    search_lengths: Sequence[int] = (5, 8, 10),
    heads: Any = "upper",
    budget: int = 256,
    control_budget: int = 32,
    compare_heads: bool = False,
    n_prompts: int = 16,
    cache_dir: str | None = None,
    save_model: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> DemoResult:
    """Run the demo and write ``report.md``, its figures, ``edit_plan/`` and ``summary.json`` to ``out_dir``.

    ``n_per_length`` examples per list length are split 50/25/25 into train (discovery and fitting, at
    ``search_lengths``), dev (choices) and test (the report only). ``compare_heads`` adds the fits of the
    circuit's heads and of as many random heads (``control_budget`` components each; several minutes more).
    ``device`` and ``dtype`` go to :func:`th_edit.models.load_model` (None: CPU, float32); what was used is
    recorded in ``summary.json`` and the report (``runtime``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lap = _Laps()
    editor, data = _load(model, cache_dir, lengths, n_per_length, seed, lap, say, device=device, dtype=dtype)
    runtime = runtime_record(editor.model)
    weak = set(search_lengths)
    train, dev, test_weak = (data[s].filter(lambda r: r["list_length"] in weak) for s in ("train", "dev", "test"))
    lap("data")
    cmap, findings, circuit = _discover(editor, data["train"], out, n_prompts=n_prompts, seed=seed, progress=progress,
                               lap=lap, say=say)
    comparison = {}
    if compare_heads:
        say(f"circuit heads {circuit.head_list()} vs as many random heads, {control_budget} components each ...")
        comparison = refit_on_heads(editor, train, dev, test_weak, circuit.head_list(), budget=control_budget,
                                    seed=seed, progress=progress)
        lap("discovered_vs_random")
    fit, carried = _fit_and_controls(editor, train, dev, data["test"], (findings, circuit), heads=heads, budget=budget,
                                     seed=seed, progress=progress, lap=lap, say=say)
    before, after = fit.test_results["before"], fit.test_results["after"]
    _write_outputs(editor, fit, out, save_model)
    summary = _summary(model, seed, fit, before, after, (findings, circuit), comparison, lap.timings)
    summary["runtime"] = runtime
    summary["edit_carried_by"] = carried
    what = (f"A fitted edit rescaled {fit.n_components} singular components in {summary['changed_heads']} "
            f"attention heads of {model} (of the {len(fit.heads)} heads fitted, heads={heads}), learned on "
            f"{len(train)} train prompts and chosen on {len(dev)} dev prompts at list lengths {list(search_lengths)}")
    report = write_report(out, title=f"th_edit demo: {model}", before=before, after=after, channel_map=cmap,
                          findings=findings, guard=(fit.guard_before, fit.guard_after), summary=what,
                          extra=_circuit_section(circuit) + _fit_section(fit, comparison, control_budget)
                          + _carried_section(carried, before.accuracy_by_length(), after.accuracy_by_length(),
                                             fit, search_lengths),
                          meta={"model": model, "seed": seed, "lengths": list(lengths), "examples per length": n_per_length,
                                "fit lengths": list(search_lengths), "stage times (s)": lap.timings, **_versions(),
                                "device": runtime["device"], "dtype": runtime["dtype"]})
    lap("report")
    summary.update(timings=lap.timings, report=str(report))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return DemoResult(report=report, summary=summary, timings=lap.timings)


def _load(model: str, cache_dir: str | None, lengths: Sequence[int], n_per_length: int, seed: int, lap: _Laps,
          say: Callable[[str], None], *, device: Any = None, dtype: Any = None) -> tuple[ChannelEditor, Any]:
    """The editor on the loaded model (with its tokenizer, on ``device`` in ``dtype``) and the Laundry List
    splits at every length."""
    say(f"loading {model} ...")
    lm, tokenizer = load_model(model, cache_dir=cache_dir, device=device, dtype=dtype)
    editor = ChannelEditor(lm, tokenizer=tokenizer)
    lap("load")
    return editor, laundry_list(tokenizer, lengths=lengths, n_per_length=n_per_length, seed=seed)


def _discover(editor: ChannelEditor, train: Rows, out: Path, *, n_prompts: int, seed: int, progress: bool,
              lap: _Laps, say: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """The channel map and the channel findings on ``train`` (both also written as CSV), and the circuit
    traced back from the answer (``circuit.json``, ``circuit.png``, ``circuit.svg``)."""
    say("channel map (Q, K, V composition of every head component) ...")
    cmap = editor.channel_map(modes=("q", "k", "v"), progress=progress, seed=seed, baseline_samples=32)
    cmap.to_csv(str(out / "channel_map_top_pairs.csv"))
    lap("channel_map")
    say("finding inhibition and duplicate-detection channels ...")
    findings = editor.find_channels(train, n_prompts=n_prompts, seed=seed, channel_map=cmap, progress=progress)
    findings.channels.to_csv(out / "channels.csv", index=False)
    lap("find_channels")
    say("tracing the circuit back from the answer ...")
    circuit = editor.find_circuit(train, channel_map=cmap, seed=seed, progress=progress, **_DEMO_CIRCUIT,
                                  n_prompts=n_prompts)
    circuit.save(out / "circuit.json")
    for suffix in ("png", "svg"):
        plot_circuit(circuit, out / f"circuit.{suffix}", n_heads=editor.n_heads)
    lap("find_circuit")
    return cmap, findings, circuit


def _fit_and_controls(editor: ChannelEditor, train: Rows, dev: Rows, test: Rows, found: tuple[Any, Any], *,
                      heads: Any, budget: int, seed: int, progress: bool, lap: _Laps,
                      say: Callable[[str], None]) -> tuple[FitResult, dict[str, Any]]:
    """The fitted edit (applied; the test split evaluated before and after by the fit, which records the card's
    evaluation) and which heads carry it: the circuit's heads against random ones. ``found``: the three-role
    findings and the circuit (``heads="roles"`` fits the first, ``"discovered"``/``"circuit"`` the second)."""
    findings, circuit = found
    say(f"fitting the edit: heads={heads}, budget {budget}, chosen on dev ...")
    fit = editor.fit_edit(train, dev, heads=heads, budget=budget, findings=findings if heads == "roles" else circuit,
                          test=test, seed=seed, progress=progress, **_MAIN_FIT)
    lap("fit_and_test")
    say("the fitted edit restricted to the circuit's heads vs to as many random fitted heads ...")
    # the restrictions change layers >= the first fitted one only: the test split's lower layers run once
    with reuse_lower_layers(editor.model, editor.layout, min(l for l, _ in fit.heads)):
        carried = heads_carrying_edit(editor, fit, circuit.head_list(), test, seed=seed, progress=progress)
    lap("heads_carrying_edit")
    return fit, carried


def _write_outputs(editor: ChannelEditor, fit: FitResult, out: Path, save_model: bool) -> None:
    """The edit plan, the edited model (``save_model``), the fitted components and their figure."""
    editor.save_plan(out / "edit_plan")
    if save_model:
        editor.save_pretrained(out / "edited_model", overwrite=True)
    fit.components.to_csv(out / "fitted_components.csv", index=False)
    plot_learned_scales(fit.components, editor.n_layers, editor.n_heads, out / "learned_scales.png")


def _summary(model, seed, fit, before, after, found, comparison, timings) -> dict[str, Any]:
    findings, circuit = found
    return {
        "model": model, "seed": seed, "n_components": fit.n_components, "fitted_heads": len(fit.heads),
        "changed_heads": len(fit.head_mass()),
        "test_before": before.accuracy_by_length(), "test_after": after.accuracy_by_length(),
        "dev_before": fit.dev_before, "dev_after": fit.dev_after, "guard_before": fit.guard_before,
        "guard_after": fit.guard_after, "guard_change": fit.guard_change, "movers": findings.meta["movers"],
        "inhibition_heads": findings.inhibition_heads, "roles_heads": findings.heads(),
        "discovered_heads": circuit.head_list(),
        "circuit": {"heads": circuit.head_list(), "roles": {f"{h.layer}.{h.head}": h.role for h in circuit.heads},
                    "kept_edges": len(circuit.kept_edges()), "reason": circuit.meta.get("reason")},
        "discovered_vs_random": comparison, "top_components": fit.components.head(10).to_dict("records"),
        "fit_config": fit.config.to_dict(), "timings": timings, **_versions(),
    }


def _mean_at(acc: dict, lengths) -> float:
    vals = [acc[n] for n in lengths if n in acc]
    return sum(vals) / len(vals) if vals else float("nan")


def _carried_section(carried, before: dict, after: dict, fit, lengths) -> list[str]:
    """Markdown lines: the fitted edit restricted to the discovered heads vs to as many random heads, and the
    heads that hold most of it."""
    if not carried:
        return ["(No head of the circuit was among the fitted heads: no restriction comparison.)", ""]
    n_components = fit.n_components
    mass = fit.head_mass()
    top = fit.top_heads(len(carried["discovered"]["heads"]))
    share = lambda heads: float(sum(mass.get(tuple(h), 0.0) for h in heads) / mass.sum())  # noqa: E731
    fmt = lambda d: ", ".join(f"{k}: {v:.2f}" for k, v in d.items())  # noqa: E731
    lines = ["## Which heads carry the fitted edit", "",
             "The fitted edit applied only in the discovered heads (the circuit's), only in as many randomly drawn fitted heads, and "
             "only in as many of its components as the discovered heads hold, drawn at random outside them (one "
             "seeded draw each; nothing refitted; test split). Mean accuracy at the fit lengths "
             f"{list(lengths)}.", "",
             "| edit | components | test accuracy by length | mean at fit lengths |", "| :--- | ---: | :--- | ---: |",
             f"| none | 0 | {fmt(before)} | {_mean_at(before, lengths):.3f} |",
             f"| all fitted heads | {n_components} | {fmt(after)} | "
             f"{_mean_at(after, lengths):.3f} |"]
    for name, c in carried.items():
        label = (f"{c['n_components']} random components outside them only ({len(c['heads'])} heads)"
                 if name == "random_components" else f"{name} heads only {c['heads']}")
        lines.append(f"| {label} | {c['n_components']} | {fmt(c['test_after'])} | "
                     f"{_mean_at(c['test_after'], lengths):.3f} |")
    return lines + ["", f"The discovered heads hold {share(carried['discovered']['heads']):.0%} of the edit (sum of |log scale|); "
                    f"the {len(top)} heads holding most of it are {', '.join(f'{l}.{h}' for l, h in top)} "
                    f"({share(top):.0%}; `FitResult.top_heads`, a starting point for a sparse refit).", ""]


def _circuit_section(circuit) -> list[str]:
    """Markdown lines: the circuit traced back from the answer, drawn, and its heads with their roles."""
    lines = ["## The circuit", "",
             f"Traced back from the answer on the train split: {len(circuit.heads)} head(s), "
             f"{len(circuit.kept_edges())} confirmed composition edge(s) ({circuit.meta.get('reason', '')}). "
             "Its heads are what `--heads discovered` fits; the three-role channels above are `--heads roles`.", ""]
    if not circuit.heads:
        return lines
    lines += ["![the circuit: heads by layer, coloured by role; arrows Q solid, K dashed, V dotted](circuit.png)", "",
              "| head | step back | role | direct effect |", "| :--- | ---: | :--- | ---: |"]
    lines += [f"| {h.layer}.{h.head} | {h.step} | {h.role} | {h.direct_effect:+.3f} |" for h in circuit.heads]
    return lines + [""]


def _fit_section(fit, comparison, control_budget: int) -> list[str]:
    """Markdown lines: the fitted edit, its largest components, and discovered vs random heads."""
    top = fit.components.reindex(fit.components.log_scale.abs().sort_values(ascending=False).index).head(12)
    lines = ["## Fitted edit", "",
             f"{fit.n_components} singular components in {len(fit.head_mass())} head(s) rescaled (of the "
             f"{len(fit.heads)} heads fitted; budget chosen on dev; "
             f"dev accuracy {fit.dev_before['all']:.3f} -> {fit.dev_after['all']:.3f}; guard {fit.guard_change:+.2%}). "
             "Largest learned scales:", "", "| layer | head | circuit | component | singular value | scale |",
             "| ---: | ---: | :---: | ---: | ---: | ---: |"]
    lines += [f"| {r.layer} | {r.head} | {r.circuit} | {r.component} | {r.singular_value:.3f} | {r.alpha:.3f} |"
              for r in top.itertuples()]
    lines += ["", "![learned scales per layer and head: red amplified, blue suppressed](learned_scales.png)", ""]
    if not comparison:
        return lines + ["(Discovered vs random heads: run the demo with `--compare-heads`.)", ""]
    lines += [f"## Discovered vs random heads ({control_budget} components each, test at the fit lengths)", "",
              "| heads | test before | test after | guard change |", "| :--- | :--- | :--- | ---: |"]
    for name, c in comparison.items():
        fmt = lambda d: ", ".join(f"{k}: {v:.2f}" for k, v in (d or {}).items())  # noqa: E731
        lines.append(f"| {name} {c['heads']} | {fmt(c['test_before'])} | {fmt(c['test_after'])} | {c['guard_change']:+.2%} |")
    return lines + [""]


def _versions() -> dict[str, str]:
    import transformers

    from .._version import __version__

    return {"th_edit": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
