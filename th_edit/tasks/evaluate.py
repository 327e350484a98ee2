"""Batched, gradient-free evaluation of Laundry List / IOI datasets, single- or multi-process.

For each example the model reads ``prompt`` and is scored at its last token:

- ``correct``: the target's first token has the highest logit among the candidates' first tokens;
- ``correct_vocab``: it is the top-1 token over the whole vocabulary;
- ``p_target``: its softmax probability over the vocabulary;
- ``logit_diff``: its logit minus the best other candidate's.

Batches are fixed before any work is shared out (examples sorted by token length, cut into batches), and
under ``accelerate launch --multi_gpu --num_processes N`` whole batches go round-robin to the processes and the
records are gathered back in order, so every example is computed in the same batch whatever N is: the
multi-process result equals the single-process result exactly.

Padding: ``padding_side="right"`` (default) needs nothing else (causal attention never sees the pads
after a prompt); ``"left"`` passes explicit ``position_ids`` so positions do not shift.

>>> result = evaluate(model, tokenizer, dataset["test"])        # doctest: +SKIP
>>> result.by_length()[["list_length", "n", "accuracy", "ci_low", "ci_high"]]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..errors import InvalidArgumentError
from ..utils.distributed import process_rank_and_count
from ..utils.progress import progress_bar
from .batching import accepts_logits_to_keep, dataset_rows, input_device, pad_sequences, pad_token_id, plan_batches
from .data import Rows, first_token
from .guard_text import GUARD_TEXTS
from .provenance import check_overlap

__all__ = ["EvalResult", "evaluate", "evaluation_batch_size", "guard_loss", "wilson_interval"]

logger = logging.getLogger(__name__)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default).

    >>> tuple(round(x, 3) for x in wilson_interval(5, 10))
    (0.237, 0.763)
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    """Per-example records (a DataFrame, one row per example, in dataset order) and summaries."""

    records: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.records["correct"].mean())

    def _summary(self, key: str) -> pd.DataFrame:
        rows = []
        for value, g in self.records.groupby(key, sort=True):
            n, k = len(g), int(g["correct"].sum())
            lo, hi = wilson_interval(k, n)
            sem = float(g["p_target"].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            rows.append({key: int(value), "n": n, "accuracy": k / n, "ci_low": lo, "ci_high": hi,
                         "vocab_accuracy": float(g["correct_vocab"].mean()), "mean_p_target": float(g["p_target"].mean()),
                         "p_target_ci": 1.96 * sem, "mean_logit_diff": float(g["logit_diff"].mean())})
        return pd.DataFrame(rows)

    def by_length(self) -> pd.DataFrame:
        """Accuracy (with 95% Wilson interval), top-1 vocabulary accuracy, mean target probability (with a
        95% normal interval) and mean logit difference per list length."""
        return self._summary("list_length")

    def by_position(self) -> pd.DataFrame:
        """The same per target position in the list."""
        return self._summary("target_index")

    def accuracy_by_length(self) -> dict[int, float]:
        return {int(r.list_length): float(r.accuracy) for r in self.by_length().itertuples()}

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "by_length": self.by_length().to_dict("records"),
                "by_position": self.by_position().to_dict("records"), **self.meta}


def _last_logits(model, seqs: list[list[int]], pad_id: int, padding_side: str, device) -> torch.Tensor:
    """Logits [B, V] (float32, on the model's output device) at each sequence's last token."""
    lens = torch.tensor([len(s) for s in seqs])
    width = int(lens.max())
    ids, mask = pad_sequences(seqs, pad_id, padding_side)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if padding_side == "left":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        keep, rows = 1, torch.zeros(len(seqs), dtype=torch.long)
    else:
        keep = int(width - lens.min() + 1)  # batches are length-sorted, so only a few positions are needed
        rows = lens - 1 - (width - keep)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    else:
        rows = rows + (width - keep)
    logits = model(**kwargs).logits
    return logits[torch.arange(len(seqs), device=logits.device), rows.to(logits.device)].float()


def _scores(logits: torch.Tensor, cands: list[list[int]], targets: list[int]) -> dict[str, list]:
    """Per-row scores of ``logits [B, V]`` computed where the logits live; only ``[B]`` results reach the host.

    ``cands[b]``: candidate first tokens of row ``b``; ``targets[b]``: the target's index among them."""
    dev, B = logits.device, len(cands)
    n = max(len(c) for c in cands)
    cand = torch.zeros(B, n, dtype=torch.long)
    ok = torch.zeros(B, n, dtype=torch.bool)
    for b, c in enumerate(cands):
        cand[b, :len(c)], ok[b, :len(c)] = torch.tensor(c), True
    cand, ok = cand.to(dev), ok.to(dev)
    rows, t = torch.arange(B, device=dev), torch.tensor(targets, device=dev)
    cl = logits.gather(1, cand).masked_fill(~ok, float("-inf"))  # [B, N]
    tok = cand[rows, t]
    others = cl.clone()
    others[rows, t] = float("-inf")
    best_other = others.max(1).values
    diff = torch.where(torch.isfinite(best_other), cl[rows, t] - best_other, torch.full_like(best_other, float("nan")))
    out = torch.stack([(cl.argmax(1) == t).float(), (logits.argmax(1) == tok).float(),
                       logits.log_softmax(-1)[rows, tok].exp(), diff]).cpu()  # the one host copy: [4, B]
    return {"correct": out[0].bool().tolist(), "correct_vocab": out[1].bool().tolist(), "p_target": out[2].tolist(),
            "logit_diff": out[3].tolist()}


def evaluation_batch_size(model, tokenizer, dataset, batch_size: int | str, *, start: int = 256) -> int:
    """``batch_size`` as a number: an int is returned as is; ``"auto"`` is the largest batch of the
    dataset's longest prompt that runs on the model's device without running out of memory (halving from
    ``start``), found once per model, dtype and device and remembered (:func:`th_edit.utils.devices.auto_batch_size`;
    16 on the CPU)."""
    if batch_size != "auto":
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer or 'auto'.")
        return batch_size
    from ..utils.devices import auto_batch_size

    longest = max((tokenizer(r["prompt"])["input_ids"] for r in dataset_rows(dataset)), key=len)
    device = input_device(model)
    dtype = next(model.parameters()).dtype

    def probe(b: int) -> None:
        with torch.no_grad():
            _last_logits(model, [longest] * b, pad_token_id(tokenizer), "right", device)

    key = f"{getattr(model.config, '_name_or_path', '')}|{dtype}|eval|{len(longest)}"
    return auto_batch_size(probe, key, device, start=start)


def evaluate(
    model,
    tokenizer,
    dataset: Rows,
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    progress: bool = True,
    desc: str = "evaluating",
    plan: Any = None,
    allow_overlap: bool = False,
) -> EvalResult:
    """Score every example of ``dataset`` (rows with ``prompt``, ``items``, ``target`` ...; see
    :mod:`th_edit.data`). Under ``accelerate launch`` the work is split over the processes and every
    process returns the full, identical result. Returns an :class:`EvalResult`.

    With ``plan`` (an ``EditPlan`` or its ``provenance``), ``dataset`` is first checked against the train and
    dev prompts the plan was made with (:func:`th_edit.tasks.provenance.check_overlap`): a shared prompt
    raises :class:`~th_edit.errors.DataOverlapError`, or with ``allow_overlap`` logs a warning."""
    rows = _checked_rows(dataset, batch_size, padding_side)
    if plan is not None:
        check_overlap(plan, rows, allow=allow_overlap)
    seqs = tokenizer([r["prompt"] for r in rows])["input_ids"]
    if any(len(q) == 0 for q in seqs):
        raise InvalidArgumentError("a row's prompt tokenizes to nothing (an empty prompt?); every row needs a prompt.")
    token_of = _item_tokens(tokenizer, rows)
    pad_id = pad_token_id(tokenizer)

    world, rank = _world()
    batches = plan_batches([len(s) for s in seqs], batch_size)[rank::world]
    device = input_device(model)
    records: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), progress_bar(total=len(batches), desc=desc, enabled=progress and rank == 0) as bar:
            for batch in batches:
                logits = _last_logits(model, [seqs[i] for i in batch], pad_id, padding_side, device)
                targets = [rows[i]["items"].index(rows[i]["target"]) for i in batch]
                scores = _scores(logits, [[token_of[w] for w in rows[i]["items"]] for i in batch], targets)
                records += [_record(i, rows[i], t, {k: v[b] for k, v in scores.items()})
                            for b, (i, t) in enumerate(zip(batch, targets))]
                bar.update(1)
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        records = gather_object([records])
        records = [rec for part in records for rec in part]
    frame = pd.DataFrame(records).sort_values("index").reset_index(drop=True).drop(columns="index")
    return EvalResult(frame, meta={"batch_size": batch_size, "padding_side": padding_side, "processes": world})


