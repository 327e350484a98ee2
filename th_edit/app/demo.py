"""The whole story on a real model: load, analyse, find channels, search an edit on dev, evaluate on test,
write a report. Deterministic for a fixed seed. Run it as ``th-edit demo``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..tasks.data import laundry_list
from ..editor import ChannelEditor
from ..sharing.models import load_model
from .report import write_report

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger("th_edit")


@dataclass
class DemoResult:
    report: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(
    out_dir: str | Path,
    *,
    model: str = "smollm2",
    seed: int = 0,
    lengths: Sequence[int] = (3, 5, 8, 10, 15, 20),
    n_per_length: int = 100,
    search_lengths: Sequence[int] = (5, 8, 10),
    alphas: Sequence[float] = (0.0, 2.0, 4.0),
    n_ov: int = 4,
    n_qk: int = 1,
    max_edits: int = 2,
    n_prompts: int = 32,
    cache_dir: str | None = None,
    save_model: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> DemoResult:
    """Run the demo and write ``report.md``, its figures, ``edit_plan/`` and ``summary.json`` to ``out_dir``.

    ``n_per_length`` examples per list length are split 50/25/25 into train (channel discovery), dev (edit
    search, restricted to ``search_lengths``) and test (before/after evaluation).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    say(f"loading {model} ...")
    lm, tokenizer = load_model(model, cache_dir=cache_dir)
    editor = ChannelEditor(lm, tokenizer=tokenizer)
    lap("load")
    say(f"{editor!r}; building Laundry List data (seed {seed}) ...")
    data = laundry_list(tokenizer, lengths=lengths, n_per_length=n_per_length, seed=seed)
    dev = data["dev"].filter(lambda r: r["list_length"] in set(search_lengths))
    lap("data")
    say("channel map (Q, K, V composition of every head component) ...")
    cmap = editor.channel_map(modes=("q", "k", "v"), progress=progress, seed=seed, baseline_samples=32)
    cmap.to_csv(str(out / "channel_map_top_pairs.csv"))
    lap("channel_map")
    say("finding inhibition and duplicate-detection channels (roles, composition, causal evidence) ...")
    findings = editor.find_channels(data["train"], n_prompts=n_prompts, seed=seed, channel_map=cmap,
                             progress=progress)
    findings.channels.to_csv(out / "channels.csv", index=False)
    lap("find_channels")
    say(f"searching an edit on the dev split (lengths {list(search_lengths)}, {len(dev)} prompts) ...")
    search = editor.search_edit(dev, data["test"], findings, alphas=alphas, n_ov=n_ov, n_qk=n_qk,
                         max_edits=max_edits, progress=progress)
    search.trials.to_csv(out / "edit_search_trials.csv", index=False)
    lap("search_and_test")
    editor.save_plan(out / "edit_plan")
    if save_model:
        editor.save_pretrained(out / "edited_model")
    versions = _versions()
    meta = {"model": model, "seed": seed, "lengths": list(lengths), "examples per length": n_per_length,
            "search lengths": list(search_lengths), "scales tried": list(alphas), **versions,
            "timings (s)": timings}
    report = write_report(out, title=f"th_edit demo: {model}", before=search.test_before, after=search.test_after,
                          channel_map=cmap, findings=findings, search=search, edits=search.edits,
                          guard=(search.guard_before, search.guard_after), meta=meta)
    lap("report")
    summary = {
        "model": model, "seed": seed, "edits": search.edits,
        "test_before": search.test_before.accuracy_by_length(), "test_after": search.test_after.accuracy_by_length(),
        "dev_before": search.dev_before, "dev_after": search.dev_after,
        "guard_before": search.guard_before, "guard_after": search.guard_after, "guard_change": search.guard_change,
        "movers": findings.meta["movers"], "inhibition_heads": findings.inhibition_heads,
        "rank_correlation": findings.rank_correlation,
        "top_inhibition": findings.top("inhibition", 5).to_dict("records"),
        "top_duplicate": findings.top("duplicate", 5).to_dict("records"),
        "timings": timings, "report": str(report), **versions,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return DemoResult(report=report, summary=summary, timings=timings)


def _versions() -> dict[str, str]:
    import transformers

    from .._version import __version__

    return {"th_edit": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
