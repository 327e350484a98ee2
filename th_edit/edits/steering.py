"""Run-time steering along a channel: rescale a head's output along OV write directions, no weight change.

For head ``h`` of layer ``l`` with folded OV circuit ``U S V^T``, the head's output at a position is
``o = z W_O[h]`` (``z`` the attention-weighted values, ``[d_h]``). Steering with scale ``alpha`` and an
optional additive amount ``add`` replaces it, at the chosen positions, by

    o + sum_i ((alpha - 1) (o . v_i) + add_i) v_i        (v_i: write direction of component i)

Because ``W_O[h] v_i = s_i (W_V^f)^+ u_i`` whenever ``W_V^f`` has full column rank (always, in practice),
steering at every position with ``add = 0`` equals the weight edit ``scale_component(l, h, "ov", i,
alpha)`` up to float rounding. It is implemented as a forward hook on the layer's output projection,
removed when the context exits (also on an exception).

>>> with editor.steer(9, 6, component=0, alpha=3.0, positions="last"):   # doctest: +SKIP
...     logits = model(**batch).logits
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.circuits import check_alpha, check_components, svd
from ..core.layout import AttentionLayout
from ..errors import InvalidArgumentError

__all__ = ["steer"]


def _position_mask(positions: Any, shape: tuple[int, int], device) -> torch.Tensor | None:
    """``[B, T, 1]`` float mask of the positions to steer, or None for all positions."""
    B, T = shape
    if positions is None:
        return None
    if isinstance(positions, str):
        if positions != "last":
            raise InvalidArgumentError(f"positions={positions!r}: use None (all), 'last', indices or a [B, T] mask.")
        positions = [-1]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (B, T):
            raise InvalidArgumentError(f"position mask has shape {tuple(positions.shape)}, inputs are {(B, T)}.")
        return positions.to(device=device, dtype=torch.float32)[..., None]
    idx = [positions] if isinstance(positions, numbers.Integral) else list(positions)
    mask = torch.zeros(B, T, 1, device=device)
    for i in idx:
        if not -T <= int(i) < T:
            raise InvalidArgumentError(f"position {i} is out of range for sequences of length {T}.")
        mask[:, int(i)] = 1.0
    return mask


@contextlib.contextmanager
def steer(
    layout: AttentionLayout,
    layer: int,
    head: int,
    *,
    component: int | Sequence[int] = 0,
    alpha: float = 1.0,
    add: float | Sequence[float] = 0.0,
    positions: Any = None,
    folded: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: steer head ``(layer, head)`` along OV component(s) ``component`` (see the module
    docstring). ``positions``: None (every position), ``"last"``, an index or list of indices (applied to
    every row; negative from the end), or a boolean ``[batch, seq]`` mask. Yields a dict holding the write
    directions ``V [d, k]`` used."""
    layout.check(layer, head)
    comps = check_components(component, layout.d_head)
    alpha = check_alpha(alpha)
    adds = torch.as_tensor([float(add)] * len(comps) if isinstance(add, numbers.Real) else [float(a) for a in add])
    if adds.numel() != len(comps) or not torch.isfinite(adds).all():
        raise InvalidArgumentError(f"add={add!r} must be one finite number or one per component ({len(comps)}).")
    _, _, V = svd(layout, layer, head, "ov", folded=folded)
    V = V[:, list(comps)].float()  # [d, k]
    W_O = layout.out_weight(layer, head).detach()
    cols = layout.head_slice(head)

    def hook(mod, args, output):
        z = args[0][..., cols].float()  # [B, T, dh]
        o = z @ W_O.to(z.device, torch.float32)  # [B, T, d]: this head's output
        v = V.to(z.device)
        coeff = (alpha - 1.0) * (o @ v) + adds.to(z.device)  # [B, T, k]
        delta = coeff @ v.T
        mask = _position_mask(positions, tuple(z.shape[:2]), z.device)
        if mask is not None:
            delta = delta * mask
        return output + delta.to(output.dtype)

    handle = layout.out_module(layer).register_forward_hook(hook)
    try:
        yield {"V": V}
    finally:
        handle.remove()
