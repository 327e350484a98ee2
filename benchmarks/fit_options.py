"""Choose the fit's options on held-in data only (issue 26): each variant of :class:`FitConfig` (and of the
training prompts) is fitted on train, its k chosen on the fit's dev split as usual, and then scored on a
separate *selection* split (same template and pool as the test, another seed, hash-assigned to dev, so
never a test prompt). The test split is not built here at all.

    PYTHONPATH=. python benchmarks/fit_options.py --model smollm2 --out benchmarks/results/fit_options_smollm2.json
    PYTHONPATH=. python benchmarks/fit_options.py --model smollm2 --only base,long --budgets 64

Variants share everything but what their name says (see ``VARIANTS``); the dense fit is shared by the
budgets of one variant. Results are written after every fit, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fit_science import SETTINGS, Scorer, prompt_set_hash

from th_edit import ChannelEditor
from th_edit.data import laundry_list
from th_edit.edits.fit import FitConfig, fit_edit
from th_edit.evaluate import guard_loss, wilson_interval
from th_edit.models import load_model

logger = logging.getLogger("fit_options")

COMMON = dict(k_fractions=(1.0,), guard_weights=(2.0,), progress=False, seed=0)
LONG = dict(steps=48, refit_steps=30, lr_schedule="cosine")
#: name -> (FitConfig overrides, training data recipe)
VARIANTS = {
    "base": (dict(steps=12, refit_steps=10), "omitted"),
    "base_varied": (dict(steps=12, refit_steps=10), "varied"),
    "base_qk": (dict(steps=12, refit_steps=10, circuits=("ov", "qk")), "omitted"),
    "base_coupling": (dict(steps=12, refit_steps=10, coupling_band=1024), "omitted"),
    "base_rounds2": (dict(steps=12, refit_steps=10, rounds=2), "omitted"),
    "base_cosine": (dict(steps=12, refit_steps=10, lr_schedule="cosine"), "omitted"),
    "mid_varied": (dict(steps=24, refit_steps=20, lr_schedule="cosine"), "varied"),
    "base_refit30": (dict(steps=12, refit_steps=30, lr_schedule="cosine"), "omitted"),
    "base_rounds2_refit30": (dict(steps=12, refit_steps=30, rounds=2, lr_schedule="cosine"), "omitted"),
    "base_refit30_coupling": (dict(steps=12, refit_steps=30, lr_schedule="cosine", coupling_band=1024), "omitted"),
    "long": (LONG, "omitted"),
    "long_qk": ({**LONG, "circuits": ("ov", "qk")}, "omitted"),
    "long_varied": (LONG, "varied"),
    "long_rounds2": ({**LONG, "rounds": 2}, "omitted"),
    "long_coupling": ({**LONG, "coupling_band": 1024}, "omitted"),  # every pair of a head's kept components
    "long_varied_coupling": ({**LONG, "coupling_band": 1024}, "varied"),
}
#: the extra (template, pool, seed) streams of the "varied" training data; the transfer split's template
#: (omitted_packed) and pool (toys) are never among them
VARIED = (("omitted_shopping", "hardware", 21), ("omitted_lent", "household", 22))


def training_data(tok, recipe: str, weak, per: int):
    """``(train, dev)``: the science run's fit data (omitted, household, seed 11), plus for ``"varied"`` as many
    prompts again from each stream of :data:`VARIED` (train only; dev stays the science run's)."""
    base = laundry_list(tok, lengths=weak, n_per_length=per + 16, seed=11,
                        fractions=(per / (per + 16), 16 / (per + 16), 0.0))
    train, dev = base["train"].to_list(), base["dev"]
    if recipe == "varied":
        for template, pool, seed in VARIED:
            train += laundry_list(tok, lengths=weak, n_per_length=per, seed=seed, template=template, items=pool,
                                  fractions=(1.0, 0.0, 0.0))["train"].to_list()
    return train, dev


def table(path: str, reference: str = "base") -> None:
    """Markdown table of a results file: per variant and budget the selection accuracy with its Wilson interval,
    and the paired difference to ``reference`` at the same budget (95% interval, exact McNemar p)."""
    from fit_science import paired

    res = json.loads(Path(path).read_text())
    print(f"selection split: {res['select_n']} prompts, unedited accuracy {res['select_before']:.3f}\n")
    print(f"| variant | budget | components | selection accuracy [95% CI] | vs {reference} [95% CI] | McNemar p | "
          "guard change | fit s |")
    print("| :--- | ---: | ---: | :--- | :--- | ---: | ---: | ---: |")
    rows = res["variants"]
    for key, v in sorted(rows.items(), key=lambda kv: (kv[1]["budget"], kv[0])):
        ref = rows.get(f"{reference}@{v['budget']}")
        diff, p = "", ""
        if ref is not None and key != f"{reference}@{v['budget']}":
            g = paired([c == "1" for c in ref["select_outcomes"]], [c == "1" for c in v["select_outcomes"]])
            diff, p = f"{g['gain']:+.3f} [{g['gain_ci'][0]:+.3f}, {g['gain_ci'][1]:+.3f}]", f"{g['mcnemar']['p']:.2g}"
        lo, hi = v["select_ci"]
        print(f"| {key.split('@')[0]} | {v['budget']} | {v['n_components']} | {v['select_after']:.3f} "
              f"[{lo:.3f}, {hi:.3f}] | {diff} | {p} | {100 * v['guard_change']:+.2f}% | {v['seconds']:.0f} |")


def main() -> None:
    if "--table" in sys.argv:
        return table(sys.argv[sys.argv.index("--table") + 1])
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--budgets", default="64", help="comma-separated budgets")
    ap.add_argument("--n-select", type=int, default=32, help="selection prompts per list length")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out or f"benchmarks/results/fit_options_{args.model}.json")
    results = json.loads(out.read_text()) if out.exists() else {"model": args.model, "variants": {}}
    model, tok = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tok)
    st = SETTINGS[args.model]
    weak, per = list(st["weak"]), st["n_train"] // len(st["weak"])
    select = laundry_list(tok, lengths=weak, n_per_length=args.n_select, seed=16, fractions=(0.0, 1.0, 0.0))["dev"]
    test = laundry_list(tok, lengths=weak, n_per_length=200, seed=12, fractions=(0.0, 0.0, 1.0))["test"]
    overlap = {r["prompt"] for r in select} & {r["prompt"] for r in test}
    assert not overlap, f"{len(overlap)} selection prompts are test prompts"
    del test  # built only to prove the selection split is disjoint from it
    digest = prompt_set_hash(select.to_list())
    if results.setdefault("select_hash", digest) != digest:
        raise SystemExit(f"{out} was measured on another selection split: write a new file (--out).")
    scorer = Scorer(editor, tok, select, "select")
    base_correct = scorer.correct(0)
    base_guard = guard_loss(model, tok)
    results.update(select_n=len(select), select_before=sum(base_correct) / len(select), guard_before=base_guard)
    only = set(filter(None, args.only.split(",")))
    budgets = [int(b) for b in args.budgets.split(",")]
    for name, (overrides, recipe) in VARIANTS.items():
        if only and name not in only:
            continue
        train, dev = training_data(tok, recipe, weak, per)
        dense = None
        for budget in budgets:
            key = f"{name}@{budget}"
            if key in results["variants"]:
                continue
            t1 = time.perf_counter()
            cfg = FitConfig(budget=budget, **{**COMMON, **overrides})
            r = fit_edit(editor.layout, editor.log, tok, train, dev, cfg, folded=editor.folded, dense_from=dense)
            dense = dense or r
            after = scorer.correct(min(e.layer for e in editor.edits) if editor.edits else 0)
            k = sum(after)
            results["variants"][key] = {
                "overrides": {k_: list(v) if isinstance(v, tuple) else v for k_, v in overrides.items()},
                "train": recipe, "n_train": len(train), "budget": budget, "n_components": r.n_components,
                "dev_after": r.dev_after["all"], "select_after": k / len(select),
                "select_ci": wilson_interval(k, len(select)),
                "select_gain": (k - sum(base_correct)) / len(select),
                "guard_change": guard_loss(model, tok) / base_guard - 1.0,
                "timings": r.timings, "seconds": time.perf_counter() - t1,
                "select_outcomes": "".join("1" if c else "0" for c in after)}
            editor.reset()
            out.write_text(json.dumps(results, indent=1, default=str) + "\n")
            v = results["variants"][key]
            logger.info("%s: select %.3f (gain %+.3f), dev %.3f, guard %+.2f%%, %.0f s", key, v["select_after"],
                        v["select_gain"], v["dev_after"], 100 * v["guard_change"], v["seconds"])


if __name__ == "__main__":
    main()
