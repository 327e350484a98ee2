"""Find inhibition and duplicate-detection channels and plot them.

    python examples/find_channels.py [MODEL] --out DIR

MODEL: a bundled model name (default smollm2), a local directory or a Hub id. Writes channels.csv, the
Q-composition heatmap into the top mover head and the component profile of the top inhibition head.
"""

import argparse
from pathlib import Path

from th_edit import ChannelEditor
from th_edit.app.plots import plot_component_profile, plot_receiver_heatmap
from th_edit.data import laundry_list
from th_edit.models import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--n-prompts", type=int, default=32)
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    data = laundry_list(tokenizer, lengths=[3, 5, 8], n_per_length=2 * args.n_prompts // 3 + 2, seed=0)
    cmap = editor.channel_map(modes=("q", "k", "v"), progress=False)
    found = editor.find_channels(data["train"], n_prompts=args.n_prompts, channel_map=cmap, progress=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found.channels.to_csv(out / "channels.csv", index=False)
    print("mover heads:", found.meta["movers"], "| inhibition heads:", found.inhibition_heads)
    print(found.top("inhibition", 5)[["sender_layer", "sender_head", "sender_component", "receiver_layer",
                                      "receiver_head", "score", "inhibition_score"]].to_string(index=False))
    mover, inhibitor = found.meta["movers"][0], found.inhibition_heads[0]
    plot_receiver_heatmap(cmap, "q", mover, out / "heatmap.png", baseline="zscore")
    later = [m for m in found.meta["movers"] if m[0] > inhibitor[0]]
    plot_component_profile(cmap, "q", inhibitor, later, out / "profile.png")
    print("plots written to", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
