"""Benchmark th_edit.edits.fit on SmolLM2-135M (CPU): the all-heads dense fit, and the layer cache.

    PYTHONPATH=. python benchmarks/bench_fit.py [--steps 12] [--out benchmarks/results/bench_fit.json]

1. Dense fit of every OV component of every head (30 x 9 x 64 = 17,280 log-scales): ``steps`` Adam
   steps of 8 prompts plus the guard; reported as the ``dense_fit`` seconds of
   :class:`th_edit.edits.fit.FitResult` (target: <= 60 s on 2 CPU cores).
2. Layer cache: one forward+backward training step with the fitted heads in layers >= 18, run from the
   cached residual stream entering layer 18, against the same step run through the full model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from th_edit import ChannelEditor
from th_edit.data import laundry_list
from th_edit.edits.fit import ChannelFit, FitConfig, fit_edit
from th_edit.edits.fit_problem import FitProblem
from th_edit.models import load_model


def _step_seconds(problem, fit, layer: int, repeats: int = 3) -> float:
    data = problem.data_from(layer)
    cache, train = data.cache, data.train
    times = []
    for r in range(repeats):
        b = train[r % len(train)]
        theta = fit.theta.clone().requires_grad_(True)
        t = time.perf_counter()
        with fit.hooks(theta):
            cl = problem.candidate_logits(cache, b)
            torch.nn.functional.cross_entropy(cl, b.target).backward()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/bench_fit.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    editor = ChannelEditor(model, tokenizer=tok)
    d = laundry_list(tok, lengths=[5, 8, 10], n_per_length=32, seed=11, fractions=(0.5, 0.5, 0.0))
    n_all = editor.n_layers * editor.n_heads * editor.d_head
    cfg = FitConfig(budget=n_all, k_fractions=(1.0,), steps=args.steps, progress=False)
    res = fit_edit(editor.layout, editor.log, tok, d["train"], d["dev"], cfg, folded=editor.folded)
    editor.reset()
    out = {"torch_threads": torch.get_num_threads(), "dense_components": n_all, "steps": args.steps,
           "batch_size": cfg.batch_size, "timings": res.timings,
           "dense_fit_seconds": res.timings["dense_fit"], "dense_dev_before": res.dev_before,
           "dense_dev_after": res.dev_after, "dense_dev_guard_change": res.guard_change}
    # layer cache speed-up for a fit of the heads of layers >= 18
    heads = [(l, h) for l in range(18, editor.n_layers) for h in range(editor.n_heads)]
    problem = FitProblem(editor.model, editor.layout, tok, d["train"].to_list(), d["dev"].to_list(), cfg)
    fit = ChannelFit(editor.layout, heads, ("ov",), editor.folded)
    full = _step_seconds(problem, fit, 0)
    cached = _step_seconds(problem, fit, 18)
    out.update(step_seconds_full=full, step_seconds_from_layer18=cached, layer_cache_speedup=full / cached)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
