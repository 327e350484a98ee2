"""Evaluation throughput on the bundled real model, side by side in one run.

    python benchmarks/bench_eval.py [--n 24] [--lengths 3 5 8 10 15 20] [--batch-size 16]

Measures examples per second of
  (1) th_edit.evaluate.evaluate (batched, with all bookkeeping),
  (2) a plain loop, one prompt at a time, computing the same metrics from full logits,
  (3) a bare batched forward pass over the same batches (same padding, same logits_to_keep), nothing else,
and prints the ratios: target (1)/(2) >= 3 and (1)/(3) >= 0.8.
"""

import argparse
import time

import torch

from th_edit.data import first_token, laundry_list
from th_edit.evaluate import evaluate, plan_batches
from th_edit.models import load_default_model
from th_edit.tasks.batching import accepts_logits_to_keep


def plain_loop(model, tok, rows):
    correct = 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tok(r["prompt"])["input_ids"]])
            logits = model(ids).logits[0, -1]
            cand = [first_token(tok, w) for w in r["items"]]
            correct += int(int(logits[cand].argmax()) == r["items"].index(r["target"]))
    return correct / len(rows)


def bare_batched(model, tok, rows, batch_size):
    seqs = tok([r["prompt"] for r in rows])["input_ids"]
    kw = accepts_logits_to_keep(model)
    with torch.no_grad():
        for batch in plan_batches([len(s) for s in seqs], batch_size):
            lens = [len(seqs[i]) for i in batch]
            width = max(lens)
            ids = torch.full((len(batch), width), tok.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(batch):
                ids[b, :lens[b]], mask[b, :lens[b]] = torch.tensor(seqs[i]), 1
            model(input_ids=ids, attention_mask=mask, **({"logits_to_keep": width - min(lens) + 1} if kw else {}))


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="examples per list length in the measured split")
    p.add_argument("--lengths", type=int, nargs="+", default=[3, 5, 8, 10, 15, 20])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_default_model()
    rows = laundry_list(tok, lengths=args.lengths, n_per_length=4 * args.n, seed=0)["test"]
    n = len(rows)
    listed = rows.to_list()
    evaluate(model, tok, rows.select(range(8)), progress=False)  # warm-up
    t_eval, res = timed(lambda: evaluate(model, tok, rows, batch_size=args.batch_size, progress=False), args.repeats)
    t_bare, _ = timed(lambda: bare_batched(model, tok, listed, args.batch_size), args.repeats)
    t_loop, acc_loop = timed(lambda: plain_loop(model, tok, listed), 1)
    print(f"SmolLM2-135M, {n} Laundry List prompts (lengths {args.lengths}), batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"  th_edit evaluate : {n / t_eval:7.2f} examples/s  (accuracy {res.accuracy:.3f})")
    print(f"  plain loop       : {n / t_loop:7.2f} examples/s  (accuracy {acc_loop:.3f})")
    print(f"  bare batched fwd : {n / t_bare:7.2f} examples/s")
    print(f"  evaluate / loop  : {t_loop / t_eval:5.2f}x   (target >= 3x)")
    print(f"  evaluate / bare  : {t_bare / t_eval:5.2f}    (target >= 0.80)")


if __name__ == "__main__":
    main()
