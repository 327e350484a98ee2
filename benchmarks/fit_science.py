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
import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from th_edit import ChannelEditor
from th_edit.core.layer_cache import LayerCache
from th_edit.data import ioi, laundry_list
from th_edit.edits.fit import ChannelFit, FitConfig, fit_edit
from th_edit.edits.fit_problem import FitProblem, split_rows, task_batches
from th_edit.evaluate import guard_loss, wilson_interval
from th_edit.models import load_model

logger = logging.getLogger("fit_science")

SETTINGS = {
    "smollm2": dict(weak=(5, 8, 10), n_train=48),
    "gemma3-270m": dict(weak=(8, 10, 15), n_train=48),
}


#: FitConfig fields that change the dense fit (a budget overriding one cannot reuse the shared dense fit)
DENSE_FIELDS = {"heads", "circuits", "steps", "lr", "lr_schedule", "batch_size", "guard_tokens", "guard_texts_per_step",
                "guard_weights", "l1_weights", "max_log_scale", "folded", "seed"}


def prompt_set_hash(rows) -> str:
    """SHA-256 of the ordered (prompt, target) pairs: per-prompt outcomes are only comparable on equal sets."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["target"]]).encode())
    return h.hexdigest()


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


def mean_interval(d: list[float]) -> tuple[float, tuple[float, float]]:
    """Mean of the paired differences ``d`` and its 95% normal interval (``1.96`` standard errors)."""
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    return mean, (mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n))


def paired(before: list[bool], after: list[bool]) -> dict:
    n = len(before)
    mean, ci = mean_interval([int(y) - int(x) for x, y in zip(before, after)])
    kb, ka = sum(before), sum(after)
    return {"n": n, "before": kb / n, "before_ci": wilson(kb, n), "after": ka / n, "after_ci": wilson(ka, n),
            "gain": mean, "gain_ci": ci, "mcnemar": mcnemar_exact(before, after)}


def margin_change(before: list[float], after: list[float]) -> dict:
    """Mean paired change of the answer's margin (logit minus the other items' mean) with a 95% interval."""
    mean, ci = mean_interval([a - b for a, b in zip(after, before)])
    return {"n": len(before), "before": sum(before) / len(before), "mean": mean, "ci": ci}


def random_heads(n_layers: int, n_heads: int, exclude, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` heads (at most as many as there are) drawn with ``random.Random(seed)`` from layers >= 1 outside
    ``exclude``, sorted."""
    pool = [(l, h) for l in range(1, n_layers) for h in range(n_heads) if (l, h) not in exclude]
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


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
        self.last_margins = [0.0] * len(self.rows)  # the answer's logit minus the mean of the other items'
        helper = FitProblem.__new__(FitProblem)
        helper.keep, helper.device = True, torch.device("cpu")
        with torch.no_grad():
            for b in batches:
                cl = FitProblem.candidate_logits(helper, cache, b)
                for j, i in enumerate(b.rows):
                    out[i] = bool(cl[j].argmax() == b.target[j])
                    t, row = int(b.target[j]), cl[j].float()
                    others = torch.cat([row[:t], row[t + 1:]])
                    self.last_margins[i] = float(row[t] - others[torch.isfinite(others)].mean())
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


def first_edited_layer(editor: ChannelEditor) -> int:
    return min((e.layer for e in editor.edits), default=editor.n_layers - 1)


# ----- LoRA anchor ---------------------------------------------------------------------------------
def lora_anchor(editor, tok, train, dev, layers, *, steps: int, lr: float, guard_weight: float, seed: int):
    """Rank-8 LoRA on q_proj/o_proj of ``layers`` with the channel fit's loss (task CE + guard KL)."""
    from peft import LoraConfig, get_peft_model

    cfg = FitConfig(progress=False)
    problem = FitProblem(editor.model, editor.layout, tok, split_rows(train, "train"), split_rows(dev, "dev"), cfg)
    model = editor.model
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "o_proj"],
                      layers_to_transform=list(layers))
    peft_model = get_peft_model(model, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=lr)
    data = problem.data_from(0)
    cache, batches, guard = data.cache, data.train, data.guard
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


