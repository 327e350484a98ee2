"""Run a model from layer ``l`` on: cache the residual stream entering a layer and skip the layers below.

When only layers ``l, l + 1, ...`` change (an edit search, a fit), everything below ``l`` computes the
same hidden state on every pass. :func:`hidden_entering` computes that state once (stopping the forward
pass at layer ``l``); :func:`run_from` then runs the model's own ``forward`` with the layers below ``l``
replaced by no-ops and the cached state injected at layer ``l`` by a forward pre-hook. Everything else
(embeddings, rotary/learned positions, causal, padding and sliding-window masks, the final norm, the
unembedding, ``logits_to_keep``) is the model's own code, so the approach is generic over every
architecture in :data:`th_edit.core.architectures.ARCHITECTURES`; ``tests/core/test_layer_cache.py`` checks it against
a plain forward pass on tiny models of each layout.

:class:`LayerCache` keeps the states of a fixed list of batches within a memory bound; batches that do not
fit are recomputed (without gradient) when they are used.

>>> cache = LayerCache(model, layout, first_layer=18)                          # doctest: +SKIP
>>> cache.add(input_ids=ids, attention_mask=mask)                               # doctest: +SKIP
>>> logits = cache.forward(0, logits_to_keep=1).logits                          # doctest: +SKIP

:func:`reuse_lower_layers` does the same for code that just calls ``model(...)`` (evaluation, the
discovery measurements, the grid search, steering): inside it, the model remembers the state entering
``first_layer`` per distinct input and runs only the layers from there on a repeat.

>>> with reuse_lower_layers(model, layout, first_layer=18):                    # doctest: +SKIP
...     for candidate in candidates:                                            # edits in layers >= 18
...         evaluate(model, tokenizer, dev)                                     # lower layers run once
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["hidden_entering", "run_from", "skip_layers", "LayerCache", "reuse_lower_layers", "LowerLayerReuse"]

logger = logging.getLogger(__name__)


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


class _SkippedOutput(torch.Tensor):
    """The hidden state a skipped layer hands on. Current transformers decoder loops take a layer's output as
    the hidden state itself; older ones (e.g. GPT-J in transformers 5.17) read ``output[0]`` as the hidden
    state and ``output[1]`` as the attention weights. This tensor answers both: ``[0]`` is itself, ``[1]``
    is None (no attention: the layer did not run). The first layer that runs gets the cached state instead."""

    def __getitem__(self, index):
        if isinstance(index, int) and index in (0, 1):
            return self if index == 0 else None
        return super().__getitem__(index)


def _noop_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
    hidden = _hidden_arg(args, kwargs)
    return hidden if isinstance(hidden, _SkippedOutput) else hidden.as_subclass(_SkippedOutput)


def ran_attentions(attentions, n_ran: int) -> tuple:
    """The attentions of the ``n_ran`` layers that ran: models whose loop also records the skipped layers
    (as None, see :class:`_SkippedOutput`) give one entry per layer; the skipped ones are dropped."""
    attentions = tuple(attentions)
    return attentions[len(attentions) - n_ran:] if len(attentions) > n_ran else attentions


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
        out = model(**inputs)
    if getattr(out, "attentions", None) is not None:
        out.attentions = ran_attentions(out.attentions, layout.n_layers - layer)
    return out


class LayerCache:
    """Hidden states entering ``first_layer`` for a fixed list of input batches, within ``max_bytes``.

    Args:
        model: the causal LM. layout: its :class:`th_edit.core.layout.AttentionLayout` (``editor.layout``).
        first_layer: the lowest layer whose computation may change between passes.
        max_bytes: memory bound for the cached states; a batch whose state does not fit is recomputed
            (without gradient, only the layers below ``first_layer``) each time it is used. States are
            computed on first use.

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
        """Add one batch (the keyword inputs of ``model(...)``); returns its index. Its state is computed
        when the batch is first used, so batches never used cost nothing."""
        self.batches.append(dict(inputs, use_cache=False))
        self._states.append(None)
        return len(self.batches) - 1

    def state(self, index: int) -> torch.Tensor | None:
        """The hidden state entering ``first_layer`` for batch ``index`` (None when ``first_layer`` is 0)."""
        if self.first_layer == 0:
            return None
        state = self._states[index]
        if state is None:
            state = hidden_entering(self.model, self.layout, self.first_layer, **self.batches[index])
            size = state.numel() * state.element_size()
            if self.cached_bytes + size <= self.max_bytes:
                self._states[index] = state
                self.cached_bytes += size
            else:
                logger.info("layer cache: batch %d (%d bytes) exceeds the %d-byte bound; it is recomputed when used",
                            index, size, self.max_bytes)
        return state

    def advance(self, layer: int) -> None:
        """Move the cache up to ``layer`` (``>= first_layer``): each kept state runs only the layers in
        between, so walking a list of increasing layers costs one forward pass in all.

        Use it when the lowest changed layer rises (e.g. measuring candidates sorted by layer)."""
        _check_layer(self.layout, layer)
        if layer < self.first_layer:
            raise InvalidArgumentError(f"advance({layer}) is below the cache's first layer {self.first_layer}.")
        if layer == self.first_layer:
            return
        old, self._states, self.cached_bytes = self._states, [None] * len(self._states), 0
        for i, state in enumerate(old):
            if state is None and self.first_layer > 0:
                continue  # never used (or over the bound): computed from scratch when first used
            if state is None:
                new = hidden_entering(self.model, self.layout, layer, **self.batches[i])
            else:
                with skip_layers(self.layout, self.first_layer, state):
                    new = hidden_entering(self.model, self.layout, layer, **self.batches[i])
            size = new.numel() * new.element_size()
            if self.cached_bytes + size <= self.max_bytes:
                self._states[i], self.cached_bytes = new, self.cached_bytes + size
        self.first_layer = int(layer)

    def forward(self, index: int, **extra: Any):
        """``model(**batch, **extra)`` for batch ``index``, running only layers ``>= first_layer``.
        With ``output_attentions`` the output holds the attentions of those layers only (index
        ``layer - first_layer``)."""
        inputs = {**self.batches[index], **extra}
        if self.first_layer == 0:
            return self.model(**inputs)
        return run_from(self.model, self.layout, self.first_layer, self.state(index), **inputs)

    def __len__(self) -> int:
        return len(self.batches)


