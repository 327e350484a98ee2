"""A sparse learned edit in two steps: fit every head, keep the heads that hold most of the edit, refit
only those with a small budget (science condition h in the README).

    python examples/sparse_fit.py [MODEL] [--heads 9] [--budget 32] [--out DIR]

MODEL is a bundled name (``smollm2``, the default; ``gemma3-270m``) or a model directory. Every choice is
made on the train and dev splits; the test split is read once per edit, for the printout. On SmolLM2 with
the defaults this takes a few minutes on 2 CPU cores.
"""

import argparse

from th_edit import ChannelEditor
from th_edit.data import laundry_list
from th_edit.models import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 8, 10])
    parser.add_argument("--n", type=int, default=80, help="prompts per length, all splits together")
    parser.add_argument("--wide-budget", type=int, default=256, help="components of the all-heads fit")
    parser.add_argument("--heads", type=int, default=9, help="heads kept for the sparse refit")
    parser.add_argument("--budget", type=int, default=32, help="components of the sparse refit")
    parser.add_argument("--out", default=None, help="save the sparse edit's plan here")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    data = laundry_list(tokenizer, lengths=args.lengths, n_per_length=args.n, seed=0)
    wide = editor.fit_edit(data["train"], data["dev"], heads="all", budget=args.wide_budget, test=data["test"],
                           progress=False)
    print(f"all heads, {wide.n_components} components: test {wide.test_before} -> {wide.test_after}, "
          f"guard {wide.guard_change:+.2%}")
    heads = wide.top_heads(args.heads)
    print("heads holding most of it:", ", ".join(f"{l}.{h}" for l, h in heads))
    editor.reset()
    narrow = editor.fit_edit(data["train"], data["dev"], heads=heads, budget=args.budget, test=data["test"],
                             progress=False)
    print(f"those heads only, {narrow.n_components} components: test {narrow.test_before} -> {narrow.test_after}, "
          f"guard {narrow.guard_change:+.2%}")
    print(narrow.components.reindex(narrow.components.log_scale.abs().sort_values(ascending=False).index)
          .head(8)[["layer", "head", "component", "singular_value", "alpha"]].round(3).to_string(index=False))
    if args.out:
        editor.save_plan(args.out)
        print("plan saved to", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
