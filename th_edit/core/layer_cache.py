"""Run a model from layer ``l`` on: cache the residual stream entering a layer and skip the layers below.

When only layers ``l, l + 1, ...`` change (an edit search, a fit), everything below ``l`` computes the
same hidden state on every pass. :func:`hidden_entering` computes that state once (stopping the forward
pass at layer ``l``); :func:`run_from` then runs the model's own ``forward`` with the layers below ``l``
replaced by no-ops and the cached state injected at layer ``l`` by a forward pre-hook. Everything else
(embeddings, rotary/learned positions, causal, padding and sliding-window masks, the final norm, the
unembedding, ``logits_to_keep``) is the model's own code, so the approach is generic over every
architecture in :data:`th_edit.architectures.ARCHITECTURES`; ``tests/test_layer_cache.py`` checks it against
a plain forward pass on tiny models of each layout.

:class:`LayerCache` keeps the states of a fixed list of batches within a memory bound; batches that do not
fit are recomputed (without gradient) when they are used.

>>> cache = LayerCache(model, layout, first_layer=18)                          # doctest: +SKIP
>>> cache.add(input_ids=ids, attention_mask=mask)                               # doctest: +SKIP
>>> logits = cache.forward(0, logits_to_keep=1).logits                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["hidden_entering", "run_from", "skip_layers", "LayerCache"]

logger = logging.getLogger("th_edit")


class _Stop(Exception):
    """Raised inside the forward pass once the wanted hidden state has been seen."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _blocks(layout) -> list[nn.Module]:
    return list(layout.blocks)


def _check_layer(layout, layer: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.n_layers:
        raise InvalidArgumentError(f"layer={layer!r} is out of range: this model has {layout.n_layers} layers.")


@torch.no_grad()
def hidden_entering(model: nn.Module, layout, layer: int, **inputs: Any) -> torch.Tensor:
    """The residual stream entering decoder layer ``layer`` (``[B, T, d]``, the model's dtype) for
    ``model(**inputs)``; layers ``layer`` and above are not run."""
    _check_layer(layout, layer)
    block = _blocks(layout)[layer]

    def grab(module, args, kwargs):
        raise _Stop(_hidden_arg(args, kwargs).detach())

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop as stop:
        return stop.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer} was never called by the model's forward pass")  # pragma: no cover


def _noop_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _hidden_arg(args, kwargs)


@contextlib.contextmanager
def skip_layers(layout, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, the model's forward pass skips decoder layers ``< layer`` and starts layer
    ``layer`` from ``hidden`` (which must come from :func:`hidden_entering` on the same inputs).

    The skipped layers' ``forward`` is replaced by an identity on the instance (transformers' decoder
    loops expect the hidden state back) and restored on exit, whatever happens."""
    _check_layer(layout, layer)
    blocks = _blocks(layout)
    saved = []
    for block in blocks[:layer]:
        saved.append((block, block.__dict__.get("forward")))
        block.forward = _noop_forward

    def inject(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = blocks[layer].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block, forward in saved:
            if forward is None:
                del block.forward
            else:  # pragma: no cover - a forward already overridden on the instance
                block.forward = forward


def run_from(model: nn.Module, layout, layer: int, hidden: torch.Tensor, **inputs: Any):
    """``model(**inputs)`` computed from ``hidden``, the cached state entering ``layer``."""
    with skip_layers(layout, layer, hidden):
        return model(**inputs)


class LayerCache:
    """Hidden states entering ``first_layer`` for a fixed list of input batches, within ``max_bytes``.

    Args:
        model: the causal LM. layout: its :class:`th_edit.architectures.AttentionLayout` (``editor.layout``).
        first_layer: the lowest layer whose computation may change between passes.
        max_bytes: memory bound for the cached states; a batch whose state does not fit is recomputed
            (without gradient, only the layers below ``first_layer``) each time it is used.

    Attributes:
        batches: the keyword inputs of each added batch. cached_bytes: memory the states use.
    """

    def __init__(self, model: nn.Module, layout, first_layer: int, *, max_bytes: int = 1 << 30) -> None:
        _check_layer(layout, first_layer)
        self.model, self.layout, self.first_layer, self.max_bytes = model, layout, int(first_layer), int(max_bytes)
        self.batches: list[dict[str, Any]] = []
        self._states: list[torch.Tensor | None] = []
        self.cached_bytes = 0

    def add(self, **inputs: Any) -> int:
        """Add one batch (the keyword inputs of ``model(...)``); returns its index."""
        inputs = dict(inputs, use_cache=False)
        state = None
        if self.first_layer > 0:
            state = hidden_entering(self.model, self.layout, self.first_layer, **inputs)
            size = state.numel() * state.element_size()
            if self.cached_bytes + size > self.max_bytes:
                logger.info("layer cache: batch %d (%d bytes) exceeds the %d-byte bound; it will be recomputed",
                            len(self.batches), size, self.max_bytes)
                state = None
            else:
                self.cached_bytes += size
        self.batches.append(inputs)
        self._states.append(state)
        return len(self.batches) - 1

    def state(self, index: int) -> torch.Tensor | None:
        """The hidden state entering ``first_layer`` for batch ``index`` (None when ``first_layer`` is 0)."""
        if self.first_layer == 0:
            return None
        state = self._states[index]
        if state is None:
            state = hidden_entering(self.model, self.layout, self.first_layer, **self.batches[index])
        return state

    def forward(self, index: int, **extra: Any):
        """``model(**batch, **extra)`` for batch ``index``, running only layers ``>= first_layer``."""
        inputs = {**self.batches[index], **extra}
        if self.first_layer == 0:
            return self.model(**inputs)
        return run_from(self.model, self.layout, self.first_layer, self.state(index), **inputs)

    def __len__(self) -> int:
        return len(self.batches)
