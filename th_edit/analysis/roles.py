"""Data-based head roles: previous-token, duplicate-token, induction, mover and inhibition scores.

Scores come from attention patterns (``output_attentions`` under eager attention, switched on for the
call and restored after) and from direct logit attribution through the final norm with its scale frozen
at the observed value (the usual linearisation).

Definitions (A[i, j] = a head's attention from query position i to key position j):

- On ``[bos] x x`` with ``x`` a random token sequence of length T (first copy at offset o, second at
  o + T): **previous-token** = mean over i >= o + 1 of A[i, i - 1]; **duplicate-token** = mean over the
  second copy of A[i, i - T]; **induction** = mean over the second copy of A[i, i - T + 1].
- On task prompts, at the final position: **attn_target** = attention to the target item's first token
  (its first mention, in the list), **attn_others** = mean attention to each other item's first token,
  **logit_diff** = the head's direct logit contribution to the target's first token minus the mean over
  the other candidates; **mover_score** = mean over prompts of attn_target * logit_diff.
- **Inhibition score** of a sender component (layer, head, OV component i) on a receiver head: with
  gap = attn_others - attn_target of the receiver at the final position, the mean over prompts of
  gap(component removed, i.e. rescaled by 0) - gap(model as is). Positive: the component made the
  receiver look away from the items to suppress and toward the answer (it inhibits).

>>> A = torch.zeros(1, 1, 5, 5); A[0, 0, 1:, :-1] = torch.eye(4)        # a perfect previous-token head
>>> sequence_scores([A], length=2, offset=1)["previous_token"]
tensor([[1.]])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from ..core.layer_cache import LayerCache
from ..errors import InvalidArgumentError
from ..tasks.batching import PromptBatch, accepts_logits_to_keep, eager_attention, input_device, prompt_batches
from ..utils.progress import progress_bar
from .protocol import HeadEditor

__all__ = [
    "repeated_tokens", "sequence_scores", "sequence_roles", "mover_scores", "receiver_gap", "prompt_cache", "inhibition_score",
]

logger = logging.getLogger(__name__)


def repeated_tokens(vocab_size: int, *, n: int = 16, length: int = 20, seed: int = 0,
                    bos_token_id: int | None = None, low: int = 4) -> tuple[torch.Tensor, int]:
    """``n`` sequences ``[bos] x x`` with ``x`` uniform random ids in ``[low, vocab_size)`` of ``length``.
    Returns ``(input_ids [n, offset + 2 * length], offset)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, vocab_size, (n, length), generator=g)
    parts = [x, x]
    if bos_token_id is not None:
        parts.insert(0, torch.full((n, 1), int(bos_token_id)))
    return torch.cat(parts, 1), int(bos_token_id is not None)


def sequence_scores(attentions: Sequence[torch.Tensor], *, length: int, offset: int) -> dict[str, torch.Tensor]:
    """Previous-token, duplicate-token and induction scores [L, H] from per-layer attention
    patterns ``[B, H, T, T]`` of ``[bos] x x`` sequences (see the module docstring)."""
    A = torch.stack([a.float().mean(0) for a in attentions])  # [L, H, T, T]
    T = A.shape[-1]
    i_prev = torch.arange(offset + 1, T)
    i_second = torch.arange(offset + length, T)
    return {
        "previous_token": A[:, :, i_prev, i_prev - 1].mean(-1),
        "duplicate_token": A[:, :, i_second, i_second - length].mean(-1),
        "induction": A[:, :, i_second, i_second - length + 1].mean(-1),
    }


