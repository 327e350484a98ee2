"""The exact differentiable reparametrisation of a fitted edit: per-component log-scales applied by hooks.

See :mod:`th_edit.edits.fit` for the maths; the model's parameters are never written while fitting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from ..core import linalg
from ..core.circuits import edit_factors, stacked_factors
from ..core.layout import AttentionLayout
from .plan import Edit
from .scale import coupled_selection

__all__ = ["FitUnit", "ChannelFit", "FitHooks", "frozen_parameters"]

logger = logging.getLogger(__name__)


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every parameter has ``requires_grad=False`` and the model is in eval mode; both are
    restored on exit, also on an error or Ctrl-C (gradients then reach only the log-scales of a fit)."""
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for flag, p in zip(flags, model.parameters()):
            p.requires_grad_(flag)
        model.train(was_training)


# ----- the differentiable edit ---------------------------------------------------------------------
@dataclass
class FitUnit:
    """Precomputed factors of one head's circuit: ``Delta = left diag(alpha - 1) right^T`` (target row form)."""

    layer: int
    head: int
    circuit: str
    S: torch.Tensor  # [r]
    left: torch.Tensor  # OV: [d_h, r] = pinv(W_V^f) U diag(S); QK: [d, r]
    right: torch.Tensor  # OV: [d, r] = V; QK: [d_h, r]
    U: torch.Tensor
    V: torch.Tensor
    A: torch.Tensor  # read factors of the circuit (circuit = A @ B.T)
    B: torch.Tensor


