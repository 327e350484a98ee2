"""Greedy grid search over single singular components (the first round's edit search).

Rescales candidate components (the top inhibition channels' sender OV components and the mover heads'
QK components they feed) by each scale of a grid, keeps the best on the **dev** split (accuracy, then
mean logit difference), greedily adds up to ``max_edits`` edits while dev accuracy improves and the guard
loss stays within ``guard_tolerance``, and only then evaluates the **test** split before and after. No
choice looks at test data. The learned edit (:mod:`th_edit.edits.fit`) is the stronger search; this one
stays behind ``th-edit edit --auto --search grid``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from ..core.layer_cache import reuse_lower_layers
from ..errors import InvalidArgumentError
from ..tasks.evaluate import EvalResult, evaluate, guard_loss
from ..utils.progress import progress_bar
from ..utils.settings import Settings
from .discovery import ChannelFindings
from .protocol import HeadEditor

__all__ = ["EditSearchConfig", "EditSearch", "search_edit"]

Candidate = tuple[int, int, str, int]  # layer, head, circuit, component


@dataclass
class EditSearchConfig(Settings):
    """Settings of :func:`search_edit` (recorded in ``EditSearch.meta["config"]``).

    Attributes:
        alphas: the scale grid tried for each candidate.
        n_ov: inhibition channels whose sender OV component is a candidate.
        n_qk: mover QK components (the one reading each top channel most) added as candidates.
        max_edits: greedy rounds.
        guard_tolerance: largest relative guard-loss increase accepted (0.02 = 2%).
        batch_size: prompts per forward pass.
    """

    alphas: tuple[float, ...] = field(default=(0.0, 0.5, 2.0, 4.0), metadata={"help": "scale grid"})
    n_ov: int = field(default=6, metadata={"help": "OV candidates from the top inhibition channels"})
    n_qk: int = field(default=2, metadata={"help": "QK candidates of the mover heads"})
    max_edits: int = field(default=2, metadata={"help": "greedy rounds"})
    guard_tolerance: float = field(default=0.02, metadata={"help": "largest relative guard-loss increase"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        super().__post_init__()

    def validate(self) -> None:
        if not self.alphas or self.max_edits < 1 or self.batch_size < 1 or self.n_ov < 0 or self.n_qk < 0:
            raise InvalidArgumentError(f"{self}: need alphas, max_edits >= 1, batch_size >= 1, n_ov/n_qk >= 0.")


@dataclass
class EditSearch:
    """What :func:`search_edit` chose and measured; ``evidence`` and ``evaluation`` feed the model card."""

    edits: list[dict[str, Any]]  # layer, head, circuit, component, alpha
    trials: pd.DataFrame  # every (candidate, alpha) tried on dev, with dev accuracy and logit diff
    dev_before: float
    dev_after: float
    test_before: EvalResult
    test_after: EvalResult
    guard_before: float
    guard_after: float
    meta: dict[str, Any] = field(default_factory=dict)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None

    @property
    def guard_change(self) -> float:
        """Relative change of the guard loss (0.01 = 1% worse)."""
        return self.guard_after / self.guard_before - 1.0

    def summary(self) -> pd.DataFrame:
        """Test accuracy per list length before and after, with the change."""
        b, a = self.test_before.by_length(), self.test_after.by_length()
        out = b[["list_length", "n", "accuracy", "ci_low", "ci_high"]].rename(
            columns={"accuracy": "before", "ci_low": "before_low", "ci_high": "before_high"})
        out["after"], out["after_low"], out["after_high"] = a["accuracy"].values, a["ci_low"].values, a["ci_high"].values
        out["change"] = out["after"] - out["before"]
        return out


def _candidates(findings: ChannelFindings, editor: HeadEditor, n_ov: int, n_qk: int) -> list[Candidate]:
    top = findings.top("inhibition", k=n_ov)
    cands = [(int(r.sender_layer), int(r.sender_head), "ov", int(r.sender_component)) for r in top.itertuples()]
    seen = set()
    for r in top.itertuples():  # the mover's QK component that reads the channel most
        if len(seen) >= n_qk:
            break
        key = (int(r.receiver_layer), int(r.receiver_head))
        if key in seen:
            continue
        share = editor.composition((int(r.sender_layer), int(r.sender_head)), key, mode="q")["share"]  # [d_h, d_h]
        cands.append((key[0], key[1], "qk", int(share[int(r.sender_component)].abs().argmax())))
        seen.add(key)
    return cands


def _try_all(editor: HeadEditor, cands, cfg: EditSearchConfig, dev_eval, round_: int, progress: bool) -> list[dict]:
    """Dev accuracy and logit difference of every (candidate, alpha), each undone after measuring."""
    results = []
    with progress_bar(total=len(cands) * len(cfg.alphas), desc=f"edit search (round {round_})", enabled=progress) as bar:
        for cand in cands:
            for alpha in cfg.alphas:
                editor.scale_component(cand[0], cand[1], cand[2], cand[3], alpha)
                try:
                    res = dev_eval()
                finally:
                    editor.undo()
                results.append({"round": round_, "layer": cand[0], "head": cand[1], "circuit": cand[2],
                                "component": cand[3], "alpha": alpha, "dev_accuracy": res.accuracy,
                                "dev_logit_diff": float(res.records.logit_diff.mean())})
                bar.update(1)
    return sorted(results, key=lambda r: (-r["dev_accuracy"], -r["dev_logit_diff"]))


def _greedy(editor: HeadEditor, tokenizer, cands, cfg, dev_eval, best, guard_before, progress) -> tuple[list, list, tuple]:
    """Up to ``max_edits`` rounds: keep the best trial that beats ``best`` on dev within the guard tolerance."""
    trials, chosen = [], []
    for round_ in range(1, cfg.max_edits + 1):
        results = _try_all(editor, cands, cfg, dev_eval, round_, progress)
        trials += results
        accepted = False
        for row in results:
            if (row["dev_accuracy"], row["dev_logit_diff"]) <= best or row["dev_accuracy"] < best[0]:
                break
            editor.scale_component(row["layer"], row["head"], row["circuit"], row["component"], row["alpha"])
            if guard_loss(editor.model, tokenizer) / guard_before - 1.0 <= cfg.guard_tolerance:
                chosen.append({k: row[k] for k in ("layer", "head", "circuit", "component", "alpha")})
                best = (row["dev_accuracy"], row["dev_logit_diff"])
                cands = [c for c in cands if c != (row["layer"], row["head"], row["circuit"], row["component"])]
                accepted = True
                break
            editor.undo()
        if not accepted:
            break
    return trials, chosen, best


def search_edit(
    editor: HeadEditor, tokenizer, dev, test, findings: ChannelFindings, config: EditSearchConfig | None = None, *,
    candidates: Sequence[Candidate] | None = None, progress: bool = True, **overrides: Any,
) -> EditSearch:
    """Choose component rescalings on ``dev``; report ``test`` before/after (see the module docstring).

    The chosen edits stay applied on ``editor`` (undo them with ``editor.reset()``). ``candidates``: your
    own ``(layer, head, circuit, component)`` list instead of the ones derived from ``findings``.
    ``overrides`` replace fields of ``config`` (an :class:`EditSearchConfig`).
    """
    cfg = EditSearchConfig.merged(config, **overrides)
    t0 = time.perf_counter()
    start_edits = len(editor.edits)
    dev_eval = lambda: evaluate(editor.model, tokenizer, dev, batch_size=cfg.batch_size, progress=False)  # noqa: E731
    base_dev = dev_eval()
    guard_before = guard_loss(editor.model, tokenizer)
    cands = [tuple(c) for c in candidates] if candidates is not None else _candidates(findings, editor, cfg.n_ov, cfg.n_qk)
    best = (base_dev.accuracy, float(base_dev.records.logit_diff.mean()))
    # candidates change only their own layer and above: the layers below run once per dev batch
    with reuse_lower_layers(editor.model, editor.layout, min((c[0] for c in cands), default=0)):
        trials, chosen, best = _greedy(editor, tokenizer, cands, cfg, dev_eval, best, guard_before, progress)
    edits_now = editor.edits[start_edits:]
    for _ in edits_now:  # measure the base model on test with the search's edits undone, then redo them
        editor.undo()
    test_before = evaluate(editor.model, tokenizer, test, batch_size=cfg.batch_size, progress=progress, desc="test (before)")
    for e in edits_now:
        editor.apply_edit(e)
    test_after = evaluate(editor.model, tokenizer, test, batch_size=cfg.batch_size, progress=progress, desc="test (after)")
    evaluation = {"before": test_before.accuracy_by_length(), "after": test_after.accuracy_by_length(),
                  "note": "Laundry List accuracy (argmax over the listed items' first tokens) on the test split."}
    return EditSearch(edits=chosen, trials=pd.DataFrame(trials), dev_before=base_dev.accuracy, dev_after=best[0],
                      test_before=test_before, test_after=test_after, guard_before=guard_before,
                      guard_after=guard_loss(editor.model, tokenizer), evidence=findings.evidence(), evaluation=evaluation,
                      meta={"seconds": time.perf_counter() - t0, "alphas": list(cfg.alphas), "config": cfg.to_dict()})
