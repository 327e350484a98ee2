"""The data-based roles of the heads a science run compared: discovered heads, the heads the fit chose
(condition h) and the random heads of (c), on the run's own training prompts (never the test split).

    PYTHONPATH=. python benchmarks/head_roles.py --model smollm2 --results benchmarks/results/fit_science_smollm2_current.json

Prints one Markdown row per head: its mover-score rank among all heads, attention to the target and to the
other items at the answer position, direct logit difference, and previous-token / duplicate-token /
induction scores on repeated random tokens (th_edit.roles).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fit_science import SETTINGS  # noqa: E402  (the same data as the science runs)

from th_edit import ChannelEditor  # noqa: E402
from th_edit.analysis.roles import mover_scores, sequence_roles  # noqa: E402
from th_edit.data import laundry_list  # noqa: E402
from th_edit.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--results", required=True)
    ap.add_argument("--prompts", type=int, default=48)
    args = ap.parse_args()
    res = json.loads(Path(args.results).read_text())
    conds = res["conditions"]
    groups = {"discovered": [tuple(h) for h in res["findings"]["discovered_heads"]],
              "fit-chosen (h)": [tuple(h) for h in conds["h_fit_heads_32"]["heads"]]}
    for s in range(3):
        groups[f"random seed {s}"] = [tuple(h) for h in conds[f"c_random_32_seed{s}"]["heads"]]
    model, tok = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tok)
    st = SETTINGS[args.model]
    weak = list(st["weak"])
    per = st["n_train"] // len(weak)
    train = laundry_list(tok, lengths=weak, n_per_length=per + 16, seed=11,
                         fractions=(per / (per + 16), 16 / (per + 16), 0.0))["train"]
    movers = mover_scores(editor, tok, train, limit=args.prompts, progress=False).reset_index(drop=True)
    rank = {(int(r.layer), int(r.head)): i + 1 for i, r in enumerate(movers.itertuples())}
    row = {(int(r.layer), int(r.head)): r for r in movers.itertuples()}
    roles = sequence_roles(model)
    n_heads = editor.n_layers * editor.n_heads
    print(f"### {args.model}: head roles on {min(args.prompts, len(train))} training prompts ({n_heads} heads)\n")
    print("| group | head | mover rank | attn target | attn others | logit diff | prev-token | dup-token | induction |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, heads in groups.items():
        for l, h in heads:
            r = row[(l, h)]
            print(f"| {name} | {l}.{h} | {rank[(l, h)]} | {r.attn_target:.3f} | {r.attn_others:.3f} | {r.logit_diff:+.3g} | "
                  f"{float(roles['previous_token'][l, h]):.2f} | {float(roles['duplicate_token'][l, h]):.2f} | "
                  f"{float(roles['induction'][l, h]):.2f} |")
    print()
    for name, heads in groups.items():
        ranks = sorted(rank[h] for h in heads)
        print(f"{name}: median mover rank {ranks[len(ranks) // 2]} of {n_heads}; in the top 20: "
              f"{sum(r <= 20 for r in ranks)} of {len(ranks)}")


if __name__ == "__main__":
    random.seed(0)
    main()