class ChannelFit:
    """Per-component log-scales of a set of heads' circuits, applied to a model through forward hooks.

    ``theta [n_units, r]`` holds the log-scales, ``mask [n_units, r]`` which are active (inactive ones
    contribute exactly nothing). ``coupling [n_units, r, r]`` holds couplings between a head's own active
    components (``coupling_mask`` says which may be non-zero; none until :meth:`enable_couplings`): entry
    ``(a, b)`` adds ``g * s_a * u_a v_b^T`` to the circuit. Inside ``with fit.hooks():`` the model computes
    as if the edit were written into its weights: per unit ``Delta = left @ M @ right^T`` with
    ``M = diag(exp(theta) - 1) + coupling``; nothing is written.
    """

    def __init__(self, layout: AttentionLayout, heads: list[tuple[int, int]], circuits: Sequence[str],
                 folded: bool) -> None:
        self.layout, self.folded = layout, folded
        self.units: list[FitUnit] = []
        layers = sorted({l for l, _ in heads})
        for circuit in circuits:
            # one batched factored SVD per circuit over the layers involved (as circuits.svd, per head)
            A_all, B_all = stacked_factors(layout, circuit, folded=folded, layers=layers)
            U_all, S_all, V_all = linalg.factored_svd(A_all, B_all)
            for layer, head in heads:
                li = layers.index(layer)
                A, B = A_all[li, head], B_all[li, head]
                U, S, V = U_all[li, head], S_all[li, head], V_all[li, head]
                left, right = edit_factors(layout, layer, head, circuit, A, B, U, S, V, folded=folded)
                self.units.append(FitUnit(layer, head, circuit, S, left, right, U, V, A, B))
        r = layout.d_head
        self.theta = torch.zeros(len(self.units), r, dtype=torch.float32)
        self.mask = torch.ones(len(self.units), r, dtype=torch.float32)
        self.coupling: torch.Tensor | None = None  # [n_units, r, r] once enable_couplings ran
        self.coupling_mask: torch.Tensor | None = None

    def copy(self) -> "ChannelFit":
        """A copy sharing the precomputed factors, with its own ``theta``, ``mask`` and couplings."""
        new = ChannelFit.__new__(ChannelFit)
        new.__dict__.update(self.__dict__)
        new.theta, new.mask = self.theta.clone(), self.mask.clone()
        if self.coupling is not None:
            new.coupling, new.coupling_mask = self.coupling.clone(), self.coupling_mask.clone()
        return new

    @property
    def n_active(self) -> int:
        return int(self.mask.sum())

    @property
    def n_couplings(self) -> int:
        """Couplings that may be non-zero (0 before :meth:`enable_couplings`)."""
        return 0 if self.coupling_mask is None else int(self.coupling_mask.sum())

    def enable_couplings(self, band: int) -> None:
        """Let each pair of a unit's active components ``a != b`` with ``|a - b| <= band`` couple (starting
        at 0, so the edit is unchanged until trained)."""
        r = self.theta.shape[1]
        idx = torch.arange(r)
        near = ((idx[:, None] - idx[None, :]).abs() <= band) & (idx[:, None] != idx[None, :])
        self.coupling_mask = self.mask[:, :, None] * self.mask[:, None, :] * near.to(self.mask)
        self.coupling = torch.zeros_like(self.coupling_mask)

    def core(self, theta: torch.Tensor, coupling: torch.Tensor | None, rows: torch.Tensor) -> tuple:
        """``(c [n, r], g [n, r, r] or None)`` of units ``rows``: ``c = (exp(theta) - 1) * mask``, ``g`` the
        masked couplings (None when there are none)."""
        c = (torch.exp(theta[rows]) - 1.0) * self.mask[rows]
        if coupling is None or self.coupling_mask is None:
            return c, None
        return c, coupling[rows] * self.coupling_mask[rows]

    def first_layer(self) -> int:
        active = [u.layer for u, m in zip(self.units, self.mask) if m.any()]
        return min(active) if active else self.layout.n_layers - 1

    def effect(self) -> torch.Tensor:
        """``[n_units, r]`` size of each component's change of its circuit, ``|exp(theta) - 1| * s``
        (the Frobenius norm of ``(alpha - 1) s u v^T``)."""
        S = torch.stack([u.S for u in self.units])
        return (torch.exp(self.theta) - 1.0).abs() * S

    def keep_top(self, k: int, by: str = "effect", importance: torch.Tensor | None = None) -> None:
        """Deactivate all but the ``k`` active components with the largest :meth:`effect` (``by="effect"``)
        or ``|theta|`` (``by="log_scale"``); ties: lower unit, then lower component index. Inactive
        log-scales are set to 0."""
        if by == "attribution":
            value = importance
        else:
            value = self.effect() if by == "effect" else self.theta.abs()
        score = torch.where(self.mask > 0, value, torch.full_like(self.theta, -1.0)).flatten()
        k = min(int(k), self.n_active)
        order = torch.argsort(-score, stable=True)[:k]
        mask = torch.zeros_like(self.mask).flatten()
        mask[order] = 1.0
        self.mask = mask.view_as(self.mask)
        self.theta = self.theta * self.mask
        self.coupling = self.coupling_mask = None  # couplings join kept components only: enable them again

    def _hook_groups(self, theta: torch.Tensor):
        """Per (layer, circuit): unit indices with an active component."""
        groups: dict[tuple[int, str], list[int]] = {}
        for i, u in enumerate(self.units):
            if self.mask[i].any():
                groups.setdefault((u.layer, u.circuit), []).append(i)
        return groups

    def hooks(self, theta: torch.Tensor | None = None, coupling: torch.Tensor | None = None):
        """Context manager installing the hooks; ``theta`` and ``coupling`` (default :attr:`theta`,
        :attr:`coupling`) may require grad."""
        return FitHooks(self, self.theta if theta is None else theta, self.coupling if coupling is None else coupling)

    def edits(self) -> list[Edit]:
        """The fitted change as ordinary :class:`Edit` s (one per unit with active components), with
        the factors :func:`th_edit.edits.scale.make_edit` computes for these scales (one path:
        :func:`th_edit.core.circuits.edit_factors`)."""
        out = []
        for i, u in enumerate(self.units):
            idx = torch.nonzero(self.mask[i]).flatten()
            if idx.numel() == 0:
                continue
            alphas = torch.exp(self.theta[i, idx].double())
            coeff = (alphas - 1.0) * u.S[idx].double()
            couplings = self._couplings(i, idx)
            U_sel, coeff = coupled_selection(u.U[:, idx], coeff, u.S[idx].double(), tuple(idx.tolist()), couplings)
            left, right = edit_factors(self.layout, u.layer, u.head, u.circuit, u.A, u.B, U_sel, coeff,
                                       u.V[:, idx], folded=self.folded)
            out.append(Edit(
                layer=u.layer, head=u.head, circuit=u.circuit, components=tuple(int(c) for c in idx.tolist()),
                alpha=1.0, folded=self.folded, singular_values=tuple(float(s) for s in u.S[idx].tolist()),
                left=left.cpu(), right=right.cpu(), alphas=tuple(float(a) for a in alphas.tolist()),
                couplings=couplings or None,
            ))
        return out

    def _couplings(self, unit: int, idx: torch.Tensor) -> list[tuple[int, int, float]]:
        """The non-zero ``(a, b, g)`` couplings of one unit (component indices)."""
        if self.coupling is None:
            return []
        g = (self.coupling[unit] * self.coupling_mask[unit])[idx][:, idx]  # [k, k] over the kept components
        return [(int(idx[a]), int(idx[b]), float(g[a, b])) for a, b in torch.nonzero(g).tolist()]

    def component_table(self) -> pd.DataFrame:
        rows = []
        for i, u in enumerate(self.units):
            for c in torch.nonzero(self.mask[i]).flatten().tolist():
                t = float(self.theta[i, c])
                rows.append({"layer": u.layer, "head": u.head, "circuit": u.circuit, "component": c,
                             "singular_value": float(u.S[c]), "log_scale": t, "alpha": math.exp(t)})
        return pd.DataFrame(rows, columns=["layer", "head", "circuit", "component", "singular_value", "log_scale", "alpha"])


