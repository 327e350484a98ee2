"""Render benchmarks/results/fit_science_<model>.json as a Markdown table.

    python benchmarks/fit_science_table.py benchmarks/results/fit_science_smollm2.json
"""

import json
import sys


def fmt_ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{lo:+.3f}, {hi:+.3f}]"


def main(path: str) -> None:
    res = json.loads(open(path).read())
    print(f"### {res['model']}  (guard loss before: {res.get('guard_before', float('nan')):.4f})\n")
    print("| condition | split | n | before | after | gain [95% CI] | McNemar p (fixed/broken) | comps / params | guard change |")
    print("| :--- | :--- | ---: | ---: | ---: | :--- | :--- | ---: | ---: |")
    for name, row in res.get("conditions", {}).items():
        size = row.get("n_components", row.get("trainable_params", ""))
        for split in ("test", "transfer", "recall", "ioi"):
            if split not in row:
                continue
            for key, g in row[split].items():
                if split != "test" and key != "all":
                    continue
                m = g["mcnemar"]
                print(f"| {name} | {split} {key} | {g['n']} | {g['before']:.3f} | {g['after']:.3f} | {g['gain']:+.3f} "
                      f"{fmt_ci(g['gain_ci'])} | {m['p']:.2g} ({m['fixed']}/{m['broken']}) | {size} | {row['guard_change']:+.2%} |")


if __name__ == "__main__":
    main(sys.argv[1])
