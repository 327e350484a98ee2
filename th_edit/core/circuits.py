"""Per-head circuits of a live model: weights, thin factors, factored SVDs, and the argument checks.

Circuits follow ``docs/method.md``: ``OV = W_V W_O`` and ``QK = W_Q W_K^T`` per head, folded by default (the
block's input normalisation's linear part ``N`` on the read side: ``W_Q^f = N W_Q``, ``W_K^f = N W_K``,
``W_V^f = N W_V``; per-head q/k-norm gains folded too). Every function takes an
:class:`~th_edit.core.layout.AttentionLayout` and returns float32 tensors; nothing here writes weights.

Shapes: ``d`` model width, ``d_h`` head size, ``H`` query heads. ``circuit_factors`` gives ``(A, B)`` with
``circuit = A @ B.T``, both ``[d, d_h]``; ``stacked_factors`` stacks them ``[n_layers, H, d, d_h]``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ..errors import InvalidArgumentError
from . import linalg
from .layout import AttentionLayout

__all__ = [
    "CIRCUITS", "MODES", "SVDResult", "HeadWeights", "head_weights", "stacked_factors", "circuit_factors", "svd",
    "svd_all", "select_heads", "svd_of_heads", "receiver_side", "check_circuit", "check_mode", "check_components",
    "check_alpha", "edit_factors",
]

CIRCUITS = ("ov", "qk")
#: composition modes: the sender writes what the receiver's query (q), key (k) or value (v) reads
MODES = ("q", "k", "v")


class SVDResult(NamedTuple):
    """SVD of one head's circuit, ``M = U diag(S) V^T``; unpacks as ``U, S, V``.

    ``U [d, d_h]``: read directions (what the head reads from the residual stream; for QK the query
    side). ``S [d_h]``: singular values, descending. ``V [d, d_h]``: write directions for OV, key-side
    read directions for QK. All float32.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def degenerate_blocks(self, rtol: float = 1e-3) -> list[list[int]]:
        """Groups of components with nearly equal singular values (see :func:`linalg.degenerate_blocks`).
        A component inside such a block is a subspace, not a direction: edit the whole block."""
        return linalg.degenerate_blocks(self.S, rtol)


