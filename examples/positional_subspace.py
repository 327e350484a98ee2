"""The positional subspace of an inhibition head: scatter, decodability, traversal, steering search.

    python examples/positional_subspace.py [MODEL] --out DIR [--n-prompts 16]

Finds the top inhibition head and mover head (th_edit.analysis.discovery.find_channels), fits a 3-D subspace to
the inhibition head's output at the final position projected on its strongest channel components,
measures how well the target's list position is decodable from it, traverses it (which item does the
model predict, which item does the mover head attend to), and searches a steering scale on dev.
"""

import argparse
from pathlib import Path

from th_edit import ChannelEditor
from th_edit.analysis.subspace import fit_positional_subspace, search_steering, traverse
from th_edit.app.plots import plot_subspace, plot_traversal
from th_edit.data import laundry_list
from th_edit.models import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--n-prompts", type=int, default=16, help="prompts for channel discovery")
    p.add_argument("--n", type=int, default=80, help="examples per list length")
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--traverse-prompts", type=int, default=8)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    data = laundry_list(tokenizer, lengths=[3, 5, 8, 10], n_per_length=args.n, seed=0)
    found = editor.find_channels(data["train"], n_prompts=args.n_prompts, progress=False)
    (l, h), mover = found.inhibition_heads[0], found.meta["movers"][0]
    top = found.top("inhibition", 20)
    comps = [int(c) for c in top[(top.sender_layer == l) & (top.sender_head == h)].sender_component]
    comps = list(dict.fromkeys(comps + [0, 1, 2, 3]))[:4]
    print(f"inhibition head {l}.{h}, components {comps}; mover head {mover[0]}.{mover[1]}")

    sub = fit_positional_subspace(editor, tokenizer, data["train"], l, h, comps, n_dims=3)
    print("variance explained by the 3 axes:", [round(float(x), 3) for x in sub.explained])
    print("target position decodable from the subspace (held-out nearest centroid):")
    print(sub.decodability.round(3).to_string(index=False))
    plot_subspace(sub, out / "subspace_all.png")
    plot_subspace(sub, out / "subspace_len5.png", length=5)

    rows = data["dev"].filter(lambda r: r["list_length"] == 5).to_list()[: args.traverse_prompts]
    frame = traverse(editor, tokenizer, rows, sub, mover, grid=args.grid)
    frame.to_csv(out / "traversal.csv", index=False)
    plot_traversal(frame, out / "traversal.png", title=f"traversing {l}.{h}'s subspace (lists of 5)")
    agree = float((frame.predicted_index == frame.attended_index).mean())
    print(f"traversal: {frame.predicted_index.nunique()} distinct predicted positions over the grid; "
          f"prediction = mover's most-attended item in {agree:.0%} of cases")

    res = search_steering(editor, tokenizer, data["dev"], data["test"], l, h, comps[:1])
    print(f"steering component {comps[0]} of {l}.{h} at the final position: chosen scale {res.alpha} on dev")
    b, s = res.test_base.by_length(), res.test_steered.by_length()
    for n, a0, a1 in zip(b.list_length, b.accuracy, s.accuracy):
        print(f"  test accuracy, lists of {n}: {a0:.3f} -> {a1:.3f}")
    print("figures written to", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
