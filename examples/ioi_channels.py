"""IOI: find the mover and inhibition heads and measure the top inhibition channel's effect.

    python examples/ioi_channels.py [MODEL] [--n 200]

Builds the IOI dataset, evaluates IO-vs-S accuracy, runs find_channels on the train split, then removes
the top inhibition channel's sender component (and, as a control, the next-ranked one from another head)
and reports the test split's IO-vs-S logit difference. Nothing is selected on the test split.
"""

import argparse

from th_edit import ChannelEditor
from th_edit.data import ioi
from th_edit.evaluate import evaluate
from th_edit.models import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--n-prompts", type=int, default=32)
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    data = ioi(tokenizer, n=args.n, seed=0)

    def score():
        r = evaluate(model, tokenizer, data["test"], progress=False)
        return r.accuracy, float(r.records.logit_diff.mean())

    acc, diff = score()
    print(f"IOI test: accuracy {acc:.3f}, IO-vs-S logit difference {diff:.3f}")
    found = editor.find_channels(data["train"], n_prompts=args.n_prompts, progress=False)
    print("mover heads:", found.meta["movers"], "| inhibition heads:", found.inhibition_heads,
          "| spearman(weight, causal):", {k: round(v, 2) for k, v in found.rank_correlation.items()})
    top = found.top("inhibition", 10)
    first = top.iloc[0]
    control = top[(top.sender_layer != first.sender_layer) | (top.sender_head != first.sender_head)].iloc[0]
    for label, row in (("top inhibition channel", first), ("control (next head)", control)):
        l, h, c = int(row.sender_layer), int(row.sender_head), int(row.sender_component)
        editor.scale_component(l, h, "ov", c, 0.0)
        a, d = score()
        editor.undo()
        print(f"removing {label} {l}.{h}[{c}] -> {int(row.receiver_layer)}.{int(row.receiver_head)} "
              f"(score {row.score:.3f}, inhibition {row.inhibition_score:+.3f}): accuracy {a:.3f}, "
              f"logit difference {d:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
