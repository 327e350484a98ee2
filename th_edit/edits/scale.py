"""Exact rank-k edits of per-head circuits, and the log that undoes them bit for bit.

:func:`make_edit` computes the weight change that rescales singular components of one head's folded (or
raw) circuit by ``alpha``: ``Delta = (alpha - 1) sum_i s_i u_i v_i^T``, written into that head's ``W_O[h]``
(OV) or ``W_Q[h]`` (QK) only, so key/value weights shared under GQA are never touched (see ``docs/method.md``).
:class:`EditLog` writes :class:`~th_edit.edits.plan.Edit` factors into a model, keeps the exact values
each edit overwrote and the fingerprint of every touched head before its first edit, and undoes edits
newest first. The maths runs in float32; weights are written in the model's dtype.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from ..core import linalg
from ..core.circuits import (
    SVDResult,
    check_alpha,
    check_circuit,
    check_components,
    circuit_factors,
    edit_factors,
    head_weights,
)
from ..core.layout import AttentionLayout
from ..errors import InvalidArgumentError, NothingToUndoError
from .plan import Edit, coupling_problem

__all__ = ["head_fingerprint", "make_edit", "EditLog", "PRECISION_RTOL", "coupled_selection"]

#: an applied edit whose written change differs from the intended one by more than this (relative, Frobenius)
#: is flagged ``partial``: the model's dtype cannot represent it
PRECISION_RTOL = 0.1

logger = logging.getLogger(__name__)

_FINGERPRINTED = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "norm_gain", "norm_bias", "q_gain", "k_gain")


def head_fingerprint(layout: AttentionLayout, layer: int, head: int) -> str:
    """SHA-256 of head ``(layer, head)``'s weights (W_Q, W_K, W_V, W_O, biases, norm and q/k gains) as
    float32 bytes. Identifies the base model an edit plan applies to."""
    h = hashlib.sha256()
    w = head_weights(layout, layer, head)
    for name in _FINGERPRINTED:
        t = getattr(w, name)
        h.update(name.encode())
        if t is not None:
            h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _warn_if_partial_block(result: SVDResult, components: tuple[int, ...], layer: int, head: int, circuit: str) -> None:
    for block in result.degenerate_blocks():
        chosen = set(block) & set(components)
        if chosen and chosen != set(block):
            logger.warning(
                "layer %d head %d %s: components %s have nearly equal singular values, so component(s) %s "
                "alone are not well defined; pass component=%s to scale the whole subspace.",
                layer, head, circuit, block, sorted(chosen), block,
            )


def make_edit(
    layout: AttentionLayout, layer: int, head: int, circuit: str, component, alpha: float, *, folded: bool = True,
    alphas=None, couplings=None, warn_partial: bool = True,
) -> Edit:
    """The :class:`Edit` rescaling ``component`` (an index or a list) of one head's circuit by ``alpha``, or
    each component by its own entry of ``alphas`` (aligned with the sorted components; ``alpha`` is then 1).

    ``couplings`` (``(a, b, g)`` triples over ``component``; see :attr:`Edit.couplings`) add
    ``g * s_a * u_a v_b^T`` each: the change is then ``U diag(S) M V^T`` over the components, ``M`` holding
    ``alpha_i - 1`` on its diagonal and the couplings off it.

    ``warn_partial=False`` skips the warning about components that split a block of nearly equal singular
    values (for callers that scale many components at once on purpose, such as causal tests).

    Nothing is written; apply it with :meth:`EditLog.apply`. Raises :class:`InvalidArgumentError` on a bad
    layer, head, circuit, component or alpha, or when the change would not be finite.
    """
    layout.check(layer, head)
    check_circuit(circuit)
    components = check_components(component, layout.d_head)
    alpha = check_alpha(alpha)
    scales = None
    if alphas is not None:
        scales = tuple(check_alpha(a) for a in alphas)
        if len(scales) != len(components):
            raise InvalidArgumentError(f"alphas has {len(scales)} entries for {len(components)} components; give one each.")
    A, B = circuit_factors(layout, layer, head, circuit, folded=folded)
    U, S, V = linalg.factored_svd(A, B)
    if warn_partial:
        _warn_if_partial_block(SVDResult(U, S, V), components, layer, head, circuit)
    idx = torch.tensor(components, device=U.device)
    factor = torch.tensor(scales, dtype=S.dtype, device=S.device) - 1.0 if scales is not None else alpha - 1.0
    coeff = factor * S[idx]
    U_sel, coeff = coupled_selection(U[:, idx], coeff, S[idx], components, couplings)
    left, right = edit_factors(layout, layer, head, circuit, A, B, U_sel, coeff, V[:, idx], folded=folded)
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        raise InvalidArgumentError(
            f"the edit of layer {layer} head {head} {circuit} is not finite (a q-norm gain is ~0?); "
            "nothing was changed. Try folded=False."
        )
    return Edit(
        layer=layer, head=head, circuit=circuit, components=components, alpha=1.0 if scales else alpha, folded=folded,
        singular_values=tuple(float(s) for s in S[idx].tolist()), left=left.cpu(), right=right.cpu(), alphas=scales,
        couplings=tuple((int(a), int(b), float(g)) for a, b, g in couplings) if couplings else None,
    )


def coupled_selection(U_sel: torch.Tensor, coeff: torch.Tensor, S_sel: torch.Tensor, components: tuple[int, ...],
                      couplings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_sel, coeff)`` to pass to :func:`~th_edit.core.circuits.edit_factors` for a change with
    ``couplings`` (unchanged without them): ``U_sel @ (diag(S) M)`` and ones, so that the circuit change is
    ``U_sel diag(S) M V_sel^T`` with ``M`` holding ``coeff / S`` on the diagonal and each coupling's ``g`` at
    ``(a, b)``. Computed in ``coeff``'s dtype. Raises :class:`InvalidArgumentError` on a coupling that does
    not join two different ``components`` with a finite ``g``."""
    if not couplings:
        return U_sel, coeff
    problem = coupling_problem(components, couplings)
    if problem:
        raise InvalidArgumentError(f"{problem}.")
    pos = {c: i for i, c in enumerate(components)}
    core = torch.diag(coeff)
    for a, b, g in couplings:
        core[pos[a], pos[b]] += float(g) * S_sel[pos[a]]
    return U_sel.to(coeff.dtype) @ core, torch.ones_like(coeff)


