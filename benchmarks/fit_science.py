"""Science runs for th_edit.edits.fit (issue 12): held-out gains with 95% intervals and McNemar tests.

    PYTHONPATH=. python benchmarks/fit_science.py --model smollm2 --out benchmarks/results/fit_science_smollm2.json

Data (all from th_edit.data): fit on the ``omitted`` template with the ``household`` pool (seed 11);
dev from the same stream (disjoint prompts); test from seed 12. Transfer: the ``omitted_packed``
template with the ``toys`` pool (never used in fitting). Spillover: the ``recall`` template and IOI.
k and term weights are chosen on dev only; every test split is read once per condition, for the table.
Results are written after every condition, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from th_edit import ChannelEditor
from th_edit.data import ioi, laundry_list
from th_edit.evaluate import guard_loss, wilson_interval
from th_edit.edits.fit import FitConfig, fit_edit
from th_edit.edits.fit_data import FitProblem, task_batches
from th_edit.core.layer_cache import LayerCache
from th_edit.models import load_model

logger = logging.getLogger("fit_science")

SETTINGS = {
    "smollm2": dict(weak=(5, 8, 10), n_train=48),
    "gemma3-270m": dict(weak=(8, 10, 15), n_train=48),
}


# ----- statistics -------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    return wilson_interval(k, n, z)


def _save_dense(dense: dict, path) -> None:
    """The dense log-scales as safetensors (keys ``layer.head.circuit``): no pickle."""
    from safetensors.torch import save_file

    save_file({f"{l}.{h}.{c}": t.contiguous() for (l, h, c), t in dense.items()}, str(path))


def _load_dense(path) -> dict:
    from safetensors.torch import load_file

    return {(int(k.split(".")[0]), int(k.split(".")[1]), k.split(".")[2]): t for k, t in load_file(str(path)).items()}


def mcnemar_exact(before: list[bool], after: list[bool]) -> dict:
    """Exact two-sided McNemar test on paired outcomes (binomial test of the discordant pairs)."""
    b = sum(1 for x, y in zip(before, after) if not x and y)  # fixed by the edit
    c = sum(1 for x, y in zip(before, after) if x and not y)  # broken by the edit
    n = b + c
    if n == 0:
        return {"fixed": 0, "broken": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return {"fixed": b, "broken": c, "p": min(1.0, 2 * tail)}


def paired(before: list[bool], after: list[bool]) -> dict:
    n = len(before)
    d = [int(y) - int(x) for x, y in zip(before, after)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    kb, ka = sum(before), sum(after)
    return {"n": n, "before": kb / n, "before_ci": wilson(kb, n), "after": ka / n, "after_ci": wilson(ka, n),
            "gain": mean, "gain_ci": (mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n)),
            "mcnemar": mcnemar_exact(before, after)}


# ----- scoring with a layer cache ----------------------------------------------------------------
class Scorer:
    """Per-example correctness on a fixed split, reusing cached hidden states below the first edited layer."""

    def __init__(self, editor, tok, dataset, name: str) -> None:
        self.editor, self.tok, self.name = editor, tok, name
        self.rows = dataset.to_list()
        self.lengths = [int(r["list_length"]) for r in self.rows]
        self._cache: dict[int, tuple] = {}
        self.problem = None

    def correct(self, first_layer: int = 0) -> list[bool]:
        first_layer = max(0, min(first_layer, self.editor.n_layers - 1))
        if first_layer not in self._cache:
            self._cache.clear()
            cache = LayerCache(self.editor.model, self.editor.layout, first_layer, max_bytes=2 << 30)
            batches = task_batches(cache, self.tok, self.rows, 32, torch.device("cpu"))
            self._cache[first_layer] = (cache, batches)
        cache, batches = self._cache[first_layer]
        out = [False] * len(self.rows)
        helper = FitProblem.__new__(FitProblem)
        helper.keep, helper.device = True, torch.device("cpu")
        with torch.no_grad():
            for b in batches:
                cl = FitProblem.candidate_logits(helper, cache, b)
                for j, i in enumerate(b.rows):
                    out[i] = bool(cl[j].argmax() == b.target[j])
        return out

    def by_length(self, before: list[bool], after: list[bool]) -> dict:
        res = {"all": paired(before, after)}
        for n in sorted(set(self.lengths)):
            idx = [i for i, m in enumerate(self.lengths) if m == n]
            res[str(n)] = paired([before[i] for i in idx], [after[i] for i in idx])
        return res


def plan_head_mass(plan_dir: Path) -> tuple[Counter, Counter]:
    """``(sum of |log scale|, number of components)`` per ``(layer, head)`` of a saved plan."""
    from th_edit.edits.plan import EditPlan

    mass, n_comp = Counter(), Counter()
    for e in EditPlan.load(plan_dir).edits:
        mass[(e.layer, e.head)] += sum(abs(math.log(a)) for a in e.scales)
        n_comp[(e.layer, e.head)] += len(e.components)
    return mass, n_comp


def first_edited_layer(editor) -> int:
    return min((e.layer for e in editor.edits), default=editor.n_layers - 1)


# ----- LoRA anchor ---------------------------------------------------------------------------------
def lora_anchor(editor, tok, train, dev, layers, *, steps: int, lr: float, guard_weight: float, seed: int):
    """Rank-8 LoRA on q_proj/o_proj of ``layers`` with the channel fit's loss (task CE + guard KL)."""
    from peft import LoraConfig, get_peft_model

    cfg = FitConfig(progress=False)
    problem = FitProblem(editor, tok, train.to_list(), dev.to_list(), cfg)
    model = editor.model
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "o_proj"],
                      layers_to_transform=list(layers))
    peft_model = get_peft_model(model, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=lr)
    cache, batches, _, guard = problem.data_from(0)
    rng = random.Random(seed)
    order = []
    for step in range(steps):
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        b = batches[order.pop()]
        opt.zero_grad()
        cl = problem.candidate_logits(cache, b)
        ce = torch.nn.functional.cross_entropy(cl, b.target)
        gi = step % len(guard)
        kl = problem.guard_kl(cache, guard[gi], gi * cfg.guard_texts_per_step)
        (ce + guard_weight * kl).backward()
        opt.step()
        logger.info("lora step %d: ce %.3f kl %.4f", step, ce.item(), kl.item())
    for p in params:
        p.requires_grad_(False)
    return peft_model, n_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated condition names to run (default: all)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guard-weight", type=float, default=2.0)
    ap.add_argument("--refit-steps", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out or f"benchmarks/results/fit_science_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    st = SETTINGS[args.model]
    weak = list(st["weak"])
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("model", args.model)
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return (not only or name in only) and name not in results.get("conditions", {})

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    editor = ChannelEditor(model, tokenizer=tok)
    per = st["n_train"] // len(weak)  # training prompts per length; 16 dev prompts per length
    fitdata = laundry_list(tok, lengths=weak, n_per_length=per + 16, seed=11,
                           fractions=(per / (per + 16), 16 / (per + 16), 0.0))
    train, dev = fitdata["train"], fitdata["dev"]
    test = laundry_list(tok, lengths=weak, n_per_length=args.n_test, seed=12, fractions=(0.0, 0.0, 1.0))["test"]
    transfer = laundry_list(tok, lengths=weak, n_per_length=args.n_test, seed=13, template="omitted_packed",
                            items="toys", fractions=(0.0, 0.0, 1.0))["test"]
    recall = laundry_list(tok, lengths=[3, 5], n_per_length=100, seed=14, template="recall", fractions=(0.0, 0.0, 1.0))["test"]
    ioi_test = ioi(tok, n=200, seed=15, fractions=(0.0, 0.0, 1.0))["test"]
    results["data"] = {"train": len(train), "dev": len(dev), "test": len(test), "transfer": len(transfer),
                       "recall": len(recall), "ioi": len(ioi_test), "weak_lengths": weak,
                       "fit": "omitted template, household pool, seed 11", "test_seed": 12,
                       "transfer_data": "omitted_packed template, toys pool, seed 13"}
    scorers = {"test": Scorer(editor, tok, test, "test"), "transfer": Scorer(editor, tok, transfer, "transfer"),
               "recall": Scorer(editor, tok, recall, "recall"), "ioi": Scorer(editor, tok, ioi_test, "ioi")}
    base_guard = guard_loss(model, tok)
    results["guard_before"] = base_guard
    # unedited per-example outcomes, computed before any edit (kept in the results file to resume)
    stored = results.setdefault("baseline_outcomes", {})
    base: dict = {}
    assert not editor.edits
    for name in scorers:
        if name in stored and len(stored[name]) == len(scorers[name].rows):
            base[name] = [c == "1" for c in stored[name]]
        else:
            base[name] = scorers[name].correct(0)
            stored[name] = "".join("1" if c else "0" for c in base[name])
            save()
        logger.info("baseline %s: %.3f", name, sum(base[name]) / len(base[name]))

    def baseline(name: str) -> list[bool]:
        return base[name]

    dense_path = out.with_suffix(".dense.safetensors")

    conds = results.setdefault("conditions", {})

    def record(name: str, extra: dict, splits=("test",)) -> None:
        layer = first_edited_layer(editor)
        row = dict(extra)
        row["guard_after"] = guard_loss(model, tok)
        row["guard_change"] = row["guard_after"] / base_guard - 1.0
        for s in splits:
            before = baseline(s)
            after = scorers[s].correct(layer) if editor.edits else scorers[s].correct(0)
            row[s] = scorers[s].by_length(before, after)
            row[f"{s}_outcomes"] = "".join("1" if c else "0" for c in after)  # per prompt: paired comparisons
        row["seconds_total"] = time.perf_counter() - t0
        conds[name] = row
        save()
        g = row["test"]["all"]
        logger.info("%s: test %.3f -> %.3f (gain %+.3f, p=%.2g), guard %+.2f%%", name, g["before"], g["after"],
                    g["gain"], g["mcnemar"]["p"], 100 * row["guard_change"])

    def fit_info(r) -> dict:
        return {"n_components": r.n_components, "dev_before": r.dev_before, "dev_after": r.dev_after,
                "dev_guard_change": r.guard_change, "timings": r.timings, "heads": r.heads,
                "trials": r.trials.to_dict("records"),
                "top_components": r.components.reindex(r.components.log_scale.abs().sort_values(ascending=False).index)
                .head(20).to_dict("records")}

    steps = args.steps
    dense_cfg = dict(steps=steps, refit_steps=args.refit_steps, progress=False, seed=0, k_fractions=(1.0, 0.5),
                     guard_weights=(args.guard_weight,))
    # (a) dense, all heads
    dense, dense_info = None, None
    if not want("a_dense_all") and dense_path.exists():
        from types import SimpleNamespace

        dense = SimpleNamespace(dense=_load_dense(dense_path))
    elif want("a_dense_all") or any(want(f"b_budget_{b}") for b in (16, 64, 256, 1024)):
        t1 = time.perf_counter()
        n_all = editor.n_layers * editor.n_heads * editor.d_head
        dense = fit_edit(editor, tok, train, dev, FitConfig(budget=n_all, **{**dense_cfg, "k_fractions": (1.0,)}))
        _save_dense(dense.dense, dense_path)
        info = fit_info(dense)
        info["fit_seconds"] = time.perf_counter() - t1
        dense_info = info
        editor.reset()
    def budget_fit(budget: int) -> None:
        """(b) one budget, reusing the dense fit; the budget-256 plan is kept for (e)."""
        name = f"b_budget_{budget}"
        if not want(name):
            return
        t1 = time.perf_counter()
        r = fit_edit(editor, tok, train, dev, FitConfig(budget=budget, **dense_cfg), dense_from=dense)
        info = fit_info(r)
        info["fit_seconds"] = time.perf_counter() - t1
        record(name, info)
        if budget == 256:
            editor.export_plan().save(out.with_suffix(".plan256"))
        editor.reset()

    budget_fit(256)
    # (e) transfer and spillover of the budget-256 edit (fitted on omitted + household only)
    plan_dir = out.with_suffix(".plan256")
    if want("e_transfer_256") and plan_dir.exists():
        from th_edit.edits.plan import EditPlan

        for e in EditPlan.load(plan_dir).edits:
            editor.apply_edit(e)
        record("e_transfer_256", {"plan": str(plan_dir), "note": "the b_budget_256 edit, re-applied from its plan"},
               splits=("test", "transfer", "recall", "ioi"))
        editor.reset()
    # outcomes of the budget-256 plan for runs recorded before per-prompt outcomes were stored: the plan is
    # re-applied and each split evaluated again; the accuracies must equal the recorded ones
    if "refresh_256_outcomes" in only and plan_dir.exists():
        from th_edit.edits.plan import EditPlan

        for e in EditPlan.load(plan_dir).edits:
            editor.apply_edit(e)
        layer = first_edited_layer(editor)
        for name, splits in (("b_budget_256", ("test",)), ("e_transfer_256", ("test", "transfer", "recall", "ioi"))):
            row = conds.get(name)
            if row is None:
                continue
            for split in splits:
                if f"{split}_outcomes" in row:
                    continue
                after = scorers[split].correct(layer)
                again = scorers[split].by_length(baseline(split), after)
                if abs(again["all"]["after"] - row[split]["all"]["after"]) > 1e-9:
                    raise SystemExit(f"{name} {split}: re-applied plan gives {again['all']['after']}, "
                                     f"recorded {row[split]['all']['after']}")
                row[f"{split}_outcomes"] = "".join("1" if c else "0" for c in after)
                logger.info("%s %s: outcomes stored (accuracy %.3f, as recorded)", name, split, again["all"]["after"])
        save()
        editor.reset()
    # (c) discovered heads vs random heads, budget 32
    findings = None
    if (want("c_discovered_32") or any(want(f"c_random_32_seed{s}") for s in range(3)) or want("d_whole_head")
            or want("g_heads_of_256")):
        t1 = time.perf_counter()
        findings = editor.find_channels(train, progress=False)
        results["findings"] = {"movers": findings.meta.get("movers"), "inhibition_heads": findings.inhibition_heads,
                               "seconds": time.perf_counter() - t1}
        save()
    heads_disc = None
    if findings is not None:
        from th_edit.edits.fit import resolve_heads

        heads_disc = resolve_heads(editor, "discovered", findings=findings)
        results["findings"]["discovered_heads"] = heads_disc
    if heads_disc and want("c_discovered_32"):
        t1 = time.perf_counter()
        r = fit_edit(editor, tok, train, dev, FitConfig(heads=heads_disc, budget=32, **dense_cfg))
        info = fit_info(r)
        info["fit_seconds"] = time.perf_counter() - t1
        record("c_discovered_32", info)
        editor.reset()
    if heads_disc:
        all_heads = [(l, h) for l in range(1, editor.n_layers) for h in range(editor.n_heads)]
        for s in range(3):
            name = f"c_random_32_seed{s}"
            if not want(name):
                continue
            heads = sorted(random.Random(100 + s).sample([h for h in all_heads if h not in heads_disc], len(heads_disc)))
            t1 = time.perf_counter()
            r = fit_edit(editor, tok, train, dev, FitConfig(heads=heads, budget=32, **dense_cfg))
            info = fit_info(r)
            info["fit_seconds"] = time.perf_counter() - t1
            record(name, info)
            editor.reset()
    # (a) the dense fit itself, evaluated
    if want("a_dense_all") and dense_info is not None:
        from th_edit.edits.fit import ChannelFit

        full = ChannelFit(editor, [(l, h) for l in range(editor.n_layers) for h in range(editor.n_heads)], ("ov",),
                          editor.folded)
        full.theta = torch.stack([dense.dense[(u.layer, u.head, u.circuit)] for u in full.units])
        for e in full.edits():
            editor.apply_edit(e)
        record("a_dense_all", dense_info)
        editor.reset()
    # (f) LoRA anchor, rank 8, q_proj/o_proj of all layers (the layers the all-heads fit edits); the
    # learning rate is chosen on dev with the same guard rule as the channel fit (<= 1%, else the best dev)
    if want("f_lora_r8"):
        t1 = time.perf_counter()
        dev_scorer = Scorer(editor, tok, dev, "dev")
        lora_steps = 3 * steps
        trials = []
        for lr in (1e-3, 3e-3):
            peft_model, n_params = lora_anchor(editor, tok, train, dev, range(editor.n_layers), steps=lora_steps,
                                               lr=lr, guard_weight=args.guard_weight, seed=0)
            trials.append({"lr": lr, "dev_accuracy": sum(dev_scorer.correct(0)) / len(dev),
                           "guard_change": guard_loss(model, tok) / base_guard - 1.0})
            logger.info("lora lr %.0e: dev %.3f guard %+.2f%%", lr, trials[-1]["dev_accuracy"],
                        100 * trials[-1]["guard_change"])
            peft_model.unload()
        ok = [t for t in trials if t["guard_change"] <= 0.01] or trials
        best = max(ok, key=lambda t: t["dev_accuracy"])
        # retrain the chosen one (seeded: the same adapter) and evaluate it once on the test splits
        peft_model, n_params = lora_anchor(editor, tok, train, dev, range(editor.n_layers), steps=lora_steps,
                                           lr=best["lr"], guard_weight=args.guard_weight, seed=0)
        row = {"trainable_params": n_params,
               "changed_weight_entries": 2 * editor.n_layers * editor.d_model * editor.n_heads * editor.d_head,
               "fit_seconds": time.perf_counter() - t1, "steps": lora_steps, "lr": best["lr"], "trials": trials,
               "guard_weight": args.guard_weight}
        row["guard_after"] = guard_loss(model, tok)
        row["guard_change"] = row["guard_after"] / base_guard - 1.0
        for s in ("test", "transfer", "recall", "ioi"):
            after = scorers[s].correct(0)
            row[s] = scorers[s].by_length(baseline(s), after)
            row[f"{s}_outcomes"] = "".join("1" if c else "0" for c in after)
        row["seconds_total"] = time.perf_counter() - t0
        conds["f_lora_r8"] = row
        save()
        g = row["test"]["all"]
        logger.info("f_lora_r8: test %.3f -> %.3f (gain %+.3f), guard %+.2f%%", g["before"], g["after"], g["gain"],
                    100 * row["guard_change"])
        peft_model.unload()
    # (b) the other budgets
    for budget in (64, 16, 1024):
        budget_fit(budget)
    # (d) whole-head scaling of the top inhibition heads (alpha chosen on dev)
    if findings is not None and want("d_whole_head"):
        inh = list(findings.inhibition_heads)
        trials = []
        for alpha in (1.5, 2.0, 4.0):
            for l, h in inh:
                editor.scale_component(l, h, "ov", list(range(editor.d_head)), alpha)
            # dev accuracy with the weights edited (no hooks)
            sc = Scorer(editor, tok, dev, "dev")
            dev_acc = sum(sc.correct(min(l for l, _ in inh))) / len(dev)
            trials.append({"alpha": alpha, "dev_accuracy": dev_acc, "guard_change": guard_loss(model, tok) / base_guard - 1})
            editor.reset()
        ok = [t for t in trials if t["guard_change"] <= 0.01] or trials
        best = max(ok, key=lambda t: t["dev_accuracy"])
        for l, h in inh:
            editor.scale_component(l, h, "ov", list(range(editor.d_head)), best["alpha"])
        record("d_whole_head", {"heads": inh, "alpha": best["alpha"], "trials": trials})
        editor.reset()
    # (g) which heads carry the budget-256 edit: its components in the discovered heads alone, against its
    # components in as many random heads (the seeds of (c)); nothing is refitted, the test split is read
    # only for the table
    if findings is not None and heads_disc and plan_dir.exists() and want("g_heads_of_256"):
        from th_edit.edits.plan import EditPlan

        plan_edits = EditPlan.load(plan_dir).edits
        all_heads = [(l, h) for l in range(1, editor.n_layers) for h in range(editor.n_heads)]
        subsets = {"discovered": heads_disc}
        for s in range(3):
            subsets[f"random_seed{s}"] = sorted(
                random.Random(100 + s).sample([h for h in all_heads if h not in heads_disc], len(heads_disc)))
        rows = {}
        for name, heads in subsets.items():
            keep = [e for e in plan_edits if (e.layer, e.head) in set(map(tuple, heads))]
            for e in keep:
                editor.apply_edit(e)
            layer = first_edited_layer(editor)
            after = scorers["test"].correct(layer)
            rows[name] = {"heads": heads, "n_components": sum(len(e.components) for e in keep),
                          "guard_change": guard_loss(model, tok) / base_guard - 1.0,
                          "test": scorers["test"].by_length(baseline("test"), after),
                          "test_outcomes": "".join("1" if c else "0" for c in after)}
            logger.info("g_heads_of_256 %s: %d components, test gain %+.3f", name, rows[name]["n_components"],
                        rows[name]["test"]["all"]["gain"])
            editor.reset()
        conds["g_heads_of_256"] = {"subsets": rows, "note": "the budget-256 edit restricted to the discovered "
                                                            "heads, and to as many random heads"}
        save()
    # (h) heads chosen by the fit itself: as many heads as discovery found, those holding most of the
    # budget-256 edit (sum of |log scale| over each head's components; that plan was chosen on train and dev
    # only), fitted at budget 32 exactly as (c). Does any choice of heads beat random ones at this budget?
    n_disc = len(heads_disc or results.get("findings", {}).get("discovered_heads", []))
    if want("h_fit_heads_32") and plan_dir.exists() and n_disc:
        mass, _ = plan_head_mass(plan_dir)
        heads = sorted(sorted(mass, key=lambda h: -mass[h])[:n_disc])
        t1 = time.perf_counter()
        r = fit_edit(editor, tok, train, dev, FitConfig(heads=heads, budget=32, **dense_cfg))
        info = fit_info(r)
        info.update(fit_seconds=time.perf_counter() - t1, selection="the heads of largest sum |log scale| in the "
                    "budget-256 plan", head_mass={f"{l}.{h}": mass[(l, h)] for l, h in heads})
        record("h_fit_heads_32", info)
        editor.reset()
    results["seconds"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
