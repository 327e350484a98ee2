"""Benchmark: candidate evaluation with the lower layers reused, against the full forward (issue 15).

    PYTHONPATH=. python benchmarks/bench_candidates.py [--first-layer 18] [--out benchmarks/results/bench_candidates.json]

On SmolLM2-135M (30 layers), candidates are single OV components of heads in layers >= ``first_layer``
rescaled by 2 (an exact weight edit, undone after each). Measured side by side in one run:

1. **Grid-search candidate**: dev evaluation (:func:`th_edit.evaluate.evaluate`, 64 prompts) of each
   candidate, plain vs inside :func:`th_edit.core.layer_cache.reuse_lower_layers` (as
   :func:`th_edit.analysis.edit_search.search_edit` runs it).
2. **Discovery measurement**: :func:`th_edit.analysis.roles.inhibition_score` of each candidate on the
   mover heads, plain vs through a :class:`~th_edit.core.layer_cache.LayerCache` advanced to the sender layer
   (as :func:`th_edit.analysis.discovery.find_channels` runs it); senders in layers ``first_layer`` to 22.

Every cached result is checked against the plain one (largest difference printed). The first pass of
the reused evaluation (which fills the cache) is counted in its time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from th_edit import ChannelEditor
from th_edit.analysis.roles import inhibition_score, prompt_cache, receiver_gap
from th_edit.core.layer_cache import reuse_lower_layers
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate
from th_edit.models import load_model
from th_edit.tasks.batching import prompt_batches


def _candidates(editor, first: int, n: int, last: int) -> list[tuple[int, int, int]]:
    """``n`` seeded (layer, head, component) triples with ``first <= layer < last``, sorted by layer."""
    g = torch.Generator().manual_seed(0)
    layers = torch.randint(first, last, (n,), generator=g).tolist()
    heads = torch.randint(0, editor.n_heads, (n,), generator=g).tolist()
    comps = torch.randint(0, 16, (n,), generator=g).tolist()
    return sorted(zip(layers, heads, comps))


def _eval_all(editor, tok, dev, cands):
    out = []
    for l, h, c in cands:
        editor.scale_component(l, h, "ov", c, 2.0)
        try:
            r = evaluate(editor.model, tok, dev, progress=False).records
        finally:
            editor.undo()
        out.append((float(r.correct.mean()), r.logit_diff.to_numpy()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--first-layer", type=int, default=18)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/bench_candidates.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    editor = ChannelEditor(model, tokenizer=tok)
    data = laundry_list(tok, lengths=[5, 8, 10], n_per_length=64, seed=21)
    dev = data["dev"].select(range(48))
    cands = _candidates(editor, args.first_layer, args.candidates, editor.n_layers)
    result: dict = {"model": "smollm2", "first_layer": args.first_layer, "candidates": cands,
                    "torch_threads": torch.get_num_threads(), "dev_prompts": len(dev)}

    t = time.perf_counter()
    plain = _eval_all(editor, tok, dev, cands)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    with reuse_lower_layers(model, editor.layout, min(l for l, _, _ in cands)) as reuse:
        cached = _eval_all(editor, tok, dev, cands)
    t_cached = time.perf_counter() - t
    diff = max(float(abs(a[1] - b[1]).max()) for a, b in zip(plain, cached))
    same_acc = all(a[0] == b[0] for a, b in zip(plain, cached))
    result["grid_search"] = {"plain_s": t_plain, "reused_s": t_cached, "speedup": t_plain / t_cached,
                             "hits": reuse.hits, "misses": reuse.misses, "max_logit_diff_change": diff,
                             "same_accuracy": same_acc}
    print(f"grid-search candidates: plain {t_plain:.1f} s, reused {t_cached:.1f} s -> {t_plain / t_cached:.2f}x "
          f"(max |logit diff change| {diff:.2e}, same accuracy: {same_acc})")

    movers = [(23, 0), (23, 1), (28, 1)]  # the mover heads find_channels reports on SmolLM2
    cands = _candidates(editor, args.first_layer, args.candidates, 23)  # senders below the movers
    result["discovery_candidates"] = cands
    batches = prompt_batches(tok, data["train"], 8, 32)
    base = receiver_gap(model, batches, movers)
    t = time.perf_counter()
    plain_s = [inhibition_score(editor, batches, c, movers, base_gap=base) for c in cands]
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    cache = prompt_cache(editor, batches, cands[0][0])
    cached_s = []
    for c in cands:
        cache.advance(c[0])
        cached_s.append(inhibition_score(editor, batches, c, movers, base_gap=base, cache=cache))
    t_cached = time.perf_counter() - t
    diff = max(float((a - b).abs().max()) for a, b in zip(plain_s, cached_s))
    result["discovery"] = {"plain_s": t_plain, "cached_s": t_cached, "speedup": t_plain / t_cached,
                           "max_score_change": diff}
    print(f"discovery measurements: plain {t_plain:.1f} s, cached {t_cached:.1f} s -> {t_plain / t_cached:.2f}x "
          f"(max |score change| {diff:.2e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
