"""Pure linear algebra for low-rank attention circuits. Tensors in, tensors out; no model knowledge.

Conventions (row vectors, as in transformers and TransformerLens):

* a circuit is a product ``M = A @ B.T`` of two thin factors ``A: [..., d_a, r]`` and
  ``B: [..., d_b, r]`` (OV: ``A = W_V``, ``B = W_O.T``; QK: ``A = W_Q``, ``B = W_K``);
* its SVD ``M = U diag(S) V.T`` has ``U: [..., d_a, r]`` (read directions), ``S: [..., r]``
  (descending) and ``V: [..., d_b, r]`` (write directions for OV, key-side read directions for QK);
* a dense ``d x d`` matrix is never formed: the SVD goes through QR of each factor and the SVD of the
  small ``r x r`` core (Elhage et al. 2021; TransformerLens ``FactoredMatrix``).

Sign convention: each singular pair ``(u_i, v_i)`` is flipped so that the entry of ``u_i`` with the
largest absolute value is positive (ties go to the lowest index), which makes results deterministic.
"""

from __future__ import annotations

import torch

__all__ = [
    "fold_norm",
    "factored_svd",
    "fix_signs",
    "degenerate_blocks",
    "pinv_apply",
    "ov_edit_factors",
    "qk_edit_factors",
]


