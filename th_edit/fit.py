"""Fit an edit of communication channels: one learnable log-scale per singular component.

The greedy :func:`th_edit.discovery.search_edit` tries a handful of components at a few fixed scales.
:func:`fit_edit` instead learns a scale ``alpha_i = exp(theta_i)`` for every singular component of the
chosen heads' circuits (OV by default, QK optional), by gradient descent on

    loss = CE(target among the listed items, at the answer position)
           + guard_weight * KL(unedited || edited) on neutral text   (the guard, th_edit.guard_text)
           + l1_weight * sum_i |theta_i|,

then keeps the ``k`` largest ``|theta_i|`` (``k`` up to ``budget``), refits only those, and picks ``k`` and
the term weights on ``dev`` (the best dev accuracy whose guard change stays within
``max_guard_change``). The result is applied as ordinary :class:`th_edit.plan.Edit` s, one per head and
circuit with per-component ``alphas``, so undo/reset, plans, ``from_plan`` and model cards work unchanged.

Exactness. ``scale_component`` changes the OV circuit by ``(alpha - 1) s_i u_i v_i^T`` and writes it into
``W_O[h]`` as ``pinv(W_V^f) u_i (alpha - 1) s_i v_i^T`` (:func:`th_edit.linalg.ov_edit_factors`). With all
components at once the change is ``P diag(exp(theta) - 1) V^T``, ``P = pinv(W_V^f) U diag(S)``,
precomputed per head: differentiable in ``theta`` and exact. During fitting it is added by a forward
hook on the output projection (``x_h @ Delta W_O[h]`` for each fitted head ``h``), so the model's
parameters are never written and keep ``requires_grad=False``. QK likewise through ``W_Q[h]``
(:func:`th_edit.linalg.qk_edit_factors`, a hook on the query projection). Key/value weights, shared
under grouped-query attention, are never touched.

Speed. Layers below the lowest fitted layer compute the same thing on every step: their output is
cached once per batch (:mod:`th_edit.layer_cache`) and neither run again nor differentiated. Only the
answer position's logits are computed for the task loss (``logits_to_keep``).

>>> result = fit_edit(editor, tokenizer, data["train"], data["dev"], FitConfig(budget=256))  # doctest: +SKIP
>>> result.dev_before, result.dev_after, result.guard_change                               # doctest: +SKIP
>>> editor.export_plan().save("plan")                                                       # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pandas as pd
import torch

from . import linalg
from .data import first_token
from .errors import FitError, FitInterruptedError, InvalidArgumentError
from .evaluate import guard_loss, input_device, pad_sequences, pad_token_id
from .guard_text import GUARD_TEXTS
from .layer_cache import LayerCache
from .plan import Edit
from .progress import progress_bar

__all__ = ["FitConfig", "FitResult", "fit_edit", "resolve_heads", "ChannelFit"]

logger = logging.getLogger("th_edit")


@dataclass
class FitConfig:
    """Settings of :func:`fit_edit` (every field has a default; JSON round trip with
    :meth:`to_dict` / :meth:`from_dict`)."""

    heads: Any = "all"
    """``"all"``, ``"discovered"`` (mover, inhibition and duplicate heads of ``find_channels``) or a list
    of ``(layer, head)`` pairs."""
    circuits: tuple[str, ...] = ("ov",)
    """Circuits whose components get a scale: ``("ov",)``, ``("qk",)`` or both."""
    budget: int = 256
    """Most components the final edit may change."""
    k_fractions: tuple[float, ...] = (1.0, 0.5, 0.25)
    """Numbers of kept components tried on dev, as fractions of ``budget``."""
    guard_weights: tuple[float, ...] = (1.0,)
    """Weights of the guard KL term tried on dev."""
    l1_weights: tuple[float, ...] = (1e-4,)
    """Weights of the L1 penalty on the log-scales (summed over components) tried on dev."""
    steps: int = 12
    """Adam steps of the dense fit (every component of the chosen heads)."""
    refit_steps: int = 10
    """Adam steps of each refit of the kept components."""
    rounds: int = 1
    """Prune-and-refit rounds: each keeps 4x fewer components than the last, ending at ``k``."""
    lr: float = 0.05
    """Adam learning rate of the dense fit (Adam moves every log-scale by about ``lr`` per step, so keep it
    small when thousands of components are fitted at once)."""
    refit_lr: float = 0.1
    """Adam learning rate of the refits of the kept components."""
    batch_size: int = 8
    """Training prompts per step (cycled through ``train`` in a seeded order)."""
    guard_tokens: int = 32
    """Tokens of each guard paragraph used in the KL term while fitting."""
    guard_texts_per_step: int = 4
    """Guard paragraphs per step (rotating through all of them)."""
    rank_by: str = "attribution"
    """How the kept components are chosen from the dense fit: ``"attribution"`` (``|theta * dCE/dtheta|`` at
    the dense solution over the training set: the first-order task-loss increase of resetting the
    component), ``"effect"`` (``|alpha - 1| * s``, the size of the change) or ``"log_scale"`` (``|theta|``;
    Adam moves every log-scale by about the same amount, so this ranks poorly after a short fit)."""
    max_log_scale: float = 3.0
    """Bound on ``|theta|`` (scales between ``exp(-3)`` and ``exp(3)``)."""
    max_guard_change: float = 0.01
    """Largest relative guard-loss increase a dev candidate may have to be chosen."""
    folded: bool | None = None
    """Components of the folded (norm folded in) or raw circuits; None: the editor's default."""
    seed: int = 0
    """Seed of the training order (the fit is deterministic for a seed)."""
    cache_bytes: int = 1 << 30
    """Memory bound of the layer cache; batches beyond it are recomputed."""
    progress: bool = True
    """Show a progress bar (loss, train and dev accuracy)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["heads"], (list, tuple)):
            d["heads"] = [list(h) for h in d["heads"]]
        for k in ("circuits", "k_fractions", "guard_weights", "l1_weights"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"unknown FitConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        d = dict(data)
        if isinstance(d.get("heads"), list):
            d["heads"] = [tuple(int(x) for x in h) for h in d["heads"]]
        for k in ("circuits", "k_fractions", "guard_weights", "l1_weights"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class FitResult:
    """What :func:`fit_edit` found and applied.

    Attributes:
        edits: the applied :class:`Edit` s (one per head and circuit; per-component ``alphas``).
        components: one row per changed component: layer, head, circuit, component, singular value,
            log_scale, alpha.
        dev_before, dev_after: dev accuracy by list length (and ``"all"``) before/after.
        guard_before, guard_after: :func:`th_edit.evaluate.guard_loss` before/after.
        test_before, test_after: test accuracy by length (only when ``test`` was given).
        trials: every dev candidate (guard and L1 weight, k, dev accuracy, guard change, chosen).
        dense: the dense fit's log-scales per unit, ``{(layer, head, circuit): tensor [d_h]}``.
        config: the :class:`FitConfig`. fit_data: description of the training data.
        timings: seconds per phase. heads: the fitted heads.
    """

    edits: list[Edit]
    components: pd.DataFrame
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    guard_before: float
    guard_after: float
    trials: pd.DataFrame
    dense: dict[tuple[int, int, str], torch.Tensor]
    config: FitConfig
    fit_data: dict[str, Any]
    timings: dict[str, float]
    heads: list[tuple[int, int]]
    test_before: dict[str, float] | None = None
    test_after: dict[str, float] | None = None
    plan: Any = None

    @property
    def guard_change(self) -> float:
        """Relative change of the guard loss (0.01 = 1% worse)."""
        return self.guard_after / self.guard_before - 1.0

    @property
    def n_components(self) -> int:
        return len(self.components)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for reports and model cards)."""
        return {
            "n_components": self.n_components, "n_edits": len(self.edits), "heads": [list(h) for h in self.heads],
            "dev_before": self.dev_before, "dev_after": self.dev_after, "test_before": self.test_before,
            "test_after": self.test_after, "guard_before": self.guard_before, "guard_after": self.guard_after,
            "guard_change": self.guard_change, "fit_data": self.fit_data, "timings": self.timings,
            "config": self.config.to_dict(),
        }