@dataclass
class HeadWeights:
    """Float32 copies of one head's attention parameters in row-vector form.

    ``W_Q, W_K, W_V: [d, d_h]``, ``W_O: [d_h, d]``; biases ``[d_h]`` (``b_O [d]``, shared by the layer's
    heads) or None; ``norm_kind`` of the pre-attention norm (None: no norm) with effective
    ``norm_gain``/``norm_bias [d]``; ``q_gain``/``k_gain [d_h]``: per-head q/k-norm gains or None.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor | None
    b_K: torch.Tensor | None
    b_V: torch.Tensor | None
    b_O: torch.Tensor | None
    norm_kind: str | None
    norm_gain: torch.Tensor | None
    norm_bias: torch.Tensor | None
    q_gain: torch.Tensor | None
    k_gain: torch.Tensor | None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).clone()


# ----- argument checks (shared by edits, steering and analysis) -----------------------------------
def check_circuit(circuit: str) -> str:
    """``circuit`` if it is ``"ov"`` or ``"qk"``, else :class:`InvalidArgumentError`."""
    if circuit not in CIRCUITS:
        raise InvalidArgumentError(f"circuit={circuit!r} is not one of {CIRCUITS}.")
    return circuit


def check_mode(mode: str) -> str:
    """``mode`` if it is a composition mode (``"q"``, ``"k"``, ``"v"``), else :class:`InvalidArgumentError`."""
    if mode not in MODES:
        raise InvalidArgumentError(f"mode={mode!r} is not one of {MODES}.")
    return mode


def check_components(component: int | Sequence[int], d_head: int) -> tuple[int, ...]:
    """Sorted component indices (one index or a list) of a circuit with ``d_head`` components.

    >>> check_components([3, 1], d_head=4)
    (1, 3)
    """
    items = [component] if isinstance(component, numbers.Integral) else list(component)
    if not items:
        raise InvalidArgumentError("component list is empty: name at least one component index.")
    for c in items:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) < d_head:
            raise InvalidArgumentError(
                f"component={c!r} is out of range: each head's circuit has {d_head} components (0..{d_head - 1})."
            )
    if len(set(items)) != len(items):
        raise InvalidArgumentError(f"component list {items} repeats an index.")
    return tuple(sorted(int(c) for c in items))


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float if it is a finite real number, else :class:`InvalidArgumentError`."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise InvalidArgumentError(f"alpha={alpha!r} must be a finite real number (1.0 leaves the head as is).")
    return float(alpha)


# ----- reading ------------------------------------------------------------------------------------
def head_weights(layout: AttentionLayout, layer: int, head: int) -> HeadWeights:
    """Float32 copies of head ``head`` of layer ``layer`` (query head index; GQA resolved)."""
    layout.check(layer, head)
    L = layout
    kind, gain, bias = L.norm_params(layer)
    q_gain, k_gain = L.qk_gains(layer, head)
    return HeadWeights(
        W_Q=_f32(L.proj_weight(layer, head, "q")), W_K=_f32(L.proj_weight(layer, head, "k")),
        W_V=_f32(L.proj_weight(layer, head, "v")), W_O=_f32(L.out_weight(layer, head)),
        b_Q=_f32(L.proj_bias(layer, head, "q")), b_K=_f32(L.proj_bias(layer, head, "k")),
        b_V=_f32(L.proj_bias(layer, head, "v")), b_O=_f32(L.out_bias(layer)),
        norm_kind=kind, norm_gain=_f32(gain), norm_bias=_f32(bias), q_gain=_f32(q_gain), k_gain=_f32(k_gain),
    )


def _layer_factors(layout: AttentionLayout, layer: int, circuit: str, folded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``A, B [H, d, d_h]`` float32 for every head of one layer."""
    L, H = layout, range(layout.n_heads)
    L.check(layer, 0)
    kind, gain, _ = L.norm_params(layer) if folded else (None, None, None)
    gain = None if gain is None else gain.detach().float()

    def stack(kind_: str) -> torch.Tensor:
        return torch.stack([L.proj_weight(layer, h, kind_).detach() for h in H]).float()

    if circuit == "ov":
        A = linalg.fold_norm(stack("v"), kind, gain)
        B = torch.stack([L.out_weight(layer, h).detach() for h in H]).float().transpose(1, 2)
        return A, B
    A, B = stack("q"), stack("k")
    q_gain, k_gain = L.qk_gains(layer, 0) if folded else (None, None)
    if q_gain is not None:
        A, B = A * q_gain.detach().float(), B * k_gain.detach().float()
    return linalg.fold_norm(A, kind, gain), linalg.fold_norm(B, kind, gain)