def _lost_fraction(old: torch.Tensor, new: torch.Tensor, delta: torch.Tensor) -> float:
    """``||(new - old) - delta|| / ||delta||``: how much of the intended change rounding lost (0 if none intended)."""
    want = float(delta.norm())
    if want == 0.0:
        return 0.0
    return float(((new.float() - old.float()) - delta).norm()) / want


class EditLog:
    """The edits written into one model, oldest first, with what each overwrote.

    Args:
        layout: the model's :class:`AttentionLayout`.

    Attributes:
        fingerprints: ``"layer.head" -> sha256`` of each touched head before its first edit.
    """

    def __init__(self, layout: AttentionLayout) -> None:
        self.layout = layout
        self._entries: list[tuple[Edit, torch.Tensor]] = []
        self.fingerprints: dict[str, str] = {}

    @property
    def partial_edits(self) -> list[Edit]:
        """Applied edits the model's dtype could only partly represent (see :data:`PRECISION_RTOL`)."""
        return [e for e, _ in self._entries if e.partial]

    @property
    def edits(self) -> list[Edit]:
        """Edits currently applied, oldest first."""
        return [e for e, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, edit: Edit) -> None:
        """Write ``edit``'s factors into the model and log it; on any error nothing is changed."""
        self.layout.check(edit.layer, edit.head)
        check_circuit(edit.circuit)
        view = self.layout.target(edit.layer, edit.head, edit.circuit)
        delta = edit.delta().to(view.device)
        if delta.shape != view.shape:
            raise InvalidArgumentError(
                f"edit factors give a {tuple(delta.shape)} change but {edit.target} of layer {edit.layer} head "
                f"{edit.head} is {tuple(view.shape)}: the edit was made for a different geometry."
            )
        key = f"{edit.layer}.{edit.head}"
        fingerprint = self.fingerprints.get(key) or head_fingerprint(self.layout, edit.layer, edit.head)
        old = view.detach().clone()
        new = torch.where(delta == 0, old, (old.float() + delta).to(old.dtype))
        if not torch.isfinite(new).all():
            raise InvalidArgumentError(
                f"the edit would make {edit.target} of layer {edit.layer} head {edit.head} non-finite in "
                f"{old.dtype} (alpha={edit.alpha} too large?); nothing was changed."
            )
        edit.partial = _lost_fraction(old, new, delta) > PRECISION_RTOL
        if edit.partial:
            logger.warning(
                "layer %d head %d %s edit (alpha=%g): %s cannot represent this change; %.0f%% of it is lost to "
                "rounding (%d of %d elements changed). The edit is applied and flagged partial; use float32 "
                "weights or a larger change of alpha.", edit.layer, edit.head, edit.circuit, edit.alpha, old.dtype,
                100 * min(_lost_fraction(old, new, delta), 1.0), int((new != old).sum()), old.numel(),
            )
        with torch.no_grad():
            view.copy_(new)
        self.fingerprints.setdefault(key, fingerprint)
        self._entries.append((edit, old))

    def undo(self) -> Edit:
        """Revert the most recent edit bit for bit and return it."""
        if not self._entries:
            raise NothingToUndoError("no edit to undo: the model is already in its original state.")
        edit, old = self._entries.pop()
        view = self.layout.target(edit.layer, edit.head, edit.circuit)
        with torch.no_grad():
            view.copy_(old)
        if not any((e.layer, e.head) == (edit.layer, edit.head) for e, _ in self._entries):
            self.fingerprints.pop(f"{edit.layer}.{edit.head}", None)  # the head is back to its base weights
        return edit

    def reset(self) -> list[Edit]:
        """Revert every edit (newest first); the model's tensors are then bit-identical to the start."""
        undone = []
        while self._entries:
            undone.append(self.undo())
        return undone