# ----- heads --------------------------------------------------------------------------------------
def resolve_heads(editor, spec: Any, *, findings=None, tokenizer=None, train=None) -> list[tuple[int, int]]:
    """The ``(layer, head)`` list of a head spec: ``"all"``, ``"discovered"`` or explicit pairs."""
    if isinstance(spec, str):
        if spec == "all":
            return [(l, h) for l in range(editor.n_layers) for h in range(editor.n_heads)]
        if spec == "discovered":
            if findings is None:
                from .discovery import find_channels

                findings = find_channels(editor, tokenizer, train, progress=False)
            heads = list(findings.meta.get("movers", [])) + list(findings.inhibition_heads)
            ch = findings.channels
            dup = ch[(ch.kind == "duplicate") & ~ch.control.astype(bool)]
            heads += [(int(r.sender_layer), int(r.sender_head)) for r in dup.itertuples()]
            return sorted({(int(l), int(h)) for l, h in heads})
        raise InvalidArgumentError(
            f"heads={spec!r} is not a head spec: use 'all', 'discovered' or a list of (layer, head) pairs."
        )
    try:
        heads = sorted({(int(l), int(h)) for l, h in spec})
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"heads={spec!r} is not a head spec: use 'all', 'discovered' or a list of (layer, head) pairs."
        ) from exc
    if not heads:
        raise InvalidArgumentError("heads=[] names no head: give at least one (layer, head) pair.")
    for l, h in heads:
        editor.layout.check(l, h)
    return heads