def _mix(z: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``z @ M`` per unit for ``z [B, T, n, r]``, ``M = diag(c) + g`` (``c [n, r]``, ``g [n, r, r]`` or None)."""
    out = z * c.to(z.device)
    return out if g is None else out + torch.einsum("btnx,nxy->btny", z, g.to(z.device))


class FitHooks:
    def __init__(self, fit: ChannelFit, theta: torch.Tensor, coupling: torch.Tensor | None = None) -> None:
        self.fit, self.theta, self.coupling, self.handles = fit, theta, coupling, []

    def __enter__(self):
        fit, L = self.fit, self.fit.layout
        dh, H = L.d_head, L.n_heads
        for (layer, circuit), idx in fit._hook_groups(self.theta).items():
            units = [fit.units[i] for i in idx]
            heads = torch.tensor([u.head for u in units])
            left = torch.stack([u.left for u in units])  # OV [n, d_h, r]; QK [n, d, r]
            right = torch.stack([u.right for u in units])  # OV [n, d, r]; QK [n, d_h, r]
            rows = torch.tensor(idx)
            theta, coupling = self.theta, self.coupling

            if circuit == "ov":
                def hook(module, args, output, heads=heads, left=left, right=right, rows=rows, theta=theta, coupling=coupling):
                    x = args[0]
                    c, g = fit.core(theta, coupling, rows)  # [n, r], [n, r, r] or None
                    xh = x.reshape(*x.shape[:-1], H, dh)[..., heads, :].to(torch.float32)  # [B, T, n, d_h]
                    z = _mix(torch.einsum("btnd,ndr->btnr", xh, left.to(x.device)), c, g)
                    return output + torch.einsum("btnr,nmr->btm", z, right.to(x.device)).to(output.dtype)

                module = L.out_module(layer)
            else:
                cols = torch.cat([torch.arange(L.head_offset("q", int(h)), L.head_offset("q", int(h)) + dh) for h in heads])

                def hook(module, args, output, left=left, right=right, rows=rows, cols=cols, theta=theta, coupling=coupling):
                    x = args[0].to(torch.float32)
                    c, g = fit.core(theta, coupling, rows)
                    z = _mix(torch.einsum("btd,ndr->btnr", x, left.to(x.device)), c, g)
                    add = torch.einsum("btnr,nkr->btnk", z, right.to(x.device)).reshape(*x.shape[:-1], -1)
                    return output.index_add(-1, cols.to(output.device), add.to(output.dtype))

                module = L.module(layer, L.spec.q)
            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