def fold_norm(W: torch.Tensor, kind: str | None, gain: torch.Tensor | None) -> torch.Tensor:
    """Put the linear part ``N`` of a block's input normalisation on the read side: ``N @ W``.

    ``N = C diag(g)`` for LayerNorm (``C = I - 11^T / d`` centres the input) and ``diag(g)`` for
    RMSNorm; the data-dependent ``1 / std(x)`` (or ``1 / rms(x)``) is a positive scalar per token and
    stays outside, as do biases.

    Args:
        W: ``[..., d, r]`` read-side factor (e.g. ``W_Q``); kind: ``"layernorm"``, ``"rmsnorm"``,
            ``"rmsnorm_plus_one"`` or None (no norm); gain: effective ``[..., d]`` gain or None (ones).

    >>> import torch
    >>> fold_norm(torch.ones(3, 1), "layernorm", None).flatten().tolist()
    [0.0, 0.0, 0.0]
    """
    if kind is None:
        return W
    if gain is not None:
        W = W * gain.to(W.dtype).unsqueeze(-1)
    if kind == "layernorm":
        W = W - W.mean(dim=-2, keepdim=True)
    return W


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs so that the largest-magnitude entry of each column of ``U`` is positive.

    Args:
        U: ``[..., d_a, r]`` left singular vectors.
        V: ``[..., d_b, r]`` right singular vectors (flipped together with ``U``).

    Returns:
        ``(U, V)`` with the convention applied (new tensors).

    >>> import torch
    >>> U, V = fix_signs(-torch.eye(2), torch.eye(2))
    >>> U.diagonal().tolist(), V.diagonal().tolist()
    ([1.0, 1.0], [-1.0, -1.0])
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # [..., 1, r]
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def factored_svd(
    A: torch.Tensor, B: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``M = A @ B.transpose(-1, -2)`` without materialising ``M``.

    Args:
        A: ``[..., d_a, r]``, B: ``[..., d_b, r]`` with ``r <= min(d_a, d_b)``; any leading batch dims.
        dtype: computation dtype (fp32 by default whatever the inputs' dtype).

    Returns:
        ``U [..., d_a, r]``, ``S [..., r]`` (descending), ``V [..., d_b, r]`` with ``M = U diag(S) V^T``
        and the sign convention of :func:`fix_signs`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A, B = torch.randn(8, 3, generator=g), torch.randn(6, 3, generator=g)
    >>> U, S, V = factored_svd(A, B)
    >>> torch.allclose(U @ torch.diag(S) @ V.T, A @ B.T, atol=1e-5)
    True
    """
    A = A.to(dtype)
    B = B.to(dtype)
    Qa, Ra = torch.linalg.qr(A, mode="reduced")  # [.., d_a, r], [.., r, r]
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    core = Ra @ Rb.transpose(-1, -2)  # [..., r, r]
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qa @ Uc
    V = Qb @ Vch.transpose(-1, -2)
    U, V = fix_signs(U, V)
    return U, S, V


def degenerate_blocks(S: torch.Tensor, rtol: float = 1e-3) -> list[list[int]]:
    """Groups of consecutive components whose singular values are nearly equal.

    Two neighbours ``i, i+1`` are joined when ``S[i] - S[i+1] <= rtol * S[0]``. Inside such a block the
    individual singular directions are not determined (any rotation within the block is an equally valid
    SVD): treat the block as a subspace. Components whose value is ~0 (``<= rtol * S[0]``) form a block
    too. Only blocks of two or more components are returned.

    Args:
        S: ``[r]`` singular values, descending.
        rtol: gap threshold relative to the largest singular value.

    >>> import torch
    >>> degenerate_blocks(torch.tensor([3.0, 2.0, 2.0, 1.0]))
    [[1, 2]]
    """
    if S.ndim != 1:
        raise ValueError(f"degenerate_blocks expects a 1-D tensor of singular values, got shape {tuple(S.shape)}")
    s = S.detach().to(torch.float64).cpu()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return [list(range(s.numel()))] if s.numel() > 1 else []
    tol = rtol * float(s[0])
    blocks: list[list[int]] = []
    current = [0]
    for i in range(1, s.numel()):
        if float(s[i - 1] - s[i]) <= tol:
            current.append(i)
        else:
            if len(current) > 1:
                blocks.append(current)
            current = [i]
    if len(current) > 1:
        blocks.append(current)
    return blocks


def pinv_apply(A: torch.Tensor, X: torch.Tensor, *, rcond: float = 1e-10) -> torch.Tensor:
    """``pinv(A) @ X`` in float64: the minimum-norm solution ``C`` of ``A C = X``.

    Args:
        A: ``[d, r]`` thin factor, X: ``[d, k]``.

    Returns:
        ``[r, k]`` float64.
    """
    A64 = A.to(torch.float64)
    return torch.linalg.pinv(A64, rtol=rcond) @ X.to(torch.float64)


def ov_edit_factors(
    W_V_read: torch.Tensor, U_sel: torch.Tensor, coeff: torch.Tensor, V_sel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the ``W_O`` change that adds ``sum_i coeff_i u_i v_i^T`` to the OV circuit.

    With ``OV = W_V_read @ W_O`` and ``u_i`` in the column space of ``W_V_read``,
    ``Delta W_O = pinv(W_V_read) @ U_sel diag(coeff) @ V_sel^T = left @ right^T``.

    Args:
        W_V_read: ``[d, d_h]`` value read factor (folded or raw).
        U_sel: ``[d, k]`` selected left singular vectors; coeff: ``[k]`` (``(alpha - 1) * s_i``);
        V_sel: ``[d, k]`` selected right singular vectors.

    Returns:
        ``left [d_h, k]``, ``right [d, k]`` in float32, with ``Delta W_O = left @ right.T``.
    """
    left = pinv_apply(W_V_read, U_sel) * coeff.to(torch.float64)
    return left.to(torch.float32), V_sel.to(torch.float32)


def qk_edit_factors(
    W_Q: torch.Tensor,
    W_Q_read: torch.Tensor,
    W_K_read: torch.Tensor,
    U_sel: torch.Tensor,
    coeff: torch.Tensor,
    V_sel: torch.Tensor,
    q_gain: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the ``W_Q`` change that adds ``sum_i coeff_i u_i v_i^T`` to the QK circuit.

    The QK circuit is ``W_Q_read @ W_K_read^T`` with ``W_Q_read = N @ W_Q @ G`` (``N`` the input
    normalisation's linear part, ``G = diag(q_gain)`` the per-head query-norm gain, identity if absent).
    A change ``W_Q -> W_Q + y z^T`` changes the circuit by ``N y (W_K_read G z)^T``; choosing
    ``y = W_Q G pinv(W_Q_read) u_i coeff_i`` and ``z = G^{-1} pinv(W_K_read) v_i`` gives exactly
    ``coeff_i u_i v_i^T`` because ``u_i`` and ``v_i`` lie in the column spaces of the two read factors.

    Args:
        W_Q: ``[d, d_h]`` raw query weight (row form); W_Q_read, W_K_read: ``[d, d_h]`` read factors.
        U_sel, V_sel: ``[d, k]``; coeff: ``[k]``; q_gain: ``[d_h]`` or None.

    Returns:
        ``left [d, k]``, ``right [d_h, k]`` in float32, with ``Delta W_Q = left @ right.T``.
    """
    W_Qg = W_Q.to(torch.float64)
    right = pinv_apply(W_K_read, V_sel)
    if q_gain is not None:
        g = q_gain.to(torch.float64)
        W_Qg = W_Qg * g
        right = right / g[:, None]
    left = (W_Qg @ pinv_apply(W_Q_read, U_sel)) * coeff.to(torch.float64)
    return left.to(torch.float32), right.to(torch.float32)