# ----- data ---------------------------------------------------------------------------------------
def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class _TaskBatch:
    index: int  # in the layer cache
    last: torch.Tensor  # [B] answer position
    cand: torch.Tensor  # [B, N] candidate first tokens (padded)
    cand_ok: torch.Tensor  # [B, N] bool
    target: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B] list lengths
    rows: list[int]  # example indices


def _rows(dataset, what: str) -> list[dict[str, Any]]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    missing = {"prompt", "items", "target"} - set(rows[0]) if rows else set()
    if missing:
        raise InvalidArgumentError(f"{what} rows lack {sorted(missing)}; build them with th_edit.data.")
    return rows


def _task_batches(cache: LayerCache, tokenizer, rows, batch_size: int, device) -> list[_TaskBatch]:
    seqs = tokenizer([r["prompt"] for r in rows])["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: (len(seqs[i]), i))
    pad = pad_token_id(tokenizer)
    tok_of: dict[str, int] = {}
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
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
        out.append(_TaskBatch(k, mask.sum(1) - 1, cand, ok, target,
                              torch.tensor([len(rows[i]["items"]) for i in idx]), idx))
    return out


# ----- the differentiable edit ---------------------------------------------------------------------
@dataclass
class _Unit:
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
    contribute exactly nothing). Inside ``with fit.hooks():`` the model computes as if the edit
    ``alpha = exp(theta)`` were written into its weights; nothing is written.
    """

    def __init__(self, editor, heads: list[tuple[int, int]], circuits: Sequence[str], folded: bool) -> None:
        self.editor, self.folded = editor, folded
        self.units: list[_Unit] = []
        layers = sorted({l for l, _ in heads})
        for circuit in circuits:
            # one batched factored SVD per circuit over the layers involved (as editor.svd, per head)
            A_all, B_all = editor.stacked_factors(circuit, folded=folded, layers=layers)
            U_all, S_all, V_all = linalg.factored_svd(A_all, B_all)
            for layer, head in heads:
                li = layers.index(layer)
                A, B = A_all[li, head], B_all[li, head]
                U, S, V = U_all[li, head], S_all[li, head], V_all[li, head]
                if circuit == "ov":
                    left, right = linalg.ov_edit_factors(A, U, S, V)
                else:
                    w = editor.head_weights(layer, head)
                    left, right = linalg.qk_edit_factors(w.W_Q, A, B, U, S, V, q_gain=w.q_gain if folded else None)
                self.units.append(_Unit(layer, head, circuit, S, left, right, U, V, A, B))
        r = editor.d_head
        self.theta = torch.zeros(len(self.units), r, dtype=torch.float32)
        self.mask = torch.ones(len(self.units), r, dtype=torch.float32)

    def copy(self) -> "ChannelFit":
        """A copy sharing the precomputed factors, with its own ``theta`` and ``mask``."""
        new = ChannelFit.__new__(ChannelFit)
        new.__dict__.update(self.__dict__)
        new.theta, new.mask = self.theta.clone(), self.mask.clone()
        return new

    @property
    def n_active(self) -> int:
        return int(self.mask.sum())

    def first_layer(self) -> int:
        active = [u.layer for u, m in zip(self.units, self.mask) if m.any()]
        return min(active) if active else self.editor.n_layers - 1

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

    def _hook_groups(self, theta: torch.Tensor):
        """Per (layer, circuit): unit indices with an active component."""
        groups: dict[tuple[int, str], list[int]] = {}
        for i, u in enumerate(self.units):
            if self.mask[i].any():
                groups.setdefault((u.layer, u.circuit), []).append(i)
        return groups

    def hooks(self, theta: torch.Tensor | None = None):
        """Context manager installing the hooks; ``theta`` (default :attr:`theta`) may require grad."""
        return _Hooks(self, self.theta if theta is None else theta)

    def edits(self) -> list[Edit]:
        """The fitted change as ordinary :class:`Edit` s (one per unit with active components), with
        the factors :meth:`ChannelEditor.scale_component` would compute for these scales."""
        out = []
        for i, u in enumerate(self.units):
            idx = torch.nonzero(self.mask[i]).flatten()
            if idx.numel() == 0:
                continue
            alphas = torch.exp(self.theta[i, idx].double())
            coeff = (alphas - 1.0) * u.S[idx].double()
            if u.circuit == "ov":
                left, right = linalg.ov_edit_factors(u.A, u.U[:, idx], coeff, u.V[:, idx])
            else:
                w = self.editor.head_weights(u.layer, u.head)
                left, right = linalg.qk_edit_factors(w.W_Q, u.A, u.B, u.U[:, idx], coeff, u.V[:, idx],
                                                     q_gain=w.q_gain if self.folded else None)
            out.append(Edit(
                layer=u.layer, head=u.head, circuit=u.circuit, components=tuple(int(c) for c in idx.tolist()),
                alpha=1.0, folded=self.folded, singular_values=tuple(float(s) for s in u.S[idx].tolist()),
                left=left.cpu(), right=right.cpu(), alphas=tuple(float(a) for a in alphas.tolist()),
            ))
        return out

    def component_table(self) -> pd.DataFrame:
        rows = []
        for i, u in enumerate(self.units):
            for c in torch.nonzero(self.mask[i]).flatten().tolist():
                t = float(self.theta[i, c])
                rows.append({"layer": u.layer, "head": u.head, "circuit": u.circuit, "component": c,
                             "singular_value": float(u.S[c]), "log_scale": t, "alpha": math.exp(t)})
        return pd.DataFrame(rows, columns=["layer", "head", "circuit", "component", "singular_value", "log_scale", "alpha"])


class _Hooks:
    def __init__(self, fit: ChannelFit, theta: torch.Tensor) -> None:
        self.fit, self.theta, self.handles = fit, theta, []

    def __enter__(self):
        fit, L = self.fit, self.fit.editor.layout
        dh, H = L.d_head, L.n_heads
        for (layer, circuit), idx in fit._hook_groups(self.theta).items():
            units = [fit.units[i] for i in idx]
            heads = torch.tensor([u.head for u in units])
            left = torch.stack([u.left for u in units])  # OV [n, d_h, r]; QK [n, d, r]
            right = torch.stack([u.right for u in units])  # OV [n, d, r]; QK [n, d_h, r]
            rows = torch.tensor(idx)
            theta, mask = self.theta, fit.mask

            if circuit == "ov":
                def hook(module, args, output, heads=heads, left=left, right=right, rows=rows):
                    x = args[0]
                    c = (torch.exp(theta[rows]) - 1.0) * mask[rows]  # [n, r]
                    xh = x.reshape(*x.shape[:-1], H, dh)[..., heads, :].to(torch.float32)  # [B, T, n, d_h]
                    z = torch.einsum("btnd,ndr->btnr", xh, left.to(x.device)) * c.to(x.device)
                    return output + torch.einsum("btnr,nmr->btm", z, right.to(x.device)).to(output.dtype)

                module = L.module(layer, L.spec.o)
            else:
                cols = torch.cat([torch.arange(L._offset("q", int(h)), L._offset("q", int(h)) + dh) for h in heads])

                def hook(module, args, output, left=left, right=right, rows=rows, cols=cols):
                    x = args[0].to(torch.float32)
                    c = (torch.exp(theta[rows]) - 1.0) * mask[rows]
                    z = torch.einsum("btd,ndr->btnr", x, left.to(x.device)) * c.to(x.device)
                    add = torch.einsum("btnr,nkr->btnk", z, right.to(x.device)).reshape(*x.shape[:-1], -1)
                    return output.index_add(-1, cols.to(output.device), add.to(output.dtype))

                module = L.module(layer, L.spec.q)
            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----- the fitting loop ---------------------------------------------------------------------------
class _Problem:
    """Training, dev and guard data prepared for one model (tokenised, cached from a first layer)."""

    def __init__(self, editor, tokenizer, train_rows, dev_rows, config: FitConfig) -> None:
        self.editor, self.tokenizer, self.config = editor, tokenizer, config
        self.model = editor.model
        self.device = input_device(self.model)
        self.keep = _accepts_logits_to_keep(self.model)
        self.train_rows, self.dev_rows = train_rows, dev_rows
        ids = [tokenizer(t)["input_ids"][: config.guard_tokens] for t in GUARD_TEXTS]
        self.guard_ids, self.guard_mask = pad_sequences(ids, pad_token_id(tokenizer), "right")
        self._caches: dict[int, tuple[LayerCache, list[_TaskBatch], list[_TaskBatch], list[int]]] = {}
        with torch.no_grad():
            out = self.model(input_ids=self.guard_ids.to(self.device), attention_mask=self.guard_mask.to(self.device),
                             use_cache=False)
            self.guard_ref = out.logits[:, :-1].float().log_softmax(-1).cpu()  # [G, T-1, V]
        self.guard_valid = (self.guard_mask[:, 1:] * self.guard_mask[:, :-1]).bool()

    def data_from(self, layer: int):
        """(cache, train batches, dev batches, guard batch indices) cached from ``layer``."""
        if layer not in self._caches:
            cache = LayerCache(self.model, self.editor.layout, layer, max_bytes=self.config.cache_bytes)
            train = _task_batches(cache, self.tokenizer, self.train_rows, self.config.batch_size, self.device)
            dev = _task_batches(cache, self.tokenizer, self.dev_rows, 32, self.device)
            g = self.config.guard_texts_per_step
            guard = []
            for s in range(0, len(self.guard_ids), g):
                guard.append(cache.add(input_ids=self.guard_ids[s:s + g].to(self.device),
                                       attention_mask=self.guard_mask[s:s + g].to(self.device)))
            while len(self._caches) >= 3:  # keep the three most recent caches (memory)
                self._caches.pop(next(iter(self._caches)))
            self._caches[layer] = (cache, train, dev, guard)
        return self._caches[layer]

    def candidate_logits(self, cache: LayerCache, b: _TaskBatch) -> torch.Tensor:
        """``[B, N]`` float32 logits of the candidates at the answer position (pads: -inf)."""
        if self.keep:
            logits = cache.forward(b.index, logits_to_keep=b.last[:, None].to(self.device)).logits[:, 0]
        else:
            logits = cache.forward(b.index).logits[torch.arange(len(b.last)), b.last.to(self.device)]
        cl = logits.float().cpu().gather(1, b.cand)
        return cl.masked_fill(~b.cand_ok, float("-inf"))

    def guard_kl(self, cache: LayerCache, index: int, start: int) -> torch.Tensor:
        out = cache.forward(index).logits[:, :-1].float().cpu().log_softmax(-1)
        n = out.shape[0]
        ref = self.guard_ref[start:start + n]
        valid = self.guard_valid[start:start + n]
        kl = (ref.exp() * (ref - out)).sum(-1)
        return kl[valid].mean()

    @torch.no_grad()
    def dev_accuracy(self, fit: ChannelFit | None) -> dict[str, float]:
        layer = fit.first_layer() if fit is not None else self.editor.n_layers - 1
        cache, _, dev, _ = self.data_from(layer)
        correct, lengths = [], []
        ctx = fit.hooks() if fit is not None else _Null()
        with ctx:
            for b in dev:
                cl = self.candidate_logits(cache, b)
                correct.append(cl.argmax(1) == b.target)
                lengths.append(b.lengths)
        correct, lengths = torch.cat(correct), torch.cat(lengths)
        out = {"all": float(correct.float().mean())}
        for n in sorted(set(lengths.tolist())):
            out[str(n)] = float(correct[lengths == n].float().mean())
        return out

    @torch.no_grad()
    def guard(self, fit: ChannelFit | None) -> float:
        ctx = fit.hooks() if fit is not None else _Null()
        with ctx:
            return guard_loss(self.model, self.tokenizer)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _train(problem: _Problem, fit: ChannelFit, steps: int, guard_weight: float, l1_weight: float, *,
           seed: int, bar, phase: str, lr: float) -> list[float]:
    """Adam on ``fit.theta`` (active entries) for ``steps`` steps; returns the losses."""
    cfg = problem.config
    cache, train, _, guard = problem.data_from(fit.first_layer())
    theta = fit.theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    order: list[int] = []
    rng = random.Random(seed)
    losses = []
    g_per = cfg.guard_texts_per_step
    for step in range(steps):
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        b = train[order.pop()]
        opt.zero_grad(set_to_none=True)
        with fit.hooks(theta):
            cl = problem.candidate_logits(cache, b)
            ce = torch.nn.functional.cross_entropy(cl, b.target)
            gi = step % len(guard)
            kl = problem.guard_kl(cache, guard[gi], gi * g_per) if guard_weight > 0 else torch.zeros(())
        loss = ce + guard_weight * kl + l1_weight * (theta * fit.mask).abs().sum()
        if not torch.isfinite(loss):
            raise FitError(
                f"the {phase} loss became non-finite at step {step + 1} (ce={float(ce):.4g}, kl={float(kl):.4g}); "
                "the model was left unchanged. Lower FitConfig.lr or max_log_scale, or raise guard_weights."
            )
        loss.backward()
        theta.grad.mul_(fit.mask)
        opt.step()
        with torch.no_grad():
            theta.clamp_(-cfg.max_log_scale, cfg.max_log_scale)
            theta.mul_(fit.mask)
        loss = loss.detach()
        losses.append(float(loss))
        logger.debug("%s step %d/%d: loss %.4f (ce %.4f, kl %.5f)", phase, step + 1, steps, float(loss),
                     float(ce.detach()), float(kl.detach()))
        acc = float((cl.argmax(1) == b.target).float().mean())
        bar.set_postfix_str(f"{phase} loss={float(loss):.3f} ce={float(ce.detach()):.3f} kl={float(kl.detach()):.4f} train_acc={acc:.2f}")
        bar.update(1)
    fit.theta = theta.detach().clone()
    return losses


def _attribution(problem: _Problem, fit: ChannelFit) -> torch.Tensor:
    """``|theta * dCE/dtheta|`` summed over the training batches, at the current log-scales."""
    cache, train, _, _ = problem.data_from(fit.first_layer())
    theta = fit.theta.clone().requires_grad_(True)
    total = torch.zeros_like(fit.theta)
    for b in train:
        with fit.hooks(theta):
            ce = torch.nn.functional.cross_entropy(problem.candidate_logits(cache, b), b.target, reduction="sum")
        (g,) = torch.autograd.grad(ce, theta)
        total += g
    return (fit.theta * total).abs() * fit.mask


def _k_values(config: FitConfig, n_total: int) -> list[int]:
    ks = {max(1, min(n_total, int(round(f * config.budget)))) for f in config.k_fractions}
    return sorted(ks, reverse=True)


def _check(editor, train_rows, dev_rows, config: FitConfig) -> None:
    if len(train_rows) < 2:
        raise InvalidArgumentError(
            f"the train split has {len(train_rows)} example(s); fitting needs at least 2 (use 16 or more)."
        )
    if len(dev_rows) < 1:
        raise InvalidArgumentError("the dev split is empty; k and the term weights are chosen on dev, so give some.")
    if isinstance(config.budget, bool) or not isinstance(config.budget, int) or config.budget < 1:
        raise InvalidArgumentError(f"budget={config.budget!r} must be an integer >= 1 (components to keep).")
    for c in config.circuits:
        if c not in ("ov", "qk"):
            raise InvalidArgumentError(f"circuit {c!r} is not one of ('ov', 'qk').")
    if not config.circuits:
        raise InvalidArgumentError("circuits=() names no circuit: use ('ov',), ('qk',) or both.")
    for name in ("steps", "refit_steps", "rounds", "batch_size", "guard_tokens", "guard_texts_per_step"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < (0 if name == "refit_steps" else 1):
            raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive integer.")
    for name in ("lr", "refit_lr"):
        v = getattr(config, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InvalidArgumentError(f"FitConfig.{name}={v!r} must be a positive finite number.")
    if config.rank_by not in ("attribution", "effect", "log_scale"):
        raise InvalidArgumentError(
            f"FitConfig.rank_by={config.rank_by!r} must be 'attribution', 'effect' or 'log_scale'.")
    if not config.k_fractions or not config.guard_weights or not config.l1_weights:
        raise InvalidArgumentError("k_fractions, guard_weights and l1_weights each need at least one value.")


def _state_fingerprint(model) -> list[tuple[str, bool]]:
    return [(n, p.requires_grad) for n, p in model.named_parameters()]


def fit_edit(editor, tokenizer, train, dev, config: FitConfig | None = None, *, test=None, findings=None,
             dense_from: FitResult | None = None, **overrides: Any) -> FitResult:
    """Fit per-component scales on ``train``, choose ``k`` and the term weights on ``dev``, apply the edit.

    Args:
        editor: a :class:`th_edit.ChannelEditor`; the chosen edits are applied to it (``editor.reset()``
            or ``undo()`` removes them).
        tokenizer: the model's tokenizer.
        train, dev: Laundry List splits (rows with ``prompt``, ``items``, ``target``; see :mod:`th_edit.data`).
        config: a :class:`FitConfig`; keyword ``overrides`` replace its fields (``budget=64``...).
        test: optional split evaluated once, before and after, for the report and the model card
            (never used to choose anything).
        findings: :class:`th_edit.discovery.ChannelFindings` for ``heads="discovered"`` (computed on
            ``train`` when omitted).
        dense_from: a previous :class:`FitResult` on the same heads and circuits whose dense fit is
            reused (its log-scales start every setting's prune-and-refit; the dense phase is skipped),
            e.g. to try several budgets without refitting the dense model.

    Returns:
        :class:`FitResult`; ``editor.evaluation`` is filled for the model card.

    Raises:
        InvalidArgumentError: bad splits, budget, circuits or head spec (nothing changed).
        FitError: the loss became non-finite (nothing changed).
        FitInterruptedError: Ctrl-C while fitting (nothing changed; also a ``KeyboardInterrupt``).
    """
    config = FitConfig() if config is None else config
    if overrides:
        config = FitConfig.from_dict({**config.to_dict(), **overrides})
    train_rows, dev_rows = _rows(train, "train"), _rows(dev, "dev")
    _check(editor, train_rows, dev_rows, config)
    heads = resolve_heads(editor, config.heads, findings=findings, tokenizer=tokenizer, train=train)
    if dense_from is not None:
        missing = {(l, h, c) for c in config.circuits for l, h in heads} - set(dense_from.dense)
        if missing:
            raise InvalidArgumentError(
                f"dense_from has no dense fit for {len(missing)} of the chosen head circuits (e.g. {sorted(missing)[0]}); "
                "pass a result fitted on the same heads and circuits, or dense_from=None."
            )
    folded = editor.folded if config.folded is None else bool(config.folded)
    model = editor.model
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    grad_flags = _state_fingerprint(model)
    was_training = model.training
    n_applied = 0
    test_before = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        if test is not None:
            from .evaluate import evaluate

            test_before = evaluate(model, tokenizer, test, progress=False).accuracy_by_length()
        torch.manual_seed(config.seed)
        problem = _Problem(editor, tokenizer, train_rows, dev_rows, config)
        logger.debug("setup: guard reference after %.1f s", time.perf_counter() - t0)
        base = ChannelFit(editor, heads, config.circuits, folded)
        logger.debug("setup: factors of %d head circuits after %.1f s", len(base.units), time.perf_counter() - t0)
        n_total = base.n_active
        ks = _k_values(config, n_total)
        dev_before = problem.dev_accuracy(None)
        logger.debug("setup: dev baseline after %.1f s", time.perf_counter() - t0)
        guard_before = problem.guard(None)
        logger.debug("setup: guard baseline after %.1f s", time.perf_counter() - t0)
        timings["setup"] = time.perf_counter() - t0
        n_settings = len(config.guard_weights) * len(config.l1_weights)
        refits = sum(config.rounds for k in ks if k < n_total)
        total = n_settings * (config.steps + refits * config.refit_steps)
        trials, dense, best = [], {}, None
        with progress_bar(total=total, desc="fitting channel scales", enabled=config.progress) as bar:
            for gw in config.guard_weights:
                for l1 in config.l1_weights:
                    fit = base.copy()
                    t1 = time.perf_counter()
                    if dense_from is not None:
                        fit.theta = torch.stack([dense_from.dense[(u.layer, u.head, u.circuit)] for u in fit.units])
                        bar.update(config.steps)
                    else:
                        _train(problem, fit, config.steps, gw, l1, seed=config.seed, bar=bar, phase="dense", lr=config.lr)
                    timings.setdefault("dense_fit", 0.0)
                    timings["dense_fit"] += time.perf_counter() - t1
                    if not dense:
                        dense = {(u.layer, u.head, u.circuit): fit.theta[i].clone() for i, u in enumerate(fit.units)}
                    dense_theta = fit.theta.clone()
                    importance = None
                    if config.rank_by == "attribution" and any(k < n_total for k in ks):
                        t1 = time.perf_counter()
                        importance = _attribution(problem, fit)
                        timings["attribution"] = timings.get("attribution", 0.0) + time.perf_counter() - t1
                    for k in ks:
                        cand = base.copy()
                        cand.theta = dense_theta.clone()
                        t1 = time.perf_counter()
                        if k < n_total:
                            sizes = [min(n_total, k * 4 ** (config.rounds - 1 - r)) for r in range(config.rounds)]
                            for r_, size in enumerate(sizes):
                                cand.keep_top(size, by=config.rank_by if r_ == 0 or config.rank_by != "attribution"
                                              else "effect", importance=importance)
                                _train(problem, cand, config.refit_steps, gw, l1, seed=config.seed + 1, bar=bar,
                                       phase=f"refit k={size}", lr=config.refit_lr)
                        timings.setdefault("refit", 0.0)
                        timings["refit"] += time.perf_counter() - t1
                        t1 = time.perf_counter()
                        acc = problem.dev_accuracy(cand)
                        g = problem.guard(cand)
                        timings.setdefault("dev_selection", 0.0)
                        timings["dev_selection"] += time.perf_counter() - t1
                        row = {"guard_weight": gw, "l1_weight": l1, "k": cand.n_active, "dev_accuracy": acc["all"],
                               "guard_change": g / guard_before - 1.0, "chosen": False,
                               **{f"dev_{n}": v for n, v in acc.items() if n != "all"}}
                        trials.append(row)
                        bar.set_postfix_str(f"k={cand.n_active} dev_acc={acc['all']:.3f} guard={row['guard_change']:+.2%}")
                        ok = row["guard_change"] <= config.max_guard_change
                        key = (ok, acc["all"] if ok else -row["guard_change"], -cand.n_active)
                        if best is None or key > best[0]:
                            best = (key, cand, acc, g, len(trials) - 1)
        _, chosen, dev_after, guard_after, ti = best
        trials[ti]["chosen"] = True
        if not best[0][0]:
            logger.warning("no dev candidate kept the guard change within %.2g; chose the one with the smallest "
                           "guard change (%+.2f%%)", config.max_guard_change, 100 * (guard_after / guard_before - 1.0))
        edits = chosen.edits()
        for e in edits:
            editor.apply_edit(e)
            n_applied += 1
    except KeyboardInterrupt as exc:
        for _ in range(n_applied):
            editor.undo()
        raise FitInterruptedError("fitting was interrupted; the model was left exactly as it was.") from exc
    except BaseException:
        for _ in range(n_applied):
            editor.undo()
        raise
    finally:
        for (name, flag), (_, p) in zip(grad_flags, model.named_parameters()):
            p.requires_grad_(flag)
        model.train(was_training)
    timings["total_fit"] = time.perf_counter() - t0
    test_after = None
    if test is not None:
        from .evaluate import evaluate

        test_after = evaluate(model, tokenizer, test, progress=False).accuracy_by_length()
    fit_data = {
        "n_train": len(train_rows), "n_dev": len(dev_rows),
        "train_lengths": sorted({int(r.get("list_length", len(r["items"]))) for r in train_rows}),
        "train_templates": sorted({str(r.get("template", "")) for r in train_rows}),
        "train_items": len({w for r in train_rows for w in r["items"]}),
    }
    result = FitResult(
        edits=edits, components=chosen.component_table(), dev_before=dev_before, dev_after=dev_after,
        guard_before=guard_before, guard_after=guard_after, trials=pd.DataFrame(trials), dense=dense, config=config,
        fit_data=fit_data, timings=timings, heads=heads,
        test_before={str(k): v for k, v in test_before.items()} if test_before else None,
        test_after={str(k): v for k, v in test_after.items()} if test_after else None,
    )
    result.plan = editor.export_plan()
    split, before, after = (("test", test_before, test_after) if test is not None
                            else ("dev", {int(k): v for k, v in dev_before.items() if k != "all"},
                                  {int(k): v for k, v in dev_after.items() if k != "all"}))
    editor.evaluation = {
        "before": before, "after": after,
        "note": (f"Accuracy on the {split} split by list length, before and after a fitted edit of "
                 f"{result.n_components} singular components in {len(edits)} head circuits (th_edit.fit, "
                 f"budget {config.budget}, heads {config.heads if isinstance(config.heads, str) else len(heads)}). "
                 f"Fitted on {fit_data['n_train']} prompts (templates {', '.join(fit_data['train_templates'])}; "
                 f"lengths {fit_data['train_lengths']}); k and term weights chosen on {fit_data['n_dev']} dev prompts "
                 f"(dev accuracy {dev_before['all']:.3f} -> {dev_after['all']:.3f}). Guard loss on neutral text "
                 f"{guard_before:.4f} -> {guard_after:.4f} ({result.guard_change:+.2%})."),
    }
    logger.info("fitted %d components in %.1f s: dev %.3f -> %.3f, guard %+.2f%%", result.n_components,
                timings["total_fit"], dev_before["all"], dev_after["all"], 100 * result.guard_change)
    return result