_KEY_ARGS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class LowerLayerReuse:
    """What :func:`reuse_lower_layers` installs on the model: counters for tests and benchmarks.

    Attributes:
        hits: forward passes that started from a remembered state. misses: passes that computed one.
        bypassed: passes run in full (inputs it cannot key, a changed lower layer, gradients needed below).
        cached_bytes: memory the remembered states use.
    """

    def __init__(self, model: nn.Module, layout, first_layer: int, max_bytes: int) -> None:
        _check_layer(layout, first_layer)
        self.model, self.layout, self.first_layer, self.max_bytes = model, layout, int(first_layer), int(max_bytes)
        self.hits = self.misses = self.bypassed = self.cached_bytes = self._paused = 0
        self._store: dict[str, tuple] = {}  # digest -> (key tensors, hidden, lower attentions, bytes)
        upper = {id(p) for b in _blocks(layout)[first_layer:] for p in b.parameters()}
        self._lower_params = [p for p in model.parameters() if id(p) not in upper]
        after = [*_blocks(layout)[first_layer:], model.get_submodule(layout.spec.final_norm)]
        if model.get_output_embeddings() is not None:
            after.append(model.get_output_embeddings())
        upper_mods = {id(m) for b in after for m in b.modules()}
        self._lower_modules = [m for m in model.modules() if id(m) not in upper_mods and m is not model]
        self._fingerprint = self._lower_state()

    def _lower_state(self) -> tuple:
        """Versions of the lower parameters (in-place writes bump them) and the hooks on lower modules."""
        versions = tuple(p._version for p in self._lower_params)
        hooks = tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self._lower_modules)
        return versions, hooks

    def _key(self, args: tuple, kwargs: dict) -> tuple[str, list[torch.Tensor | None]] | None:
        if len(args) > 1 or kwargs.get("inputs_embeds") is not None or kwargs.get("past_key_values") is not None \
                or kwargs.get("use_cache"):
            return None
        named = dict(kwargs)
        if args:
            named["input_ids"] = args[0]
        if not isinstance(named.get("input_ids"), torch.Tensor):
            return None
        tensors = [named.get(k) for k in _KEY_ARGS]
        digest = hashlib.sha1()
        for t in tensors:
            if t is None:
                digest.update(b"-")
                continue
            if not isinstance(t, torch.Tensor):
                return None
            digest.update(f"{tuple(t.shape)}{t.dtype}{t.device}".encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest(), tensors

    def _valid(self) -> bool:
        if self._lower_state() != self._fingerprint:
            if self._store:
                logger.debug("reuse_lower_layers: a layer below %d changed; forgetting %d states",
                             self.first_layer, len(self._store))
            self._store.clear()
            self.cached_bytes = 0
            self._fingerprint = self._lower_state()
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._lower_params)
        return not needs_grad

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block, calls run in full and remember nothing (e.g. a fit that writes lower layers
        or has its own cache); a lower layer changed meanwhile is still noticed afterwards."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def forward(self, original, args: tuple, kwargs: dict):
        if self._paused:
            return original(*args, **kwargs)
        try:
            return self._forward(original, args, kwargs)
        finally:  # hooks transformers installs during a call (output recorders) are not a change
            self._fingerprint = self._lower_state()

    def _forward(self, original, args: tuple, kwargs: dict):
        key = self._key(args, kwargs) if self._valid() and not kwargs.get("output_hidden_states") else None
        if key is None:
            self.bypassed += 1
            return original(*args, **kwargs)
        digest, tensors = key
        kwargs = dict(kwargs, use_cache=False)
        want_attentions = bool(kwargs.get("output_attentions"))
        hit = self._store.get(digest)
        if hit is not None and all(a is b or (a is not None and b is not None and torch.equal(a, b))
                                   for a, b in zip(hit[0], tensors)) and (hit[2] is not None or not want_attentions):
            self.hits += 1
            with skip_layers(self.layout, self.first_layer, hit[1]):
                out = original(*args, **kwargs)
            if want_attentions:
                out.attentions = self._join(hit[2], out.attentions)
            return out
        self.misses += 1
        return self._full(original, args, kwargs, digest, tensors, want_attentions)

    def _join(self, lower: tuple, upper) -> tuple:
        """The attentions of every layer: the remembered lower ones, then those of the layers that ran."""
        upper = ran_attentions(upper, self.layout.n_layers - self.first_layer)
        if len(upper) != self.layout.n_layers - self.first_layer:  # pragma: no cover - a model that records otherwise
            raise RuntimeError(f"expected attentions of {self.layout.n_layers - self.first_layer} layers, got {len(upper)}")
        return tuple(lower) + upper

    def _full(self, original, args: tuple, kwargs: dict, digest: str, tensors: list, want_attentions: bool):
        """A plain forward pass that also remembers the state entering ``first_layer`` (and the lower
        layers' attentions when they were asked for)."""
        seen: dict[str, torch.Tensor] = {}

        def grab(module, a, kw):
            seen["hidden"] = _hidden_arg(a, kw).detach()

        handle = _blocks(self.layout)[self.first_layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = original(*args, **kwargs)
        finally:
            handle.remove()
        hidden = seen["hidden"]
        lower = tuple(a.detach() for a in out.attentions[:self.first_layer]) if want_attentions else None
        size = hidden.numel() * hidden.element_size() + sum(a.numel() * a.element_size() for a in lower or ())
        old = self._store.pop(digest, None)
        if old is not None:
            self.cached_bytes -= old[3]
        if self.cached_bytes + size <= self.max_bytes:
            self._store[digest] = ([None if t is None else t.detach().clone() for t in tensors], hidden, lower, size)
            self.cached_bytes += size
        return out


@contextlib.contextmanager
def reuse_lower_layers(model: nn.Module, layout, first_layer: int, *,
                       max_bytes: int = 1 << 30) -> Iterator[LowerLayerReuse]:
    """Inside the block, ``model(...)`` runs decoder layers ``< first_layer`` once per distinct input.

    Each call is keyed by its ``input_ids``, ``attention_mask``, ``position_ids`` and ``token_type_ids``
    (compared exactly); on a repeat, the remembered state entering ``first_layer`` is injected and only the
    layers from there run (:func:`skip_layers`), through the model's own ``forward``. Meant for searches
    whose candidates change only layers ``>= first_layer``: the result equals the full forward pass.

    Safe by construction: a write to any parameter outside layers ``>= first_layer`` (tracked by tensor
    versions) or a hook added or removed there forgets every remembered state; calls with
    ``inputs_embeds``, ``past_key_values``, ``use_cache=True`` or ``output_hidden_states``, and calls that
    need gradients below ``first_layer``, run in full. With ``output_attentions`` the lower layers'
    attentions are remembered too, so the output has every layer's. States beyond ``max_bytes`` are not remembered (those inputs run in full
    each time). Everything is restored on exit. Yields a :class:`LowerLayerReuse` with hit counters.
    """
    reuse = LowerLayerReuse(model, layout, first_layer, max_bytes)
    saved = model.__dict__.get("forward")
    original = model.forward

    @functools.wraps(original)  # keeps the signature: callers probe it for ``logits_to_keep``
    def forward(*args: Any, **kwargs: Any):
        return reuse.forward(original, args, kwargs)

    model.forward = forward
    try:
        yield reuse
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved
        reuse._store.clear()
