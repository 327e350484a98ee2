"""ChannelEditor: per-head circuits, their SVD, and exact in-place rescaling of singular components.

It joins the pure maths of :mod:`th_edit.linalg` with the architecture table of
:mod:`th_edit.architectures`. Circuits follow ``method.md``: ``OV = W_V W_O`` and ``QK = W_Q W_K^T``
per head, folded by default (the block's input normalisation's linear part ``N`` on the read side:
``W_Q^f = N W_Q``, ``W_K^f = N W_K``, ``W_V^f = N W_V``; per-head q/k-norm gains folded too).

Edits write only the edited head's ``W_O[h]`` (OV) or ``W_Q[h]`` (QK), in the model's dtype, with the
maths in float32/float64; key/value weights shared under GQA are never touched. Every edit is logged with
the exact values it overwrote, so :meth:`ChannelEditor.undo` and :meth:`ChannelEditor.reset` restore
the original tensors bit for bit.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from . import channels, linalg
from .architectures import ArchSpec, AttentionLayout
from .errors import InvalidArgumentError, NothingToUndoError
from .plan import Edit
from .sharing import SharingMixin

__all__ = ["ChannelEditor", "HeadWeights", "SVDResult", "CIRCUITS"]

logger = logging.getLogger("th_edit")

CIRCUITS = ("ov", "qk")


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


def _receiver_side(mode: str, ov: SVDResult | None, qk: SVDResult | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(singular values, read directions)`` of a receiver for a composition mode: Q reads along the
    U of its QK circuit, K along the V of its QK circuit, V along the U of its OV circuit."""
    if mode == "q":
        return qk.S, qk.U
    if mode == "k":
        return qk.S, qk.V
    return ov.S, ov.U


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).clone()


