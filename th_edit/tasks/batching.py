"""Batching helpers shared by evaluation, head roles, fitting and steering.

Padding (right or left), the input device of a possibly dispatched model, logits only where needed
(``logits_to_keep``), and :class:`PromptBatch`: a right-padded batch of task prompts with each item's
first-token position, the target's index and the candidates' first tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..utils.deprecation import renamed_attributes
from .data import first_token

__all__ = [
    "input_device", "output_device", "accepts_logits_to_keep", "plan_batches", "pad_token_id", "pad_sequences", "eager_attention",
    "item_positions", "dataset_rows", "PromptBatch", "prompt_batches",
]


def dataset_rows(dataset) -> list[dict[str, Any]]:
    """A dataset (``datasets.Dataset`` or a sequence of dicts) as a list of row dicts."""
    return dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)


def input_device(model) -> torch.device:
    """Where the model's inputs go: the input embedding's device (CPU if it is offloaded to ``meta``)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def output_device(model) -> torch.device:
    """Where the model's logits come out: the output embedding's device (the input device if there is
    none or it is offloaded to ``meta``)."""
    head = model.get_output_embeddings()
    device = head.weight.device if head is not None else input_device(model)
    return input_device(model) if device.type == "meta" else device


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can compute logits for the last positions only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices sorted by token length (stable) and cut into batches of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token, else 0 (pads are masked)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def pad_sequences(seqs: list[list[int]], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, max_len]`` long, padded on ``padding_side``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[r, cols], mask[r, cols] = torch.tensor(s), 1
    return ids, mask


@contextlib.contextmanager
def eager_attention(model):
    """Run the body with eager attention (needed for ``output_attentions``), then restore the setting."""
    old = getattr(model.config, "_attn_implementation", None)
    if old in (None, "eager"):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


def item_positions(tokenizer, prompt: str, items: Sequence[str]) -> list[int]:
    """Token index of the first token of each item's first mention in ``prompt`` (needs a fast tokenizer)."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for item in items:
        pos = _find_word(prompt, item)
        idx = next((t for t, (a, b) in enumerate(offsets) if a <= pos < b), None)
        if idx is None:
            raise InvalidArgumentError(f"item {item!r} not found in the tokens of prompt {prompt[:60]!r}...")
        out.append(idx)
    return out


def _find_word(text: str, word: str) -> int:
    start = 0
    while True:
        pos = text.find(word, start)
        if pos < 0:
            raise InvalidArgumentError(f"item {word!r} does not occur in prompt {text[:60]!r}...")
        before = text[pos - 1] if pos else " "
        after = text[pos + len(word)] if pos + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return pos
        start = pos + 1


class PromptBatch:
    """A right-padded batch of task prompts with the token positions the role scores need."""

    def __init__(self, tokenizer, rows: list[dict[str, Any]]):
        seqs = tokenizer([r["prompt"] for r in rows])["input_ids"]
        self.lengths = torch.tensor([len(s) for s in seqs])
        self.input_ids, self.attention_mask = pad_sequences(seqs, pad_token_id(tokenizer), "right")
        self.last = self.lengths - 1
        self.positions = [item_positions(tokenizer, r["prompt"], r["items"]) for r in rows]
        self.targets = [r["items"].index(r["target"]) for r in rows]
        self.candidates = [[first_token(tokenizer, w) for w in r["items"]] for r in rows]

    def __len__(self) -> int:
        return len(self.targets)

    def run(self, model, *, need_logits: bool = False, **kwargs):
        """Forward pass over the batch. Logits are computed only where needed (``logits_to_keep``): for
        the final tokens with ``need_logits`` (read them with :meth:`final_logits`), else one position."""
        device = input_device(model)
        width = self.input_ids.shape[1]
        keep = int(width - int(self.last.min())) if need_logits else 1
        self._offset = 0
        if accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = keep
            self._offset = width - keep
        return model(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device), **kwargs)

    def final_logits(self, out) -> torch.Tensor:
        """``[B, V]`` float32 logits at each prompt's final token from :meth:`run` (``need_logits=True``)."""
        rows = torch.arange(len(self))
        return out.logits[rows, (self.last - self._offset).to(out.logits.device)].float().cpu()

    def split_attention(self, att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``att [B, H, T, T]``: attention at the final position to the target ``[B, H]`` and the mean
        attention to each other item ``[B, H]`` (float32, on ``att``'s device)."""
        rows = torch.arange(len(self), device=att.device)
        final = att[rows, :, self.last.to(att.device), :].float()  # [B, H, T]
        tgt, oth = [], []
        for b in range(len(self)):
            pos = torch.tensor(self.positions[b], device=att.device)
            t = self.targets[b]
            tgt.append(final[b, :, pos[t]])
            others = torch.cat([pos[:t], pos[t + 1:]])
            oth.append(final[b][:, others].mean(-1))
        return torch.stack(tgt), torch.stack(oth)


def prompt_batches(tokenizer, dataset, batch_size: int = 8, limit: int | None = None) -> list[PromptBatch]:
    """The first ``limit`` rows of ``dataset`` (all when None) as :class:`PromptBatch` es of ``batch_size``."""
    items = dataset_rows(dataset)
    items = items[:limit] if limit else items
    return [PromptBatch(tokenizer, items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


__getattr__ = renamed_attributes(__name__, {"rows": "dataset_rows"})