def stacked_factors(
    layout: AttentionLayout, circuit: str = "ov", *, folded: bool = True, layers: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of every head of ``layers`` (default all) stacked: ``A, B [n_layers, H, d, d_h]`` float32.

    OV: ``A = N W_V``, ``B = W_O^T``. QK: ``A = N W_Q G_q``, ``B = N W_K G_k`` (``N``: the norm's linear
    part when folded, identity when raw; ``G``: per-head q/k-norm gains when folded).
    """
    check_circuit(circuit)
    layers = list(range(layout.n_layers)) if layers is None else list(layers)
    As, Bs = [], []
    for layer in layers:
        A, B = _layer_factors(layout, layer, circuit, bool(folded))
        device = A.device if device is None else device
        As.append(A.to(device))
        Bs.append(B.to(device))
    return torch.stack(As), torch.stack(Bs)


def circuit_factors(
    layout: AttentionLayout, layer: int, head: int, circuit: str = "ov", *, folded: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The thin factors ``(A, B)`` of one head, ``circuit = A @ B.T``, both ``[d, d_h]`` float32."""
    layout.check(layer, head)
    A, B = stacked_factors(layout, circuit, folded=folded, layers=[layer])
    return A[0, head], B[0, head]


def edit_factors(
    layout: AttentionLayout, layer: int, head: int, circuit: str, A: torch.Tensor, B: torch.Tensor,
    U_sel: torch.Tensor, coeff: torch.Tensor, V_sel: torch.Tensor, *, folded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(left, right)`` of the weight change that adds ``sum_i coeff_i u_i v_i^T`` to one head's
    circuit, ``Delta = left @ right.T`` in the target's row form: ``W_O[h]`` for OV (``left [d_h, k]``,
    ``right [d, k]``), ``W_Q[h]`` for QK (``left [d, k]``, ``right [d_h, k]``).

    ``A, B [d, d_h]`` are the head's circuit factors (``circuit = A @ B.T``, folded as ``folded`` says),
    ``U_sel, V_sel [d, k]`` the selected singular vectors and ``coeff [k]`` their changes
    (``(alpha_i - 1) * s_i``). The one path from circuit factors to edit factors: :func:`make_edit`, the
    fit's hooks and the fit's edits all use it (see :func:`linalg.ov_edit_factors` / :func:`linalg.qk_edit_factors`).
    """
    if check_circuit(circuit) == "ov":
        return linalg.ov_edit_factors(A, U_sel, coeff, V_sel)
    w = head_weights(layout, layer, head)
    return linalg.qk_edit_factors(w.W_Q, A, B, U_sel, coeff, V_sel, q_gain=w.q_gain if folded else None)


def svd(layout: AttentionLayout, layer: int, head: int, circuit: str = "ov", *, folded: bool = True) -> SVDResult:
    """Factored SVD of one head's circuit (float32, deterministic signs)."""
    return SVDResult(*linalg.factored_svd(*circuit_factors(layout, layer, head, circuit, folded=folded)))


def svd_all(
    layout: AttentionLayout, circuit: str = "ov", *, folded: bool = True, layers: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> SVDResult:
    """Batched factored SVD of every head of ``layers``: ``U, V [n_layers, H, d, d_h]``, ``S [n_layers, H, d_h]``."""
    return SVDResult(*linalg.factored_svd(*stacked_factors(layout, circuit, folded=folded, layers=layers, device=device)))


def select_heads(
    layout: AttentionLayout, heads: Sequence[tuple[int, int]] | None, layers: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Sorted, de-duplicated, checked ``(layer, head)`` list; default every head of ``layers`` (default all)."""
    if heads is None:
        layers = range(layout.n_layers) if layers is None else layers
        heads = [(l, h) for l in layers for h in range(layout.n_heads)]
    heads = sorted({(int(l), int(h)) for l, h in heads})
    for l, h in heads:
        layout.check(l, h)
    return heads


def svd_of_heads(
    layout: AttentionLayout, heads: list[tuple[int, int]], circuit: str, *, folded: bool = True, device=None
) -> SVDResult:
    """SVDs of the listed heads stacked in that order: ``U, V [n, d, d_h]``, ``S [n, d_h]``."""
    layers = sorted({l for l, _ in heads})
    full = svd_all(layout, circuit, folded=folded, layers=layers, device=device)
    li = torch.tensor([layers.index(l) for l, _ in heads])
    hi = torch.tensor([h for _, h in heads])
    return SVDResult(full.U[li, hi], full.S[li, hi], full.V[li, hi])


def receiver_side(mode: str, ov: SVDResult | None, qk: SVDResult | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(singular values, read directions)`` of a receiver for a composition mode: Q reads along the
    U of its QK circuit, K along the V of its QK circuit, V along the U of its OV circuit."""
    if mode == "q":
        return qk.S, qk.U
    if mode == "k":
        return qk.S, qk.V
    return ov.S, ov.U