def _item_tokens(tokenizer, rows: list[dict[str, Any]]) -> dict[str, int]:
    """The first token of every item; refuses rows whose target is not an item, or whose items share a first
    token (accuracy among the items would then be meaningless: ties always pick the first)."""
    token_of: dict[str, int] = {}
    clashes = []
    for i, r in enumerate(rows):
        if r["target"] not in r["items"]:
            raise InvalidArgumentError(f"row {i}: target {r['target']!r} is not one of its items {list(r['items'])}.")
        for w in r["items"]:
            if w not in token_of:
                token_of[w] = first_token(tokenizer, w)
        if len({token_of[w] for w in r["items"]}) < len(r["items"]):
            clashes.append(i)
    if clashes:
        r = rows[clashes[0]]
        raise InvalidArgumentError(
            f"in {len(clashes)} of {len(rows)} rows the tokenizer gives two items the same first token (row "
            f"{clashes[0]}: {', '.join(f'{w}->{token_of[w]}' for w in r['items'])}), so accuracy among the items "
            "means nothing. Use the model's own tokenizer, and build the rows with th_edit.data.laundry_list("
            "tokenizer, ...), which keeps only items with distinct first tokens."
        )
    return token_of


def _checked_rows(dataset: Rows, batch_size: int, padding_side: str) -> list[dict[str, Any]]:
    """The dataset's rows, after checking the arguments (:class:`InvalidArgumentError` naming the fix)."""
    if padding_side not in ("left", "right"):
        raise InvalidArgumentError(f"padding_side={padding_side!r} must be 'left' or 'right'.")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size} must be at least 1.")
    rows = dataset_rows(dataset)
    if not rows:
        raise InvalidArgumentError("the dataset is empty.")
    missing = {"prompt", "items", "target"} - set(rows[0])
    if missing:
        raise InvalidArgumentError(f"dataset rows lack {sorted(missing)}; build them with th_edit.data.")
    return rows


def _record(i: int, r: dict[str, Any], target: int, scores: dict[str, Any]) -> dict[str, Any]:
    """One example's record: its identity columns and its ``scores`` (see :func:`_scores`)."""
    return {
        "index": i, "example_id": int(r.get("example_id", i)), "list_length": int(r.get("list_length", len(r["items"]))),
        "target_index": int(r.get("target_index", target)), "template": str(r.get("template", "")), **scores,
    }


def _world() -> tuple[int, int]:
    rank, size = process_rank_and_count()
    return size, rank


def guard_loss(model, tokenizer, texts: tuple[str, ...] = GUARD_TEXTS) -> float:
    """Mean next-token loss (nats per token) on a fixed set of plain English paragraphs shipped with th_edit.

    An edit that wrecks the model's general language ability shows up here; ``exp`` of it is the
    perplexity. Computed one paragraph at a time (no padding), so it is exact and deterministic.
    """
    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
    return total / count