def _outcomes(correct: list[bool]) -> str:
    """Per-prompt outcomes as a string of 0/1 (stored for paired comparisons and resuming)."""
    return "".join("1" if c else "0" for c in correct)


class Science:
    """One science run: the model, the splits, the unedited outcomes and the results file; one method per
    condition (a) to (h), each skipped when it is already recorded or not in ``--only``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.out = Path(args.out or f"benchmarks/results/fit_science_{args.model}.json")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.results: dict = json.loads(self.out.read_text()) if self.out.exists() else {}
        self.results.setdefault("model", args.model)
        self.only = set(filter(None, args.only.split(",")))
        self.model, self.tok = load_model(args.model)
        self.editor = ChannelEditor(self.model, tokenizer=self.tok)
        self._data(SETTINGS[args.model])
        self.base_guard = guard_loss(self.model, self.tok)
        self.results["guard_before"] = self.base_guard
        self.base = self._baseline()
        self.conds = self.results.setdefault("conditions", {})
        self.dense_path = self.out.with_suffix(".dense.safetensors")
        self.plan_dir = self.out.with_suffix(".plan256")
        # the head-set fits (c), (h), (i) keep the short fit of the earlier runs; (a), (b), (e) the options
        # fit_options.py chose on dev (--refit-steps, --fit, --fit-by-budget)
        common = dict(steps=args.steps, progress=False, seed=0, k_fractions=(1.0, 0.5), guard_weights=(args.guard_weight,))
        self.head_cfg = {**common, "refit_steps": 10, "lr_schedule": "constant", **json.loads(args.head_fit)}
        self.dense_cfg = {**common, "refit_steps": args.refit_steps, **json.loads(args.fit)}
        self.by_budget = {int(k): v for k, v in json.loads(args.fit_by_budget).items()}
        self.results.setdefault("fit_options", {"fit": json.loads(args.fit), "head_fit": json.loads(args.head_fit),
                                                "fit_by_budget": json.loads(args.fit_by_budget),
                                                "train": args.train, "lora_steps": args.lora_steps})
        self.dense, self.dense_info, self.findings, self.heads_disc = None, None, None, None

    def _data(self, st: dict) -> None:
        if self.args.task == "ioi":
            return self._ioi_data()
        tok, n_test = self.tok, self.args.n_test
        weak = self.weak = list(st["weak"])
        per = st["n_train"] // len(weak)  # training prompts per length; 16 dev prompts per length
        fitdata = laundry_list(tok, lengths=weak, n_per_length=per + 16, seed=11,
                               fractions=(per / (per + 16), 16 / (per + 16), 0.0))
        self.train, self.dev = fitdata["train"], fitdata["dev"]
        if self.args.train == "varied":
            from fit_options import training_data

            self.train, self.dev = training_data(tok, "varied", weak, per)
        test = laundry_list(tok, lengths=weak, n_per_length=n_test, seed=12, fractions=(0.0, 0.0, 1.0))["test"]
        transfer = laundry_list(tok, lengths=weak, n_per_length=n_test, seed=13, template="omitted_packed",
                                items="toys", fractions=(0.0, 0.0, 1.0))["test"]
        recall = laundry_list(tok, lengths=[3, 5], n_per_length=100, seed=14, template="recall",
                              fractions=(0.0, 0.0, 1.0))["test"]
        ioi_test = ioi(tok, n=200, seed=15, fractions=(0.0, 0.0, 1.0))["test"]
        self.results["data"] = {"train": len(self.train), "dev": len(self.dev), "test": len(test),
                                "transfer": len(transfer), "recall": len(recall), "ioi": len(ioi_test),
                                "weak_lengths": weak, "fit": "omitted template, household pool, seed 11"
                                + (" + fit_options.VARIED streams" if self.args.train == "varied" else ""),
                                "test_seed": 12, "transfer_data": "omitted_packed template, toys pool, seed 13"}
        self.scorers = {name: Scorer(self.editor, tok, split, name) for name, split in
                        (("test", test), ("transfer", transfer), ("recall", recall), ("ioi", ioi_test))}

    def _ioi_data(self) -> None:
        """IOI as the fitted task: train and dev from seed 11 (48 + 16), test from seed 12 (``3 * n_test``)."""
        tok = self.tok
        fitdata = ioi(tok, n=64, seed=11, fractions=(0.75, 0.25, 0.0))
        self.train, self.dev = fitdata["train"], fitdata["dev"]
        test = ioi(tok, n=3 * self.args.n_test, seed=12, fractions=(0.0, 0.0, 1.0))["test"]
        self.weak = [2]
        self.results["data"] = {"task": "ioi", "train": len(self.train), "dev": len(self.dev), "test": len(test),
                                "fit": "IOI, seed 11", "test_seed": 12}
        self.scorers = {"test": Scorer(self.editor, tok, test, "test")}

    def _baseline(self) -> dict[str, list[bool]]:
        """Unedited per-example outcomes, computed before any edit (kept in the results file to resume)."""
        stored = self.results.setdefault("baseline_outcomes", {})
        keys = self.results.setdefault("prompt_sets", {})
        base: dict = {}
        assert not self.editor.edits
        for name, scorer in self.scorers.items():
            digest = prompt_set_hash(scorer.rows)
            if keys.get(name) not in (None, digest):
                raise SystemExit(f"{self.out} was measured on other {name} prompts (the data code changed since): "
                                 "write a new results file (--out) instead of mixing prompt sets.")
            keys[name] = digest
            margins = self.results.setdefault("baseline_margins", {})
            if name in stored and len(stored[name]) == len(scorer.rows) and name in margins:
                base[name] = [c == "1" for c in stored[name]]
            else:
                base[name] = scorer.correct(0)
                stored[name] = _outcomes(base[name])
                margins[name] = scorer.last_margins
                self.save()
            logger.info("baseline %s: %.3f", name, sum(base[name]) / len(base[name]))
        return base

    # ----- bookkeeping ---------------------------------------------------------------------------
    def want(self, name: str) -> bool:
        return (not self.only or name in self.only) and name not in self.results.get("conditions", {})

    def save(self) -> None:
        self.out.write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    def record(self, name: str, extra: dict, splits=("test",)) -> None:
        layer = first_edited_layer(self.editor)
        row = dict(extra)
        row["guard_after"] = guard_loss(self.model, self.tok)
        row["guard_change"] = row["guard_after"] / self.base_guard - 1.0
        for s in splits:
            after = self.scorers[s].correct(layer) if self.editor.edits else self.scorers[s].correct(0)
            row[s] = self.scorers[s].by_length(self.base[s], after)
            row[f"{s}_outcomes"] = _outcomes(after)  # per prompt: paired comparisons
            row[f"{s}_margin_change"] = margin_change(self.results["baseline_margins"][s], self.scorers[s].last_margins)
        row["seconds_total"] = time.perf_counter() - self.t0
        self.conds[name] = row
        self.save()
        g = row["test"]["all"]
        logger.info("%s: test %.3f -> %.3f (gain %+.3f, p=%.2g), guard %+.2f%%", name, g["before"], g["after"],
                    g["gain"], g["mcnemar"]["p"], 100 * row["guard_change"])

    def fit(self, config: FitConfig, **kwargs):
        """``fit_edit`` on the editor's explicit inputs; returns ``(result, info)``."""
        t1 = time.perf_counter()
        r = fit_edit(self.editor.layout, self.editor.log, self.tok, self.train, self.dev, config,
                     folded=self.editor.folded, **kwargs)
        info = {"n_components": r.n_components, "n_couplings": r.n_couplings, "dev_before": r.dev_before, "dev_after": r.dev_after,
                "dev_guard_change": r.guard_change, "timings": r.timings, "heads": r.heads,
                "trials": r.trials.to_dict("records"),
                "top_components": r.components.reindex(r.components.log_scale.abs().sort_values(ascending=False).index)
                .head(20).to_dict("records"), "fit_seconds": time.perf_counter() - t1}
        return r, info

    def apply_plan256(self, heads=None) -> list:
        """Apply the budget-256 plan's edits (only those of ``heads`` when given); returns them."""
        from th_edit.edits.plan import EditPlan

        keep = [e for e in EditPlan.load(self.plan_dir).edits if heads is None or (e.layer, e.head) in heads]
        for e in keep:
            self.editor.apply_edit(e)
        return keep

    # ----- conditions ----------------------------------------------------------------------------
    def dense_all_fit(self) -> None:
        """(a) the dense fit of all heads (reused by every budget of (b)); its dense log-scales are saved."""
        if not self.want("a_dense_all") and self.dense_path.exists():
            from types import SimpleNamespace

            self.dense = SimpleNamespace(dense=_load_dense(self.dense_path))
        elif self.want("a_dense_all") or any(self.want(f"b_budget_{b}") for b in (16, 64, 256, 1024)):
            ed = self.editor
            n_all = ed.n_layers * ed.n_heads * ed.d_head
            self.dense, self.dense_info = self.fit(FitConfig(budget=n_all, **{**self.dense_cfg, "k_fractions": (1.0,)}))
            _save_dense(self.dense.dense, self.dense_path)
            ed.reset()

    def budget_fit(self, budget: int) -> None:
        """(b) one budget, reusing the dense fit; the budget-256 plan is kept for (e)."""
        name = f"b_budget_{budget}"
        if not self.want(name):
            return
        own = self.by_budget.get(budget, {})
        cfg = FitConfig(budget=budget, **{**self.dense_cfg, **own})
        # a budget whose own options change the dense phase (e.g. its schedule) gets its own dense fit
        _, info = self.fit(cfg, dense_from=None if DENSE_FIELDS & set(own) else self.dense)
        info["config"] = cfg.to_dict()
        self.record(name, info, splits=tuple(self.scorers))  # transfer and spillover at every budget
        if budget == 256:
            self.editor.export_plan().save(self.plan_dir)
        self.editor.reset()

    def transfer_256(self) -> None:
        """(e) transfer and spillover of the budget-256 edit (fitted on omitted + household only)."""
        if self.want("e_transfer_256") and self.plan_dir.exists():
            self.apply_plan256()
            self.record("e_transfer_256", {"plan": str(self.plan_dir),
                                           "note": "the b_budget_256 edit, re-applied from its plan"},
                        splits=("test", "transfer", "recall", "ioi"))
            self.editor.reset()

    def refresh_256_outcomes(self) -> None:
        """Outcomes of the budget-256 plan for runs recorded before per-prompt outcomes were stored: the plan is
        re-applied and each split evaluated again; the accuracies must equal the recorded ones."""
        if "refresh_256_outcomes" not in self.only or not self.plan_dir.exists():
            return
        self.apply_plan256()
        layer = first_edited_layer(self.editor)
        for name, splits in (("b_budget_256", ("test",)), ("e_transfer_256", ("test", "transfer", "recall", "ioi"))):
            row = self.conds.get(name)
            if row is None:
                continue
            for split in splits:
                if f"{split}_outcomes" in row:
                    continue
                after = self.scorers[split].correct(layer)
                again = self.scorers[split].by_length(self.base[split], after)
                if abs(again["all"]["after"] - row[split]["all"]["after"]) > 1e-9:
                    raise SystemExit(f"{name} {split}: re-applied plan gives {again['all']['after']}, "
                                     f"recorded {row[split]['all']['after']}")
                row[f"{split}_outcomes"] = _outcomes(after)
                logger.info("%s %s: outcomes stored (accuracy %.3f, as recorded)", name, split, again["all"]["after"])
        self.save()
        self.editor.reset()

    def find_heads(self) -> None:
        """The discovered heads, for (c), (d), (g) and (h)."""
        if (self.want("c_discovered_32") or any(self.want(f"c_random_32_seed{s}") for s in range(3))
                or self.want("d_whole_head") or self.want("g_heads_of_256")):
            t1 = time.perf_counter()
            self.findings = self.editor.find_channels(self.train, progress=False)
            self.results["findings"] = {"movers": self.findings.meta.get("movers"),
                                        "inhibition_heads": self.findings.inhibition_heads,
                                        "seconds": time.perf_counter() - t1}
            self.save()
        if self.findings is not None:
            self.heads_disc = self.editor.resolve_heads("discovered", findings=self.findings)
            self.results["findings"]["discovered_heads"] = self.heads_disc

    def _random_heads(self, seed: int) -> list[tuple[int, int]]:
        """As many heads as discovery found, drawn from layers >= 1 outside them (seed ``100 + seed``)."""
        ed = self.editor
        return random_heads(ed.n_layers, ed.n_heads, self.heads_disc, len(self.heads_disc), 100 + seed)

    def discovered_vs_random_32(self) -> None:
        """(c) discovered heads vs random heads, budget 32."""
        if not self.heads_disc:
            return
        if self.want("c_discovered_32"):
            _, info = self.fit(FitConfig(heads=self.heads_disc, budget=32, **self.head_cfg))
            self.record("c_discovered_32", info)
            self.editor.reset()
        for s in range(3):
            name = f"c_random_32_seed{s}"
            if self.want(name):
                _, info = self.fit(FitConfig(heads=self._random_heads(s), budget=32, **self.head_cfg))
                self.record(name, info)
                self.editor.reset()

    def dense_all_record(self) -> None:
        """(a) the dense fit itself, evaluated."""
        if not (self.want("a_dense_all") and self.dense_info is not None):
            return
        ed = self.editor
        full = ChannelFit(ed.layout, [(l, h) for l in range(ed.n_layers) for h in range(ed.n_heads)], ("ov",),
                          ed.folded)
        full.theta = torch.stack([self.dense.dense[(u.layer, u.head, u.circuit)] for u in full.units])
        for e in full.edits():
            ed.apply_edit(e)
        self.record("a_dense_all", self.dense_info)
        ed.reset()

    def lora_r8(self) -> None:
        """(f) LoRA anchor, rank 8, q_proj/o_proj of all layers (the layers the all-heads fit edits); the
        learning rate is chosen on dev with the same guard rule as the channel fit (<= 1%, else the best dev).
        Each trial's adapter weights are kept, so the chosen one is evaluated as trained (no retraining)."""
        if not self.want("f_lora_r8"):
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        args, ed, t1 = self.args, self.editor, time.perf_counter()
        dev_scorer, lora_steps, trials, states = Scorer(ed, self.tok, self.dev, "dev"), args.lora_steps, [], {}
        train_lora = lambda lr: lora_anchor(ed, self.tok, self.train, self.dev, range(ed.n_layers),  # noqa: E731
                                            steps=lora_steps, lr=lr, guard_weight=args.guard_weight, seed=0)
        for lr in (1e-3, 3e-3):
            peft_model, n_params = train_lora(lr)
            trials.append({"lr": lr, "dev_accuracy": sum(dev_scorer.correct(0)) / len(self.dev),
                           "guard_change": guard_loss(self.model, self.tok) / self.base_guard - 1.0})
            states[lr] = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
            logger.info("lora lr %.0e: dev %.3f guard %+.2f%%", lr, trials[-1]["dev_accuracy"],
                        100 * trials[-1]["guard_change"])
            if lr != 3e-3:
                peft_model.unload()
        best = max([t for t in trials if t["guard_change"] <= 0.01] or trials, key=lambda t: t["dev_accuracy"])
        set_peft_model_state_dict(peft_model, states[best["lr"]])  # the chosen trial's weights, as trained
        row = {"trainable_params": n_params,
               "changed_weight_entries": 2 * ed.n_layers * ed.d_model * ed.n_heads * ed.d_head,
               "fit_seconds": time.perf_counter() - t1, "steps": lora_steps, "lr": best["lr"], "trials": trials,
               "guard_weight": args.guard_weight}
        row["guard_after"] = guard_loss(self.model, self.tok)
        row["guard_change"] = row["guard_after"] / self.base_guard - 1.0
        assert abs(row["guard_change"] - best["guard_change"]) < 1e-6, "the restored adapter is not the chosen one"
        for s in ("test", "transfer", "recall", "ioi"):
            after = self.scorers[s].correct(0)
            row[s] = self.scorers[s].by_length(self.base[s], after)
            row[f"{s}_outcomes"] = _outcomes(after)
            row[f"{s}_margin_change"] = margin_change(self.results["baseline_margins"][s], self.scorers[s].last_margins)
        row["seconds_total"] = time.perf_counter() - self.t0
        self.conds["f_lora_r8"] = row
        self.save()
        g = row["test"]["all"]
        logger.info("f_lora_r8: test %.3f -> %.3f (gain %+.3f), guard %+.2f%%", g["before"], g["after"], g["gain"],
                    100 * row["guard_change"])
        peft_model.unload()

    def whole_head(self) -> None:
        """(d) whole-head scaling of the top inhibition heads (alpha chosen on dev)."""
        if self.findings is None or not self.want("d_whole_head"):
            return
        ed, inh, trials = self.editor, list(self.findings.inhibition_heads), []
        for alpha in (1.5, 2.0, 4.0):
            for l, h in inh:
                ed.scale_component(l, h, "ov", list(range(ed.d_head)), alpha)
            # dev accuracy with the weights edited (no hooks)
            sc = Scorer(ed, self.tok, self.dev, "dev")
            dev_acc = sum(sc.correct(min(l for l, _ in inh))) / len(self.dev)
            trials.append({"alpha": alpha, "dev_accuracy": dev_acc,
                           "guard_change": guard_loss(self.model, self.tok) / self.base_guard - 1})
            ed.reset()
        best = max([t for t in trials if t["guard_change"] <= 0.01] or trials, key=lambda t: t["dev_accuracy"])
        for l, h in inh:
            ed.scale_component(l, h, "ov", list(range(ed.d_head)), best["alpha"])
        self.record("d_whole_head", {"heads": inh, "alpha": best["alpha"], "trials": trials})
        ed.reset()

    def heads_of_256(self) -> None:
        """(g) which heads carry the budget-256 edit: its components in the discovered heads alone, against its
        components in as many random heads (the seeds of (c)); nothing is refitted, the test split is read
        only for the table."""
        if self.findings is None or not self.heads_disc or not self.plan_dir.exists() or not self.want("g_heads_of_256"):
            return
        subsets = {"discovered": self.heads_disc, **{f"random_seed{s}": self._random_heads(s) for s in range(3)}}
        rows = {}
        for name, heads in subsets.items():
            keep = self.apply_plan256(set(map(tuple, heads)))
            after = self.scorers["test"].correct(first_edited_layer(self.editor))
            rows[name] = {"heads": heads, "n_components": sum(len(e.components) for e in keep),
                          "guard_change": guard_loss(self.model, self.tok) / self.base_guard - 1.0,
                          "test": self.scorers["test"].by_length(self.base["test"], after),
                          "test_outcomes": _outcomes(after)}
            logger.info("g_heads_of_256 %s: %d components, test gain %+.3f", name, rows[name]["n_components"],
                        rows[name]["test"]["all"]["gain"])
            self.editor.reset()
        self.conds["g_heads_of_256"] = {"subsets": rows, "note": "the budget-256 edit restricted to the discovered "
                                                                 "heads, and to as many random heads"}
        self.save()

    def fit_heads_32(self) -> None:
        """(h) heads chosen by the fit itself: as many heads as discovery found, those holding most of the
        budget-256 edit (sum of |log scale| over each head's components; that plan was chosen on train and dev
        only), fitted at budget 32 exactly as (c). Does any choice of heads beat random ones at this budget?"""
        n_disc = len(self.heads_disc or self.results.get("findings", {}).get("discovered_heads", []))
        if not (self.want("h_fit_heads_32") and self.plan_dir.exists() and n_disc):
            return
        self._fit_plan_heads("h_fit_heads_32", n_disc, "the heads of largest sum |log scale| in the budget-256 plan")

    def _fit_plan_heads(self, name: str, n: int, selection: str, circuit=None) -> None:
        """Fit (budget 32, as (c)) the ``n`` heads holding most of the budget-256 plan and record ``name``
        (with how many of them ``circuit`` holds, when given)."""
        mass, _ = plan_head_mass(self.plan_dir)
        heads = sorted(sorted(mass, key=lambda h: -mass[h])[:n])
        _, info = self.fit(FitConfig(heads=heads, budget=32, **self.head_cfg))
        info.update(selection=selection, head_mass={f"{l}.{h}": mass[(l, h)] for l, h in heads})
        if circuit is not None:
            info["shared_with_circuit"] = len(set(map(tuple, circuit)) & set(heads))
        self.record(name, info)
        self.editor.reset()

    def circuit_32(self) -> None:
        """(i) the heads of ``find_circuit`` on the train split (backward from the answer, confirmed causally),
        fitted at budget 32 exactly as (c) and (h). Its ``min_effect`` (how large a confirmed effect must be)
        is chosen on dev: each value of ``--circuit-grid`` gives a circuit (the causal effects are measured
        once and shared), each circuit is fitted at budget 32, and the best dev accuracy wins (ties: fewer
        heads). Only the chosen circuit's fit is evaluated on test: its edits are re-applied, not refitted."""
        if not self.want("i_circuit_32"):
            return
        t1, memo, tried, fits = time.perf_counter(), {}, [], {}
        for min_effect in sorted({float(x) for x in self.args.circuit_grid.split(",")}, reverse=True):
            circuit = self.editor.find_circuit(self.train, progress=False, measurements=memo, min_effect=min_effect,
                                               **json.loads(self.args.circuit_config))
            heads = circuit.head_list()
            row = {"min_effect": min_effect, "heads": heads, "reason": circuit.meta.get("reason"),
                   "roles": {f"{h.layer}.{h.head}": h.role for h in circuit.heads},
                   "steps": {f"{h.layer}.{h.head}": h.step for h in circuit.heads},
                   "kept_edges": len(circuit.kept_edges()), "measured_edges": len(circuit.edges),
                   "spearman": circuit.meta.get("spearman"),
                   "spearman_attribution": circuit.meta.get("spearman_attribution"),
                   "edges": circuit.to_dict()["edges"], "config": circuit.meta.get("config"),
                   "seconds": circuit.meta.get("seconds")}
            if heads and not any(t["heads"] == heads for t in tried):
                r, info = self.fit(FitConfig(heads=heads, budget=32, **self.head_cfg))
                row["dev_accuracy"] = r.dev_after["all"]
                fits[min_effect] = (info, r.edits)
                self.editor.reset()
            tried.append(row)
            logger.info("circuit min_effect %.3g: %d heads, dev %s", min_effect, len(heads), row.get("dev_accuracy"))
            self.results["circuit_selection"] = {"tried": tried, "seconds": time.perf_counter() - t1,
                                                 "measured_channels": len(memo) - ("attribution" in memo)}
            self.save()
        fitted = [t for t in tried if "dev_accuracy" in t]
        if not fitted:
            return
        best = max(fitted, key=lambda t: (t["dev_accuracy"], -len(t["heads"])))
        self.results["circuit"] = {k: best[k] for k in ("min_effect", "heads", "roles", "steps", "kept_edges",
                                                        "measured_edges", "spearman", "spearman_attribution",
                                                        "reason")}
        info, edits = fits[best["min_effect"]]
        for e in edits:
            self.editor.apply_edit(e)
        info.update(selection=f"find_circuit on train, min_effect={best['min_effect']} chosen on dev",
                    n_heads=len(best["heads"]))
        self.record("i_circuit_32", info)
        self.editor.reset()

    def fit_heads_circuit_size(self) -> None:
        """(h) at the chosen circuit's size: the heads holding most of the budget-256 edit, as many as the
        circuit has, fitted at budget 32 exactly as (i). Is the circuit better only for having more heads?"""
        circuit = self.results.get("circuit", {}).get("heads", [])
        if not (circuit and self.want("h_fit_heads_32_circuit_size") and self.plan_dir.exists()):
            return
        self._fit_plan_heads("h_fit_heads_32_circuit_size", len(circuit),
                             "the heads of largest sum |log scale| in the budget-256 plan, as many as the circuit",
                             circuit=circuit)

    def circuit_random_32(self) -> None:
        """(i) control: as many random heads as the chosen circuit holds (layers >= 1, outside it; seed
        ``200 + seed``), fitted at budget 32 exactly as (i)."""
        circuit = [tuple(h) for h in self.results.get("circuit", {}).get("heads", [])]
        if not circuit:
            return
        ed = self.editor
        for s in range(3):
            name = f"i_random_32_seed{s}"
            # a small model may hold fewer heads outside the circuit than in it
            heads = random_heads(ed.n_layers, ed.n_heads, circuit, len(circuit), 200 + s)
            if self.want(name) and heads:
                _, info = self.fit(FitConfig(heads=heads, budget=32, **self.head_cfg))
                info.update(selection=f"{len(circuit)} random heads (as many as the circuit)")
                self.record(name, info)
                self.editor.reset()

    def finish(self) -> None:
        self.results["seconds"] = time.perf_counter() - self.t0
        self.save()


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="laundry", choices=("laundry", "ioi"),
                    help="the fitted task: Laundry List (all conditions) or IOI (the head-set conditions)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated condition names to run (default: all)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guard-weight", type=float, default=2.0)
    ap.add_argument("--refit-steps", type=int, default=30, help="refit steps of (a), (b), (e) (chosen on dev)")
    ap.add_argument("--fit", default='{"lr_schedule": "cosine"}', help="JSON of FitConfig overrides for every fit of (a), (b) and (e), "
                                                "e.g. the options fit_options.py chose on dev")
    ap.add_argument("--fit-by-budget", default='{"64": {"coupling_band": 1024}}', help="JSON {budget: FitConfig overrides} for single budgets of "
                                                          "(b), on top of --fit; such a budget gets its own dense "
                                                          "fit, e.g. '{\"64\": {\"rounds\": 2}}'")
    ap.add_argument("--train", default="omitted", choices=("omitted", "varied"),
                    help="training prompts: the omitted template alone, or with fit_options.VARIED streams")
    ap.add_argument("--lora-steps", type=int, default=36, help="Adam steps of each LoRA trial")
    ap.add_argument("--head-fit", default="{}", help="JSON of FitConfig overrides for the budget-32 head-set "
                                                     "fits (c), (h), (i), on top of their short fit (--steps "
                                                     "dense, 10 refit steps, constant learning rate)")
    ap.add_argument("--circuit-grid", default="0.8,0.5,0.35,0.2",
                    help="min_effect values of find_circuit tried on dev for (i)")
    ap.add_argument("--circuit-config", default="{}", help="JSON of CircuitConfig overrides for (i), e.g. "
                                                           "'{\"max_candidates\": 4}'")
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = Science(args)
    run.dense_all_fit()
    run.budget_fit(256)
    run.transfer_256()
    run.refresh_256_outcomes()
    run.dense_all_record()
    run.lora_r8()
    for budget in (64, 16, 1024):
        run.budget_fit(budget)
    run.find_heads()  # the head-set comparisons of issue 25 come after the budget sweep of issue 26
    run.discovered_vs_random_32()
    run.whole_head()
    run.heads_of_256()
    run.fit_heads_32()
    run.circuit_32()
    run.circuit_random_32()
    run.fit_heads_circuit_size()
    run.finish()


if __name__ == "__main__":
    main()
