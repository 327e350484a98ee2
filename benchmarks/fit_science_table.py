"""Render benchmarks/results/fit_science_<model>.json as a Markdown table, and compare two conditions
prompt by prompt (paired difference with a 95% interval and an exact McNemar test on the test split).

    python benchmarks/fit_science_table.py benchmarks/results/fit_science_smollm2_current.json
    python benchmarks/fit_science_table.py RESULTS.json --compare c_discovered_32 c_random_32_seed0
    python benchmarks/fit_science_table.py RESULTS.json --compare g_heads_of_256/random_seed0 g_heads_of_256/discovered
    python benchmarks/fit_science_table.py RESULTS.json --mass   # where the budget-256 edit sits, by head and layer
    python benchmarks/fit_science_table.py RESULTS.json --ratio b_budget_256 f_lora_r8  # share of LoRA's gain
"""

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fit_science import paired, plan_head_mass  # noqa: E402  (the same statistics as the runs)


def fmt_ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{lo:+.3f}, {hi:+.3f}]"


def main(path: str) -> None:
    res = json.loads(open(path).read())
    print(f"### {res['model']}  (guard loss before: {res.get('guard_before', float('nan')):.4f})\n")
    print("| condition | split | n | before | after | gain [95% CI] | McNemar p (fixed/broken) | comps / params | guard change |")
    print("| :--- | :--- | ---: | ---: | ---: | :--- | :--- | ---: | ---: |")
    rows = []
    for name, row in res.get("conditions", {}).items():
        if "subsets" in row:  # g_heads_of_256: one row per restriction of the plan
            rows += [(f"{name}/{sub}", r) for sub, r in row["subsets"].items()]
        else:
            rows.append((name, row))
    for name, row in rows:
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


def compare(path: str, a: str, b: str, split: str = "test") -> None:
    """Condition ``b`` against ``a`` on the same prompts: ``gain`` is b's accuracy minus a's."""
    conds = json.loads(open(path).read())["conditions"]

    def row(name: str) -> dict:  # "cond" or "cond/subset" (the subsets of g_heads_of_256)
        cond, _, sub = name.partition("/")
        return conds[cond]["subsets"][sub] if sub else conds[cond]

    oa, ob = (row(n).get(f"{split}_outcomes") for n in (a, b))
    if oa is None or ob is None:
        raise SystemExit(f"{a} or {b} has no stored per-prompt outcomes for {split} (rerun it with this script)")
    g = paired([c == "1" for c in oa], [c == "1" for c in ob])
    m = g["mcnemar"]
    print(f"| {b} vs {a} | {split} | {g['n']} | {g['before']:.3f} | {g['after']:.3f} | {g['gain']:+.3f} "
          f"{fmt_ci(g['gain_ci'])} | {m['p']:.2g} ({m['fixed']}/{m['broken']}) |")


def gain_ratio(path: str, a: str, b: str, split: str = "test", n_boot: int = 2000, seed: int = 0) -> dict:
    """``a``'s held-out gain as a share of ``b``'s (both over the unedited outcomes of the same prompts), with a
    95% percentile-bootstrap interval over prompts (paired: one resample serves both)."""
    import random

    res = json.loads(open(path).read())
    base = [c == "1" for c in res["baseline_outcomes"][split]]
    oa, ob = ([c == "1" for c in res["conditions"][n][f"{split}_outcomes"]] for n in (a, b))
    n = len(base)

    def ratio(idx) -> float:
        ga = sum(oa[i] - base[i] for i in idx)
        gb = sum(ob[i] - base[i] for i in idx)
        return ga / gb if gb else float("nan")

    rng = random.Random(seed)
    boots = sorted(r for r in (ratio([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot)) if r == r)
    ci = (boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]) if boots else (float("nan"),) * 2
    out = {"ratio": ratio(range(n)), "ci": ci, "n": n, "a": a, "b": b, "split": split}  # nan: b gained nothing
    print(f"| {a} / {b} | {split} | {n} | {out['ratio']:.1%} | [{out['ci'][0]:.1%}, {out['ci'][1]:.1%}] |")
    return out


def mass(path: str, top: int = 12) -> None:
    """Where the budget-256 plan (``RESULTS.plan256``) sits: sum of |log scale| per head and per layer, and
    the share in the discovered heads of the results' findings."""
    found = {tuple(h) for h in json.loads(open(path).read()).get("findings", {}).get("discovered_heads", [])}
    per_head, n_comp = plan_head_mass(Path(path).with_suffix(".plan256"))
    total = sum(per_head.values())
    print(f"{len(per_head)} heads edited; share of sum |log scale| in the {len(found)} discovered heads: "
          f"{sum(per_head[h] for h in found) / total:.1%} ({sum(n_comp[h] for h in found)} components)")
    print("| head | sum abs log scale | share | components | discovered |\n| :--- | ---: | ---: | ---: | :---: |")
    for (l, h), v in per_head.most_common(top):
        print(f"| {l}.{h} | {v:.2f} | {v / total:.1%} | {n_comp[(l, h)]} | {'yes' if (l, h) in found else ''} |")
    layers = Counter()
    for (l, _), v in per_head.items():
        layers[l] += v
    print("by layer: " + ", ".join(f"{l}: {v / total:.0%}" for l, v in sorted(layers.items())))


if __name__ == "__main__":
    if "--mass" in sys.argv:
        mass(sys.argv[1])
    elif "--ratio" in sys.argv:
        i = sys.argv.index("--ratio")
        gain_ratio(sys.argv[1], sys.argv[i + 1], sys.argv[i + 2], *(sys.argv[i + 3:i + 4]))
    elif "--compare" in sys.argv:
        i = sys.argv.index("--compare")
        compare(sys.argv[1], sys.argv[i + 1], sys.argv[i + 2])
    else:
        main(sys.argv[1])