class ChannelEditor(SharingMixin):
    """Read, decompose and rescale the attention circuits of a transformers causal LM in place.

    Args:
        model: a causal LM from ``AutoModelForCausalLM.from_pretrained`` (or ``from_config``) whose
            ``config.model_type`` is in :data:`th_edit.ARCHITECTURES`; it may be dispatched with
            accelerate's ``device_map``.
        spec: an :class:`ArchSpec` overriding the table (for an architecture th_edit does not know).
        folded: default for every ``folded=`` argument: fold the input norm into circuits (True) or
            use the raw weights (False).
        tokenizer: saved and pushed with the model by :meth:`save_pretrained` / :meth:`push_to_hub`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100))
        >>> editor = ChannelEditor(model)
        >>> U, S, V = editor.svd(layer=1, head=2, circuit="ov")
        >>> U.shape, S.shape
        (torch.Size([64, 16]), torch.Size([16]))
        >>> edit = editor.scale_component(layer=1, head=2, circuit="ov", component=0, alpha=0.0)
        >>> editor.undo() is edit
        True
    """

    def __init__(
        self, model: nn.Module, *, spec: ArchSpec | None = None, folded: bool = True, tokenizer: Any = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: channel evidence and before/after evaluation recorded for the model card (see th_edit.cards)
        self.evidence: list[dict[str, Any]] = []
        self.evaluation: dict[str, Any] | None = None
        self.layout = AttentionLayout(model, spec)
        self.folded = bool(folded)
        self._log: list[tuple[Edit, torch.Tensor]] = []
        self._fingerprints: dict[str, str] = {}

    # ----- geometry -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def n_heads(self) -> int:
        return self.layout.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.layout.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def d_head(self) -> int:
        return self.layout.d_head

    @property
    def edits(self) -> list[Edit]:
        """Edits currently applied, oldest first."""
        return [e for e, _ in self._log]

    def __repr__(self) -> str:
        return (
            f"ChannelEditor({self.model.config.model_type}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, d_model={self.d_model}, d_head={self.d_head}, edits={len(self._log)})"
        )

    # ----- reading ------------------------------------------------------------------------------
    def head_weights(self, layer: int, head: int) -> HeadWeights:
        """Float32 copies of head ``head`` of layer ``layer`` (query head index; GQA resolved)."""
        self.layout.check(layer, head)
        L = self.layout
        kind, gain, bias = L.norm_params(layer)
        q_gain, k_gain = L.qk_gains(layer, head)
        return HeadWeights(
            W_Q=_f32(L.proj_weight(layer, head, "q")), W_K=_f32(L.proj_weight(layer, head, "k")),
            W_V=_f32(L.proj_weight(layer, head, "v")), W_O=_f32(L.out_weight(layer, head)),
            b_Q=_f32(L.proj_bias(layer, head, "q")), b_K=_f32(L.proj_bias(layer, head, "k")),
            b_V=_f32(L.proj_bias(layer, head, "v")), b_O=_f32(L.out_bias(layer)),
            norm_kind=kind, norm_gain=_f32(gain), norm_bias=_f32(bias), q_gain=_f32(q_gain), k_gain=_f32(k_gain),
        )

    def circuit_factors(
        self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The thin factors ``(A, B)`` with ``circuit = A @ B.T``, both ``[d, d_h]`` float32.

        OV: ``A = N W_V``, ``B = W_O^T``. QK: ``A = N W_Q G_q``, ``B = N W_K G_k`` (``N``: the norm's
        linear part when folded, identity when raw; ``G``: per-head q/k-norm gains when folded).
        """
        self.layout.check(layer, head)
        A, B = self.stacked_factors(circuit, folded=folded, layers=[layer])
        return A[0, head], B[0, head]

    def circuit_matrix(self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None) -> torch.Tensor:
        """The dense ``[d, d]`` circuit (materialised: for inspection and tests, not for bulk work)."""
        A, B = self.circuit_factors(layer, head, circuit, folded=folded)
        return A @ B.T

    def svd(self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None) -> SVDResult:
        """Factored SVD of one head's circuit (float32, deterministic signs). See :class:`SVDResult`."""
        A, B = self.circuit_factors(layer, head, circuit, folded=folded)
        return SVDResult(*linalg.factored_svd(A, B))

    def svd_all(
        self, circuit: str = "ov", *, folded: bool | None = None, layers: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SVDResult:
        """Batched factored SVD of every head of the chosen layers.

        Returns:
            :class:`SVDResult` with ``U, V [n_layers, H, d, d_h]`` and ``S [n_layers, H, d_h]`` on
            ``device`` (default: the device of the first layer's weights).
        """
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        A, B = self.stacked_factors(circuit, folded=folded, layers=layers, device=device)
        return SVDResult(*linalg.factored_svd(A, B))

    def stacked_factors(
        self, circuit: str = "ov", *, folded: bool | None = None, layers: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of every head of ``layers`` stacked: ``A, B [n_layers, H, d, d_h]`` float32 (the same
        values as :meth:`circuit_factors`, gathered one layer at a time)."""
        self._check_circuit(circuit)
        folded = self.folded if folded is None else bool(folded)
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        L, H = self.layout, range(self.n_heads)
        As, Bs = [], []
        for layer in layers:
            L.check(layer, 0)
            kind, gain, _ = L.norm_params(layer) if folded else (None, None, None)
            gain = None if gain is None else gain.detach().float()

            def stack(kind_: str) -> torch.Tensor:
                return torch.stack([L.proj_weight(layer, h, kind_).detach() for h in H]).float()

            if circuit == "ov":
                A = linalg.fold_norm(stack("v"), kind, gain)
                B = torch.stack([L.out_weight(layer, h).detach() for h in H]).float().transpose(1, 2)
            else:
                A, B = stack("q"), stack("k")
                q_gain, k_gain = L.qk_gains(layer, 0) if folded else (None, None)
                if q_gain is not None:
                    A, B = A * q_gain.detach().float(), B * k_gain.detach().float()
                A, B = linalg.fold_norm(A, kind, gain), linalg.fold_norm(B, kind, gain)
            device = A.device if device is None else device
            As.append(A.to(device))
            Bs.append(B.to(device))
        return torch.stack(As), torch.stack(Bs)

    # ----- composition --------------------------------------------------------------------------
    def _heads(self, heads: Sequence[tuple[int, int]] | None, layers: Sequence[int] | None) -> list[tuple[int, int]]:
        if heads is None:
            layers = range(self.n_layers) if layers is None else layers
            heads = [(l, h) for l in layers for h in range(self.n_heads)]
        heads = sorted({(int(l), int(h)) for l, h in heads})
        for l, h in heads:
            self.layout.check(l, h)
        return heads

    def _svd_of_heads(self, heads: list[tuple[int, int]], circuit: str, folded: bool, device) -> SVDResult:
        layers = sorted({l for l, _ in heads})
        full = self.svd_all(circuit, folded=folded, layers=layers, device=device)
        li = torch.tensor([layers.index(l) for l, _ in heads])
        hi = torch.tensor([h for _, h in heads])
        return SVDResult(full.U[li, hi], full.S[li, hi], full.V[li, hi])

    def channel_map(
        self,
        modes: Sequence[str] = channels.MODES,
        *,
        folded: bool | None = None,
        senders: Sequence[tuple[int, int]] | None = None,
        receivers: Sequence[tuple[int, int]] | None = None,
        layers: Sequence[int] | None = None,
        memory_limit_mb: float = 512.0,
        keep_top: int = 1000,
        baseline_samples: int = 64,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> "channels.ChannelMap":
        """Composition of every sender head's OV components into every later receiver head.

        Args:
            modes: any of ``"q"``, ``"k"``, ``"v"`` (Q-, K-, V-composition).
            folded: folded (default) or raw circuits.
            senders, receivers: ``(layer, head)`` lists to restrict the map; default every head of
                ``layers`` (default all layers).
            memory_limit_mb: bound on the streaming blocks' working memory.
            keep_top: strongest component pairs kept per mode (for :meth:`ChannelMap.top_channels`).
            baseline_samples: Monte Carlo samples for the random-matrix baselines (seeded by ``seed``).
            device: where to compute (default: where the first layer's weights are; CUDA if there).
            progress: show a progress bar.

        Returns:
            A :class:`th_edit.channels.ChannelMap`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> editor = ChannelEditor(GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=50)))
            >>> cmap = editor.channel_map(progress=False, baseline_samples=4)
            >>> cmap.head_scores("q").shape
            torch.Size([3, 4, 3, 4])
            >>> list(cmap.top_channels("k", k=3).columns[:4])
            ['mode', 'sender_layer', 'sender_head', 'sender_component']
        """
        from .progress import progress_bar

        folded = self.folded if folded is None else bool(folded)
        for m in modes:
            self._check_mode(m)
        senders_l = self._heads(senders, layers)
        receivers_l = self._heads(receivers, layers)
        ov_send = self._svd_of_heads(senders_l, "ov", folded, device)
        device = ov_send.V.device
        ov_recv = qk_recv = None
        if "v" in modes:
            same = receivers_l == senders_l
            ov_recv = ov_send if same else self._svd_of_heads(receivers_l, "ov", folded, device)
        if "q" in modes or "k" in modes:
            qk_recv = self._svd_of_heads(receivers_l, "qk", folded, device)
        ordered = {m: _receiver_side(m, ov_recv, qk_recv) for m in channels.MODES if m in modes}
        return channels.compute_channel_map(
            sender_svd=(ov_send.S, ov_send.V), receiver_svds=ordered, senders=senders_l, receivers=receivers_l,
            n_layers=self.n_layers, n_heads=self.n_heads, folded=folded, memory_limit_mb=memory_limit_mb,
            keep_top=keep_top, baseline_samples=baseline_samples, seed=seed,
            progress=(lambda **kw: progress_bar(enabled=progress, **kw)),
        )

    def composition(
        self, sender: tuple[int, int], receiver: tuple[int, int], mode: str = "q", *, folded: bool | None = None
    ) -> dict[str, Any]:
        """Composition of one sender head into one receiver head, all three levels.

        Returns:
            dict with ``head`` (the Elhage et al. score), ``component [d_h]`` (per sender component),
            ``cosine [d_h, d_h]`` (signed ``v_i . a_j``) and ``share [d_h, d_h]`` (each pair's share of the
            head score), plus the two heads' singular values ``sender_S`` and ``receiver_S``.
        """
        self._check_mode(mode)
        (sl, sh), (rl, rh) = sender, receiver
        self.layout.check(sl, sh)
        self.layout.check(rl, rh)
        if sl >= rl:
            raise InvalidArgumentError(
                f"sender layer {sl} is not before receiver layer {rl}: a head can only read what earlier layers wrote."
            )
        _, s, v = self.svd(sl, sh, "ov", folded=folded)
        receiver_svd = self.svd(rl, rh, "ov" if mode == "v" else "qk", folded=folded)
        t, a = _receiver_side(mode, receiver_svd, receiver_svd)
        out = channels.pair_composition(s, v, t, a)
        out.update(sender_S=s, receiver_S=t)
        return out

    # ----- editing ------------------------------------------------------------------------------
    def scale_component(
        self,
        layer: int,
        head: int,
        circuit: str = "ov",
        component: int | Sequence[int] = 0,
        alpha: float = 0.0,
        *,
        folded: bool | None = None,
    ) -> Edit:
        """Rescale singular component(s) of one head's circuit by ``alpha``, in place.

        The circuit changes by ``(alpha - 1) * sum_i s_i u_i v_i^T`` over the chosen components; the
        change is written into ``W_O[h]`` (OV) or ``W_Q[h]`` (QK) only. ``alpha=1`` is an exact no-op,
        ``alpha=0`` removes the components.

        Args:
            layer, head: the head (query head index under GQA).
            circuit: ``"ov"`` or ``"qk"``.
            component: index (0 = largest singular value) or a list of indices (e.g. a degenerate block).
            alpha: finite scale factor.
            folded: edit components of the folded (default) or raw circuit.

        Returns:
            The applied :class:`Edit` (also appended to :attr:`edits`).

        Raises:
            InvalidArgumentError: bad layer/head/circuit/component/alpha; the model is left untouched.
        """
        self.layout.check(layer, head)
        self._check_circuit(circuit)
        folded = self.folded if folded is None else bool(folded)
        components = self._check_components(component)
        alpha = self._check_alpha(alpha)
        U, S, V = self.svd(layer, head, circuit, folded=folded)
        self._warn_if_partial_block(SVDResult(U, S, V), components, layer, head, circuit)
        idx = torch.tensor(components, device=U.device)
        coeff = (alpha - 1.0) * S[idx]
        if circuit == "ov":
            A, _ = self.circuit_factors(layer, head, "ov", folded=folded)
            left, right = linalg.ov_edit_factors(A, U[:, idx], coeff, V[:, idx])
        else:
            A, B = self.circuit_factors(layer, head, "qk", folded=folded)
            w = self.head_weights(layer, head)
            q_gain = w.q_gain if folded else None
            left, right = linalg.qk_edit_factors(w.W_Q, A, B, U[:, idx], coeff, V[:, idx], q_gain=q_gain)
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise InvalidArgumentError(
                f"the edit of layer {layer} head {head} {circuit} is not finite (a q-norm gain is ~0?); "
                "nothing was changed. Try folded=False."
            )
        edit = Edit(
            layer=layer, head=head, circuit=circuit, components=components, alpha=alpha, folded=folded,
            singular_values=tuple(float(s) for s in S[idx].tolist()), left=left.cpu(), right=right.cpu(),
        )
        self.apply_edit(edit)
        logger.info("scaled %s component(s) %s of layer %d head %d by %g", circuit, list(components), layer, head, alpha)
        return edit

    def apply_edit(self, edit: Edit) -> None:
        """Write a precomputed :class:`Edit`'s factors into the model (used by plans) and log it."""
        self.layout.check(edit.layer, edit.head)
        self._check_circuit(edit.circuit)
        view = self.layout.target(edit.layer, edit.head, edit.circuit)
        delta = edit.delta().to(view.device)
        if delta.shape != view.shape:
            raise InvalidArgumentError(
                f"edit factors give a {tuple(delta.shape)} change but {edit.target} of layer {edit.layer} head "
                f"{edit.head} is {tuple(view.shape)}: the edit was made for a different geometry."
            )
        key = f"{edit.layer}.{edit.head}"
        fingerprint = self._fingerprints.get(key) or self.head_fingerprint(edit.layer, edit.head)
        old = view.detach().clone()
        new = torch.where(delta == 0, old, (old.float() + delta).to(old.dtype))
        if not torch.isfinite(new).all():
            raise InvalidArgumentError(
                f"the edit would make {edit.target} of layer {edit.layer} head {edit.head} non-finite in "
                f"{old.dtype} (alpha={edit.alpha} too large?); nothing was changed."
            )
        with torch.no_grad():
            view.copy_(new)
        self._fingerprints.setdefault(key, fingerprint)
        self._log.append((edit, old))

    def undo(self) -> Edit:
        """Revert the most recent edit bit for bit and return it."""
        if not self._log:
            raise NothingToUndoError("no edit to undo: the model is already in its original state.")
        edit, old = self._log.pop()
        view = self.layout.target(edit.layer, edit.head, edit.circuit)
        with torch.no_grad():
            view.copy_(old)
        return edit

    def reset(self) -> list[Edit]:
        """Revert every edit (newest first); the model's tensors are then bit-identical to the start."""
        undone = []
        while self._log:
            undone.append(self.undo())
        return undone

    # ----- steering ----------------------------------------------------------------------------
    def steer(self, layer: int, head: int, circuit: str = "ov", *, component: int | Sequence[int] = 0,
              alpha: float = 1.0, add: float | Sequence[float] = 0.0, positions: Any = None,
              folded: bool | None = None):
        """Context manager rescaling head ``(layer, head)``'s output along OV component(s) at run time,
        without touching weights (see :mod:`th_edit.steering`); at every position it equals
        ``scale_component(layer, head, "ov", component, alpha)``.

        >>> with editor.steer(1, 2, component=0, alpha=0.0, positions="last"):   # doctest: +SKIP
        ...     logits = editor.model(ids).logits
        """
        from .steering import steer

        if circuit != "ov":
            raise InvalidArgumentError(
                f"circuit={circuit!r}: steering rescales what a head writes, so it needs 'ov'; "
                "use scale_component(..., circuit='qk', ...) to rescale what it reads."
            )
        return steer(self, layer, head, component=component, alpha=alpha, add=add, positions=positions, folded=folded)

    # ----- discovery ---------------------------------------------------------------------------
    def find_channels(self, dataset, *, tokenizer: Any = None, **kwargs: Any):
        """Ranked inhibition and duplicate-detection channels with weight-based, baseline-adjusted and
        causal evidence; see :func:`th_edit.discovery.find_channels`.

        >>> findings = editor.find_channels(data["train"])            # doctest: +SKIP
        >>> findings.top("inhibition", k=5)                           # doctest: +SKIP
        """
        from .discovery import find_channels

        return find_channels(self, self._tokenizer(tokenizer), dataset, **kwargs)

    def search_edit(self, dev, test, findings, *, tokenizer: Any = None, **kwargs: Any):
        """Choose component rescalings on ``dev`` and report ``test`` before/after; the chosen edits stay
        applied. See :func:`th_edit.discovery.search_edit`."""
        from .discovery import search_edit

        return search_edit(self, self._tokenizer(tokenizer), dev, test, findings, **kwargs)

    def _tokenizer(self, tokenizer: Any) -> Any:
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise InvalidArgumentError("this needs a tokenizer: pass tokenizer=... here or to ChannelEditor(model, tokenizer=...).")
        return tokenizer

    # ----- validation ---------------------------------------------------------------------------
    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in channels.MODES:
            raise InvalidArgumentError(f"mode={mode!r} is not one of {channels.MODES}.")

    @staticmethod
    def _check_circuit(circuit: str) -> None:
        if circuit not in CIRCUITS:
            raise InvalidArgumentError(f"circuit={circuit!r} is not one of {CIRCUITS}.")

    def _check_components(self, component: int | Sequence[int]) -> tuple[int, ...]:
        items = [component] if isinstance(component, numbers.Integral) else list(component)
        if not items:
            raise InvalidArgumentError("component list is empty: name at least one component index.")
        r = self.d_head
        for c in items:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) < r:
                raise InvalidArgumentError(
                    f"component={c!r} is out of range: each head's circuit has {r} components (0..{r - 1})."
                )
        if len(set(items)) != len(items):
            raise InvalidArgumentError(f"component list {items} repeats an index.")
        return tuple(sorted(int(c) for c in items))

    @staticmethod
    def _check_alpha(alpha: float) -> float:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
            raise InvalidArgumentError(f"alpha={alpha!r} must be a finite real number (1.0 leaves the head as is).")
        return float(alpha)

    @staticmethod
    def _warn_if_partial_block(svd: SVDResult, components: tuple[int, ...], layer: int, head: int, circuit: str) -> None:
        for block in svd.degenerate_blocks():
            chosen = set(block) & set(components)
            if chosen and chosen != set(block):
                logger.warning(
                    "layer %d head %d %s: components %s have nearly equal singular values, so component(s) %s "
                    "alone are not well defined; pass component=%s to scale the whole subspace.",
                    layer, head, circuit, block, sorted(chosen), block,
                )
