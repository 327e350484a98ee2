"""The fitting problem: task batches through the layer cache, the guard reference, dev accuracy and guard loss."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.layer_cache import LayerCache
from ..core.layout import AttentionLayout
from ..errors import InvalidArgumentError
from ..tasks.batching import (
    accepts_logits_to_keep,
    dataset_rows,
    input_device,
    output_device,
    pad_sequences,
    pad_token_id,
    plan_batches,
)
from ..tasks.data import Rows, first_token
from ..tasks.evaluate import guard_loss
from ..tasks.guard_text import GUARD_TEXTS
from ..utils.distributed import process_rank_and_count
from .fit_config import FitConfig
from .fit_hooks import ChannelFit

__all__ = ["TaskBatch", "CachedSplits", "split_rows", "task_batches", "task_ce", "FitProblem"]

logger = logging.getLogger(__name__)


# ----- data ---------------------------------------------------------------------------------------
@dataclass
class TaskBatch:
    index: int  # in the layer cache
    last: torch.Tensor  # [B] answer position
    cand: torch.Tensor  # [B, N] candidate first tokens (padded)
    cand_ok: torch.Tensor  # [B, N] bool
    target: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B] list lengths (CPU)
    rows: list[int]  # example indices
    width: int = 0  # padded token length of the batch
    total: int = 0  # prompts of the whole batch over all processes (this process holds ``rows``)


@dataclass
class CachedSplits:
    """The fit's batches held in one :class:`LayerCache` from a first layer (see :meth:`FitProblem.data_from`).

    Attributes:
        cache: the layer cache; train, dev: task batches (indices into it); guard: cache indices of the
        guard batches (``guard_texts_per_step`` paragraphs each, cut to ``guard_tokens``).
    """

    cache: LayerCache
    train: list[TaskBatch]
    dev: list[TaskBatch]
    guard: list[int]


def split_rows(dataset: Rows, what: str) -> list[dict[str, Any]]:
    rows = dataset_rows(dataset)
    missing = {"prompt", "items", "target"} - set(rows[0]) if rows else set()
    if missing:
        raise InvalidArgumentError(f"{what} rows lack {sorted(missing)}; build them with th_edit.data.")
    return rows


def task_batches(cache: LayerCache, tokenizer, rows, batch_size: int, device, out_device=None,
                 part: tuple[int, int] = (0, 1)) -> list[TaskBatch]:
    """Right-padded, length-sorted batches of ``rows`` added to ``cache`` (inputs on ``device``); answer
    positions, candidates and targets live on ``out_device`` (where the logits are; default ``device``).
    ``part=(rank, world)``: the batches are cut as in one process, and this process keeps the prompts
    ``rank::world`` of each (a batch with none of them is skipped; ``total`` is the whole batch's size)."""
    out_device = device if out_device is None else out_device
    rank, world = part
    seqs = tokenizer([r["prompt"] for r in rows])["input_ids"]
    pad = pad_token_id(tokenizer)
    tok_of: dict[str, int] = {}
    out = []
    for whole in plan_batches([len(s) for s in seqs], batch_size):
        idx = whole[rank::world]
        if not idx:  # kept (empty) so every process steps through the same batch sequence
            none = torch.zeros(0, dtype=torch.long, device=out_device)
            out.append(TaskBatch(-1, none, none[:, None], none[:, None].bool(), none, none.cpu(), [], 0, len(whole)))
            continue
        ids, mask = pad_sequences([seqs[i] for i in idx], pad, "right")
        n = max(len(rows[i]["items"]) for i in idx)
        cand = torch.zeros(len(idx), n, dtype=torch.long)
        ok = torch.zeros(len(idx), n, dtype=torch.bool)
        target = torch.zeros(len(idx), dtype=torch.long)
        for b, i in enumerate(idx):
            items = rows[i]["items"]
            for j, w in enumerate(items):
                if w not in tok_of:
                    tok_of[w] = first_token(tokenizer, w)
                cand[b, j] = tok_of[w]
            ok[b, :len(items)] = True
            target[b] = items.index(rows[i]["target"])
        k = cache.add(input_ids=ids.to(device), attention_mask=mask.to(device))
        out.append(TaskBatch(k, (mask.sum(1) - 1).to(out_device), cand.to(out_device), ok.to(out_device),
                             target.to(out_device), torch.tensor([len(rows[i]["items"]) for i in idx]), idx,
                             int(ids.shape[1]), len(whole)))
    return out


# ----- the fitting loop ---------------------------------------------------------------------------
def task_ce(problem: "FitProblem", cache: LayerCache, b: TaskBatch, theta: torch.Tensor, world: int):
    """``(ce, candidate logits)`` of batch ``b``: the mean cross-entropy over the whole batch. In one process
    the batch mean; over ``world`` processes this process's share of it (its rows' sum over the whole
    batch's size; zero, still attached to ``theta``, when it holds no row), so the sum over processes is
    the single-process mean."""
    if not b.rows:
        return (theta * 0).sum(), None
    cl = problem.candidate_logits(cache, b)
    if world == 1:
        return torch.nn.functional.cross_entropy(cl, b.target), cl
    return torch.nn.functional.cross_entropy(cl, b.target, reduction="sum") / b.total, cl


class FitProblem:
    """Training, dev and guard data prepared for one model (tokenised, cached from a first layer)."""

    def __init__(self, model: nn.Module, layout: AttentionLayout, tokenizer: Any, train_rows: list[dict[str, Any]],
                 dev_rows: list[dict[str, Any]], config: FitConfig) -> None:
        self.model, self.layout, self.tokenizer, self.config = model, layout, tokenizer, config
        self.device = input_device(self.model)
        self.out_device = output_device(self.model)
        self.keep = accepts_logits_to_keep(self.model)
        self.train_rows, self.dev_rows = train_rows, dev_rows
        ids = [tokenizer(t)["input_ids"][: config.guard_tokens] for t in GUARD_TEXTS]
        self.guard_ids, self.guard_mask = pad_sequences(ids, pad_token_id(tokenizer), "right")
        self._caches: dict[int, CachedSplits] = {}
        self._full_guard: dict[int, list[int]] = {}
        self.guard_full_ids = [tokenizer(t)["input_ids"] for t in GUARD_TEXTS]
        with torch.no_grad():
            out = self.model(input_ids=self.guard_ids.to(self.device), attention_mask=self.guard_mask.to(self.device),
                             use_cache=False)
            self.guard_ref = out.logits[:, :-1].float().log_softmax(-1)  # [G, T-1, V] float32, on the logits' device
        self.guard_valid = (self.guard_mask[:, 1:] * self.guard_mask[:, :-1]).bool().to(self.guard_ref.device)

    def data_from(self, layer: int) -> CachedSplits:
        """The train, dev and guard batches in a layer cache from ``layer`` (the three most recent kept)."""
        if layer not in self._caches:
            cache = LayerCache(self.model, self.layout, layer, max_bytes=self.config.cache_bytes)
            train = task_batches(cache, self.tokenizer, self.train_rows, self.config.batch_size, self.device,
                                 self.out_device, part=process_rank_and_count())
            dev = task_batches(cache, self.tokenizer, self.dev_rows, 32, self.device, self.out_device)
            g = self.config.guard_texts_per_step
            guard = []
            for s in range(0, len(self.guard_ids), g):
                guard.append(cache.add(input_ids=self.guard_ids[s:s + g].to(self.device),
                                       attention_mask=self.guard_mask[s:s + g].to(self.device)))
            # whole guard paragraphs, one per batch (no padding): guard_loss through this cache
            self._full_guard[layer] = [cache.add(input_ids=torch.tensor([tokenizer_ids], device=self.device))
                                       for tokenizer_ids in self.guard_full_ids]
            while len(self._caches) >= 3:  # keep the three most recent caches (memory)
                self._full_guard.pop(next(iter(self._caches)), None)
                self._caches.pop(next(iter(self._caches)))
            self._caches[layer] = CachedSplits(cache, train, dev, guard)
        return self._caches[layer]

    def candidate_logits(self, cache: LayerCache, b: TaskBatch) -> torch.Tensor:
        """``[B, N]`` float32 logits of the candidates at the answer position (pads: -inf), on the logits'
        device. Only the last ``width - min(last)`` positions' logits are computed (an int
        ``logits_to_keep``, which every transformers version with the argument understands; batches are
        length-sorted, so that is a few positions), then each row's answer position is picked."""
        if self.keep:
            keep = b.width - int(b.last.min())
            logits = cache.forward(b.index, logits_to_keep=keep).logits  # [B, keep, V]
            pos = b.last - (b.width - keep)
        else:
            logits = cache.forward(b.index).logits  # [B, T, V]
            pos = b.last
        rows = torch.arange(len(b.last), device=logits.device)
        at = logits[rows, pos.to(logits.device)].float()  # [B, V]
        cl = at.gather(1, b.cand.to(logits.device))
        return cl.masked_fill(~b.cand_ok.to(logits.device), float("-inf"))

    def guard_kl(self, cache: LayerCache, index: int, start: int) -> torch.Tensor:
        """Mean KL(unedited || edited) per valid next-token position of guard batch ``index`` (its texts
        start at ``start``); float32, computed on the logits' device."""
        out = cache.forward(index).logits[:, :-1].float().log_softmax(-1)
        n = out.shape[0]
        ref = self.guard_ref[start:start + n].to(out.device)
        valid = self.guard_valid[start:start + n].to(out.device)
        kl = (ref.exp() * (ref - out)).sum(-1)
        return kl[valid].mean()

    @torch.no_grad()
    def dev_accuracy(self, fit: ChannelFit | None, *, layer: int | None = None) -> dict[str, float]:
        """Dev accuracy (all and per list length) with ``fit``'s scales, or of the model as is (through the
        cache from ``layer``, the last layer by default)."""
        if fit is not None:
            layer = fit.first_layer()
        elif layer is None:
            layer = self.layout.n_layers - 1
        data = self.data_from(layer)
        correct, lengths = [], []
        with fit.hooks() if fit is not None else nullcontext():
            for b in data.dev:
                cl = self.candidate_logits(data.cache, b)
                correct.append(cl.argmax(1) == b.target)
                lengths.append(b.lengths)
        correct, lengths = torch.cat(correct).cpu(), torch.cat(lengths)  # the one host copy
        out = {"all": float(correct.float().mean())}
        for n in sorted(set(lengths.tolist())):
            out[str(n)] = float(correct[lengths == n].float().mean())
        return out

    @torch.no_grad()
    def guard(self, fit: ChannelFit | None, *, layer: int | None = None) -> float:
        """:func:`th_edit.evaluate.guard_loss` with ``fit``'s scales (or of the model as is), computed
        through the layer cache from ``fit``'s first layer (or ``layer``): the same value, the lower
        layers run once."""
        if fit is not None:
            layer = fit.first_layer()
        elif layer is None:
            return guard_loss(self.model, self.tokenizer)
        cache = self.data_from(layer).cache
        total, count = 0.0, 0
        with fit.hooks() if fit is not None else nullcontext():
            for index, ids in zip(self._full_guard[layer], self.guard_full_ids):
                logits = cache.forward(index).logits[0, :-1].float()
                target = torch.tensor(ids[1:], device=logits.device)
                total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                count += len(ids) - 1
        return total / count