def sequence_roles(model, *, n: int = 16, length: int = 20, seed: int = 0, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """:func:`sequence_scores` of ``model`` on :func:`repeated_tokens` (vocabulary from the config,
    BOS from ``config.bos_token_id``). Returns float32 ``[L, H]`` tensors on the CPU."""
    ids, offset = repeated_tokens(model.config.vocab_size, n=n, length=length, seed=seed,
                                  bos_token_id=getattr(model.config, "bos_token_id", None))
    device = input_device(model)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    sums: dict[str, torch.Tensor] = {}
    with eager_attention(model), torch.no_grad():
        for start in range(0, n, batch_size):
            chunk = ids[start:start + batch_size].to(device)
            atts = model(input_ids=chunk, output_attentions=True, **extra).attentions
            scores = sequence_scores([a.cpu() for a in atts], length=length, offset=offset)
            for k, v in scores.items():
                sums[k] = sums.get(k, 0) + v * len(chunk)
    return {k: v / n for k, v in sums.items()}


def _norm_linear(params, x_last: torch.Tensor):
    """A norm (``params`` = ``(kind, gain, bias, eps)`` of the layout) at the observed inputs ``x_last [B, d]``,
    linearised with its scale frozen: returns ``f(c) = (C c) / sigma * g`` for contributions ``c [B, ..., d]``
    (``C`` centres for LayerNorm; the identity when ``params`` is None, i.e. no such norm)."""
    if params is None:
        return lambda c: c
    kind, gain, _, eps = params
    g = torch.ones(x_last.shape[-1]) if gain is None else gain.detach().float().cpu()
    x = x_last.float()
    centred = kind == "layernorm"
    sigma = (x.var(-1, unbiased=False) if centred else x.pow(2).mean(-1)).add(eps).sqrt()  # [B]

    def apply(c: torch.Tensor) -> torch.Tensor:
        if centred:
            c = c - c.mean(-1, keepdim=True)
        shape = (-1,) + (1,) * (c.ndim - 1)
        return c / sigma.view(shape) * g

    return apply


def mover_scores(editor: HeadEditor, tokenizer, dataset, *, batch_size: int = 8, limit: int | None = 64,
                 progress: bool = True) -> pd.DataFrame:
    """Per head: ``attn_target``, ``attn_others``, ``logit_diff`` and ``mover_score`` (see the module
    docstring), averaged over up to ``limit`` prompts. One row per (layer, head), sorted by mover_score."""
    model, layout = editor.model, editor.layout
    L, H, dh = editor.n_layers, editor.n_heads, editor.d_head
    W_U = model.get_output_embeddings().weight.detach().float().cpu()
    W_O = torch.stack([torch.stack([layout.out_weight(l, h).detach().float().cpu() for h in range(H)]) for l in range(L)])
    batches = prompt_batches(tokenizer, dataset, batch_size, limit)
    captured: dict[Any, torch.Tensor] = {}

    final = layout.final_norm_params()
    post = [layout.post_attn_norm_params(l) for l in range(L)]  # Gemma2/3: a norm on the attention output

    def save(key):
        def hook(module, args):
            captured[key] = args[0].detach()
        return hook

    def save_out(key):
        def hook(module, args, output):
            captured[key] = output.detach()
        return hook

    handles = [layout.out_module(l).register_forward_pre_hook(save(l)) for l in range(L)]
    handles += [layout.out_module(l).register_forward_hook(save_out(("o", l))) for l in range(L) if post[l] is not None]
    handles.append(model.get_submodule(layout.spec.final_norm).register_forward_pre_hook(save("final")))
    sums = {k: torch.zeros(L, H) for k in ("attn_target", "attn_others", "logit_diff", "mover_score")}
    n = 0
    try:
        with eager_attention(model), torch.no_grad(), progress_bar(total=len(batches), desc="mover scores", enabled=progress) as bar:
            for pb in batches:
                out = pb.run(model, output_attentions=True)
                rows = torch.arange(len(pb))
                norm = _norm_linear(final, captured["final"][rows, pb.last].float().cpu())
                for l in range(L):
                    tgt, oth = pb.split_attention(out.attentions[l].cpu())  # [B, H]
                    z = captured[l][rows, pb.last].float().cpu().view(len(pb), H, dh)  # [B, H, dh]
                    written = _norm_linear(post[l], captured[("o", l)][rows, pb.last].float().cpu()
                                           if post[l] is not None else None)
                    contrib = norm(written(torch.einsum("bhk,hkd->bhd", z, W_O[l])))  # [B, H, d]
                    diff = torch.zeros(len(pb), H)
                    for b in range(len(pb)):
                        cand = torch.tensor(pb.candidates[b])
                        logits = contrib[b] @ W_U[cand].T  # [H, n_items]
                        t = pb.targets[b]
                        others = torch.cat([logits[:, :t], logits[:, t + 1:]], 1)
                        diff[b] = logits[:, t] - others.mean(1)
                    sums["attn_target"][l] += tgt.sum(0)
                    sums["attn_others"][l] += oth.sum(0)
                    sums["logit_diff"][l] += diff.sum(0)
                    sums["mover_score"][l] += (tgt * diff).sum(0)
                n += len(pb)
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
    frame = pd.DataFrame([
        {"layer": l, "head": h, **{k: float(v[l, h] / n) for k, v in sums.items()}} for l in range(L) for h in range(H)
    ])
    return frame.sort_values("mover_score", ascending=False).reset_index(drop=True)


def receiver_gap(model, batches: list[PromptBatch], receivers: Sequence[tuple[int, int]], *,
                 cache: LayerCache | None = None) -> torch.Tensor:
    """Mean over prompts of ``attn_others - attn_target`` at the final position, per receiver ``[R]``.

    ``cache``: a :class:`th_edit.core.layer_cache.LayerCache` holding ``batches`` (in order, e.g. from
    :func:`prompt_cache`); only the layers from its ``first_layer`` run, which must not be above a receiver."""
    gaps: list[torch.Tensor] = []  # per batch [R], on the attentions' device (one host copy at the end)
    n = 0
    offset = 0 if cache is None else cache.first_layer
    if any(l < offset for l, _ in receivers):
        raise InvalidArgumentError(f"a receiver lies below the cache's first layer {offset}: {list(receivers)}.")
    with eager_attention(model), torch.no_grad():
        for i, pb in enumerate(batches):
            if cache is None:
                atts = pb.run(model, output_attentions=True).attentions
            else:
                keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
                atts = cache.forward(i, output_attentions=True, **keep).attentions
            parts = []
            for l, h in receivers:
                tgt, oth = pb.split_attention(atts[l - offset][:, h:h + 1])
                parts.append((oth - tgt).sum())
            gaps.append(torch.stack(parts).to(gaps[0].device if gaps else parts[0].device))
            n += len(pb)
    return torch.stack(gaps).sum(0).cpu() / n


def prompt_cache(editor: HeadEditor, batches: list[PromptBatch], first_layer: int) -> LayerCache:
    """A :class:`LayerCache` of the prompt ``batches`` from ``first_layer`` (for :func:`receiver_gap`)."""
    cache = LayerCache(editor.model, editor.layout, first_layer)
    device = input_device(editor.model)
    for pb in batches:
        cache.add(input_ids=pb.input_ids.to(device), attention_mask=pb.attention_mask.to(device))
    return cache


def inhibition_score(editor: HeadEditor, batches: list[PromptBatch], sender: tuple[int, int, int | Sequence[int]],
                     receivers: Sequence[tuple[int, int]], *, base_gap: torch.Tensor | None = None,
                     cache: LayerCache | None = None) -> torch.Tensor:
    """Inhibition score ``[R]`` of sender OV component(s) ``(layer, head, component)`` on each receiver
    head (see the module docstring): the receivers' gap with the component removed minus the gap as is.
    The removal is an exact weight edit, undone before returning (the model is left bit-identical).
    ``cache`` (first layer at most the sender's): run only the layers from there."""
    if base_gap is None:
        base_gap = receiver_gap(editor.model, batches, receivers, cache=cache)
    layer, head, component = sender
    if cache is not None and cache.first_layer > layer:
        raise InvalidArgumentError(f"the cache starts at layer {cache.first_layer}, above the sender's layer {layer}.")
    editor.scale_component(layer, head, "ov", component, 0.0)
    try:
        removed = receiver_gap(editor.model, batches, receivers, cache=cache)
    finally:
        editor.undo()
    return removed - base_gap
