"""The channel map: how strongly each earlier head's singular components write into what later heads read.

Composition (Elhage et al. 2021; Merullo et al. 2024). Sender ``s`` (earlier layer) with
``OV_s = sum_i s_i u_i v_i^T``; receiver ``r`` (later layer) whose circuit ``B = sum_j t_j a_j b_j^T``
reads along ``a_j``:

* Q-composition: ``B = QK_r`` (``a_j``: query read directions, the U of the receiver's QK SVD);
* K-composition: ``B = QK_r^T`` (``a_j``: key read directions, the V of the QK SVD);
* V-composition: ``B = OV_r`` (``a_j``: value read directions, the U of the receiver's OV SVD).

With ``P_ij = v_i . a_j`` all three levels come from one matrix per mode:

* component pair: ``cosine_ij = |P_ij|``; its share of the head score
  ``share_ij = s_i t_j |P_ij| / (||s|| ||t||)`` (shares squared sum to the squared head score) is the
  ranking key reported as ``score``;
* sender component against the whole receiver: ``score_i = ||v_i^T B|| / ||B||_F = sqrt(sum_j t_j^2 P_ij^2) / ||t||``;
* head pair: ``||OV_s B||_F / (||OV_s||_F ||B||_F) = sqrt(sum_ij s_i^2 t_j^2 P_ij^2) / (||s|| ||t||)``.

The computation streams over blocks of ``Z = V_s^T (A_r diag(t / ||t||))`` whose size the caller bounds;
the full all-components-by-all-components matrix is never held. Only the strongest ``keep_top`` pairs per
mode are kept (by share); any single head pair can be recomputed exactly with :func:`pair_composition`.

Baselines for random matrices of the same shapes (a random orientation of one factor):

* component pair: ``E|cos|`` of two independent uniform unit vectors in ``R^d`` (analytic);
  the share baseline is ``(s_i/||s||)(t_j/||t||) E|cos|``;
* sender component: ``E[score_i^2] = 1/d`` exactly; mean and std by seeded Monte Carlo;
* head pair: ``E[score^2] = 1/d`` exactly; mean and std by seeded Monte Carlo on Gaussian factors of the
  model's shapes (as Elhage et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..core import linalg
from ..core.circuits import MODES
from ..errors import InvalidArgumentError
from ..utils.distributed import process_rank_and_count
from ..utils.progress import progress_bar
from ..utils.sharding import gather_from_processes
from .channel_shards import canonical_top, merge_parts, sender_blocks

__all__ = ["MODES", "ChannelMap", "compute_channel_map", "pair_composition", "expected_abs_cosine", "monte_carlo_baselines"]

Head = tuple[int, int]


def expected_abs_cosine(d: int) -> float:
    """``E|u . v|`` for independent uniform unit vectors in ``R^d``: ``Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))``."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def monte_carlo_baselines(d: int, r: int, *, samples: int = 64, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Mean and std of head-pair and sender-component scores for random Gaussian factors.

    Sender ``OV = X Y^T`` and receiver ``B = W Z^T`` with ``X, Y, W, Z: [d, r]`` i.i.d. Gaussian.

    Returns:
        ``{"head": (mean, std), "component": (mean, std)}``.
    """
    g = torch.Generator().manual_seed(seed)
    head, comp = [], []
    for _ in range(samples):
        X, Y, W, Z = (torch.randn(d, r, generator=g, dtype=torch.float64) for _ in range(4))
        _, s, v = linalg.factored_svd(X, Y, dtype=torch.float64)
        a, t, _ = linalg.factored_svd(W, Z, dtype=torch.float64)
        scores = pair_composition(s, v, t, a)
        comp.append(scores["component"])
        head.append(scores["head"])
    head_t, comp_t = torch.tensor(head), torch.cat(comp)
    return {"head": (float(head_t.mean()), float(head_t.std())), "component": (float(comp_t.mean()), float(comp_t.std()))}


@dataclass
class ModeData:
    """Per-mode results, indexed by position in the sender / receiver head lists."""

    head: torch.Tensor  # [Ns, Nr]
    component: torch.Tensor  # [Ns, r, Nr]
    top_share: torch.Tensor  # [k] descending
    top_row: torch.Tensor  # [k] sender component row = sender_index * r + i
    top_col: torch.Tensor  # [k] receiver component col = receiver_index * r + j
    top_cos: torch.Tensor  # [k] signed cosine v_i . a_j
    receiver_S: torch.Tensor  # [Nr, r]


@dataclass
class ChannelMap:
    """Composition scores of every sender head's components into every later receiver head.

    Create with ``editor.channel_map(...)``. Heads are ``(layer, head)`` pairs; modes ``"q"``, ``"k"``,
    ``"v"``. Scores are zero where the sender's layer is not before the receiver's or a head was not
    selected.
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    folded: bool
    senders: list[Head]
    receivers: list[Head]
    sender_S: torch.Tensor  # [Ns, r]
    modes: dict[str, ModeData]
    baselines: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: how the map was made: settings (``config``) and the number of processes that computed it
    meta: dict[str, Any] = field(default_factory=dict)

    # ----- lookups ------------------------------------------------------------------------------
    def _mode(self, mode: str) -> ModeData:
        if mode not in self.modes:
            raise InvalidArgumentError(f"mode={mode!r} was not computed; this map has modes {sorted(self.modes)}.")
        return self.modes[mode]

    def _index(self, heads: list[Head], head: Head, role: str) -> int:
        try:
            return heads.index(tuple(head))
        except ValueError:
            raise InvalidArgumentError(f"{role} {tuple(head)} is not in this channel map's {role}s.") from None

    def head_scores(self, mode: str, *, baseline: str | None = None) -> torch.Tensor:
        """``[L, H, L, H]`` head-pair composition scores (sender layer, head, receiver layer, head).

        Args:
            baseline: None (raw scores), ``"subtract"`` (minus the random-matrix mean) or ``"zscore"``
                ((score - mean) / std of the random-matrix baseline). Invalid pairs stay 0.
        """
        data = self._mode(mode)
        values = data.head
        if baseline is not None:
            mean, std = self.baselines["head"]
            valid = self._valid_mask()
            values = torch.where(valid, (values - mean) / (std if baseline == "zscore" else 1.0), values)
        out = torch.zeros(self.n_layers, self.n_heads, self.n_layers, self.n_heads)
        s = torch.tensor(self.senders).T
        r = torch.tensor(self.receivers).T
        out[s[0][:, None], s[1][:, None], r[0][None, :], r[1][None, :]] = values.float().cpu()
        return out

    def _valid_mask(self) -> torch.Tensor:
        sl = torch.tensor([l for l, _ in self.senders])
        rl = torch.tensor([l for l, _ in self.receivers])
        return sl[:, None] < rl[None, :]

    def component_scores(self, mode: str, sender: Head, receiver: Head) -> torch.Tensor:
        """``[d_h]`` score of each sender component against the whole receiver circuit."""
        data = self._mode(mode)
        i = self._index(self.senders, sender, "sender")
        j = self._index(self.receivers, receiver, "receiver")
        return data.component[i, :, j].float().cpu()

    def top_channels(self, mode: str | None = None, k: int = 20):
        """The ``k`` strongest (sender component, receiver component) pairs as a pandas DataFrame.

        Columns: ``mode, sender_layer, sender_head, sender_component, receiver_layer, receiver_head,
        receiver_component, score`` (the pair's share of the head score), ``cosine`` (signed ``v_i . a_j``),
        ``sender_singular_value, receiver_singular_value, baseline_score`` (share for a random orientation),
        ``baseline_cosine`` and ``score_over_baseline``. ``mode=None`` merges all modes.
        """
        import pandas as pd

        modes = [mode] if mode is not None else list(self.modes)
        frames = [self._top_frame(m) for m in modes]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return table.sort_values("score", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def _top_frame(self, mode: str):
        import pandas as pd

        data = self._mode(mode)
        r = self.d_head
        si, ci = (data.top_row // r).tolist(), (data.top_row % r).tolist()
        ri, cj = (data.top_col // r).tolist(), (data.top_col % r).tolist()
        e_cos = expected_abs_cosine(self.d_model)
        s_norm = self.sender_S.norm(dim=1)
        t_norm = data.receiver_S.norm(dim=1)
        rows = []
        for n in range(len(si)):
            s_val = float(self.sender_S[si[n], ci[n]])
            t_val = float(data.receiver_S[ri[n], cj[n]])
            base = (s_val / float(s_norm[si[n]])) * (t_val / float(t_norm[ri[n]])) * e_cos
            score = float(data.top_share[n])
            rows.append({
                "mode": mode,
                "sender_layer": self.senders[si[n]][0], "sender_head": self.senders[si[n]][1], "sender_component": ci[n],
                "receiver_layer": self.receivers[ri[n]][0], "receiver_head": self.receivers[ri[n]][1],
                "receiver_component": cj[n], "score": score, "cosine": float(data.top_cos[n]),
                "sender_singular_value": s_val, "receiver_singular_value": t_val, "baseline_score": base,
                "baseline_cosine": e_cos, "score_over_baseline": score / base if base > 0 else float("inf"),
            })
        return pd.DataFrame(rows, columns=_PAIR_COLUMNS)

    def to_table(self, level: str = "pair"):
        """The map as a tidy DataFrame: ``"pair"`` (the kept strongest pairs of every mode, the columns of
        :meth:`top_channels`), ``"component"`` or ``"head"`` (every valid sender/receiver combination)."""
        import pandas as pd

        if level == "pair":
            return self.top_channels(None, k=sum(len(d.top_share) for d in self.modes.values()))
        if level not in ("head", "component"):
            raise InvalidArgumentError(f"level={level!r} is not one of 'pair', 'component', 'head'.")
        frames = []
        valid = self._valid_mask()
        si, ri = valid.nonzero(as_tuple=True)
        sl = torch.tensor(self.senders)[si]
        rl = torch.tensor(self.receivers)[ri]
        for mode, data in self.modes.items():
            cols = {"mode": mode, "sender_layer": sl[:, 0].numpy(), "sender_head": sl[:, 1].numpy(),
                    "receiver_layer": rl[:, 0].numpy(), "receiver_head": rl[:, 1].numpy()}
            if level == "head":
                mean, std = self.baselines.get("head", (float("nan"), float("nan")))
                score = data.head[si, ri].float().numpy()
                frames.append(pd.DataFrame({**cols, "score": score, "baseline_score": mean,
                                            "z_score": (score - mean) / std}))
            else:
                r = self.d_head
                comp = data.component[si, :, ri].float()  # [n, r]: row-major (pair, component)
                mean, _ = self.baselines.get("component", (float("nan"), float("nan")))
                rep = {k: (v if isinstance(v, str) else v.repeat(r)) for k, v in cols.items()}  # each pair r times
                frames.append(pd.DataFrame({**rep, "sender_component": torch.arange(r).repeat(len(si)).numpy(),
                                            "score": comp.reshape(-1).numpy(), "baseline_score": mean}))
        return pd.concat(frames, ignore_index=True)

    def to_csv(self, path: str, level: str = "pair") -> None:
        """Write :meth:`to_table` as CSV."""
        self.to_table(level).to_csv(path, index=False)

    def to_parquet(self, path: str, level: str = "pair") -> None:
        """Write :meth:`to_table` as Parquet (needs pyarrow, installed with ``datasets``)."""
        self.to_table(level).to_parquet(path, index=False)


_PAIR_COLUMNS = [
    "mode", "sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head",
    "receiver_component", "score", "cosine", "sender_singular_value", "receiver_singular_value",
    "baseline_score", "baseline_cosine", "score_over_baseline",
]


def pair_composition(
    s: torch.Tensor, v: torch.Tensor, t: torch.Tensor, a: torch.Tensor
) -> dict[str, Any]:
    """All three levels for one sender/receiver pair from their SVDs.

    Args:
        s: ``[r]`` sender singular values; v: ``[d, r]`` sender write directions;
        t: ``[r2]`` receiver singular values; a: ``[d, r2]`` receiver read directions for the mode.

    Returns:
        dict with ``head`` (float), ``component [r]``, ``cosine [r, r2]`` (signed ``P_ij``) and
        ``share [r, r2]`` (``s_i t_j |P_ij| / (||s|| ||t||)``).
    """
    P = v.T.double() @ a.double()
    sw, tw = s.double() / s.double().norm(), t.double() / t.double().norm()
    Z = P * tw
    component = Z.square().sum(1).sqrt()
    head = float((sw.square() * component.square()).sum().sqrt())
    return {"head": head, "component": component.float(), "cosine": P.float(),
            "share": (sw[:, None] * Z.abs()).float()}


def stream_mode(
    send_V: torch.Tensor, send_w: torch.Tensor, send_layer: torch.Tensor,
    recv_A: torch.Tensor, recv_w: torch.Tensor, recv_layer: torch.Tensor,
    *, budget_bytes: int, keep_top: int, progress: Any, matmul_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream one mode. ``send_V [Ns, d, r]``, ``send_w [Ns, r]`` (s/||s||), ``recv_A [Nr, d, r]``,
    ``recv_w [Nr, r]`` (t/||t||); senders sorted by layer. Returns head ``[Ns, Nr]``, component
    ``[Ns, r, Nr]`` and the kept top pairs (share, row, col). ``matmul_dtype``: dtype of the block
    GEMMs' inputs (bfloat16: accumulated and returned in float32, see :func:`_block_product`)."""
    Ns, d, r = send_V.shape
    Nr = recv_A.shape[0]
    dev = send_V.device
    rows_all = send_V.transpose(1, 2).reshape(Ns * r, d)  # sender component rows v_i^T
    w_rows = send_w.reshape(Ns * r)
    head_sq = torch.zeros(Ns, Nr, device=dev)
    comp = torch.zeros(Ns, r, Nr, device=dev)
    top_v = torch.empty(0, device=dev)
    top_r = torch.empty(0, dtype=torch.long, device=dev)
    top_c = torch.empty(0, dtype=torch.long, device=dev)
    thr2 = torch.tensor(0.0, device=dev)
    for layer in torch.unique(recv_layer).tolist():
        recv_idx = (recv_layer == layer).nonzero().flatten()
        n_send = int((send_layer < layer).sum())  # senders sorted by layer: a prefix is valid
        if n_send == 0:
            progress.update(len(recv_idx))
            continue
        # bytes per Z element: Z (squared in place) + a boolean mask + slack for the reductions
        per_elem = 6
        max_heads_c = max(1, min(len(recv_idx), budget_bytes // (per_elem * r * r * n_send)))
        for c0 in range(0, len(recv_idx), max_heads_c):
            cidx = recv_idx[c0:c0 + max_heads_c]
            nc = len(cidx)
            cols = (recv_A[cidx] * recv_w[cidx][:, None, :]).permute(1, 0, 2).reshape(d, nc * r)
            max_rows_heads = max(1, min(n_send, budget_bytes // (per_elem * r * nc * r)))
            for s0 in range(0, n_send, max_rows_heads):
                s1 = min(n_send, s0 + max_rows_heads)
                Z = _block_product(rows_all[s0 * r:s1 * r], cols, matmul_dtype)  # [ns*r, nc*r]
                Z2 = Z.square_()
                comp_sq = Z2.view(s1 - s0, r, nc, r).sum(-1)  # [ns, r, nc]
                comp[s0:s1, :, cidx] = comp_sq.sqrt()
                # summed along a contiguous last dim: the same bits whatever the block shape (memory limit)
                weighted = (comp_sq * send_w[s0:s1, :, None].square()).transpose(1, 2).contiguous()
                head_sq[s0:s1, cidx] = weighted.sum(-1)
                if keep_top > 0:
                    share2 = Z2.mul_(w_rows[s0 * r:s1 * r].square()[:, None]).view(-1)  # share^2, in place
                    above = share2 > thr2
                    if int(above.sum()) > keep_top:  # early blocks: take the block's own top k
                        vals2, flat = torch.topk(share2, keep_top)
                    else:
                        flat = above.nonzero().flatten()
                        vals2 = share2[flat]
                    if len(flat):
                        ri, ci = flat // (nc * r), flat % (nc * r)
                        top_v = torch.cat([top_v, vals2.sqrt()])
                        top_r = torch.cat([top_r, ri + s0 * r])
                        top_c = torch.cat([top_c, cidx[ci // r] * r + ci % r])
                        if len(top_v) > keep_top:
                            top_v, order = torch.topk(top_v, keep_top)
                            top_r, top_c = top_r[order], top_c[order]
                        if len(top_v) == keep_top:
                            thr2 = top_v[-1].square()
            progress.update(nc)
    order = torch.argsort(top_v, descending=True)
    return head_sq.sqrt(), comp, top_v[order], top_r[order], top_c[order]


def _block_product(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows [m, d] @ cols [d, n]`` as float32. For bfloat16 the inputs are cast and the GEMM accumulates
    in float32 (on CUDA with a float32 output where torch supports ``out_dtype``)."""
    if dtype == torch.float32:
        return rows @ cols
    a, b = rows.to(dtype), cols.to(dtype)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return (a @ b).float()


def compute_channel_map(
    *,
    sender_svd: tuple[torch.Tensor, torch.Tensor],
    receiver_svds: dict[str, tuple[torch.Tensor, torch.Tensor]],
    senders: Sequence[Head],
    receivers: Sequence[Head],
    n_layers: int,
    n_heads: int,
    folded: bool,
    memory_limit_mb: float = 512.0,
    keep_top: int = 1000,
    baseline_samples: int = 64,
    seed: int = 0,
    progress: Any = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> ChannelMap:
    """Stream the composition scores (pure maths: no model knowledge).

    Args:
        sender_svd: ``(S [Ns, r], V [Ns, d, r])`` of the senders' OV circuits, in ``senders`` order.
        receiver_svds: per mode, ``(T [Nr, r], A [Nr, d, r])``: receivers' singular values and read
            directions for that mode, in ``receivers`` order.
        senders, receivers: ``(layer, head)`` lists.
        memory_limit_mb: bound on the working blocks of each process (the ``[Ns, r, Nr]`` component
            scores are held too).
        keep_top: strongest pairs kept per mode.
        matmul_dtype: input dtype of the block GEMMs (float32, or bfloat16 with float32 accumulation).

    Under ``accelerate launch --num_processes N`` each process streams one contiguous block of senders
    (:func:`~th_edit.analysis.channel_shards.sender_blocks`) against all receivers, the parts are
    gathered, and every process returns the full map (``meta["processes"] == N``). One process runs
    the whole sender range in place.
    """
    senders = [tuple(h) for h in senders]
    receivers = [tuple(h) for h in receivers]
    order = sorted(range(len(senders)), key=lambda i: senders[i])
    if order != list(range(len(senders))):
        raise InvalidArgumentError("senders must be sorted by (layer, head); sort the list before computing the map.")
    S, V = sender_svd
    rank, world = process_rank_and_count()
    blocks = sender_blocks([l for l, _ in senders], [l for l, _ in receivers], world) if world > 1 else [(0, len(senders))]
    stream = _SenderStream(
        V=V, send_w=S / S.norm(dim=1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny),
        send_layer=torch.tensor([l for l, _ in senders], device=V.device, dtype=torch.long),
        recv_layer=torch.tensor([l for l, _ in receivers], device=V.device, dtype=torch.long),
        block=blocks[rank], world=world, budget_bytes=int(memory_limit_mb * 2**20), keep_top=keep_top,
        matmul_dtype=matmul_dtype,
    )
    modes: dict[str, ModeData] = {}
    for mode, (T, A) in receiver_svds.items():
        desc = f"channel map ({mode})"
        bar = (progress(total=len(receivers), desc=desc) if progress and rank == 0
               else progress_bar(total=len(receivers), desc=desc, enabled=False))
        modes[mode] = _one_mode(stream, T, A, bar)
    d, r = V.shape[1], V.shape[-1]
    return ChannelMap(n_layers=n_layers, n_heads=n_heads, d_model=d, d_head=r, folded=folded, senders=senders,
                      receivers=receivers, sender_S=S.cpu(), modes=modes,
                      baselines=_baselines(d, r, baseline_samples, seed),
                      meta={"processes": world, "sender_blocks": blocks})


@dataclass
class _SenderStream:
    """What every mode of :func:`compute_channel_map` streams: this process's sender block ``[lo, hi)`` of the
    senders' right singular vectors ``V [Ns, d, r]`` and normalised weights ``send_w [Ns, r]``, the layers of
    senders and receivers, and the streaming settings."""

    V: torch.Tensor
    send_w: torch.Tensor
    send_layer: torch.Tensor
    recv_layer: torch.Tensor
    block: tuple[int, int]
    world: int
    budget_bytes: int
    keep_top: int
    matmul_dtype: torch.dtype


def _one_mode(s: _SenderStream, T: torch.Tensor, A: torch.Tensor, bar: Any) -> ModeData:
    """One mode's scores: this process's senders streamed against every receiver (``T [Nr, r]`` singular values,
    ``A [Nr, d, r]`` read directions), the processes' parts merged, the top pairs in canonical order."""
    (lo, hi), r = s.block, s.V.shape[-1]
    recv_w = T / T.norm(dim=1, keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
    with bar:
        head, comp, top_v, top_r, top_c = stream_mode(
            s.V[lo:hi], s.send_w[lo:hi], s.send_layer[lo:hi], A, recv_w, s.recv_layer, budget_bytes=s.budget_bytes,
            keep_top=s.keep_top, progress=bar, matmul_dtype=s.matmul_dtype,
        )
    part = (head.cpu(), comp.cpu(), top_v.cpu(), (top_r + lo * r).cpu(), top_c.cpu())
    if s.world > 1:
        part = merge_parts(gather_from_processes(part, s.world), s.keep_top)
    head, comp, top_v, top_r, top_c = part
    top_v, top_r, top_c = canonical_top(top_v, top_r, top_c, s.keep_top)
    rows, cols = top_r.to(s.V.device), top_c.to(s.V.device)
    cos = (s.V[rows // r, :, rows % r] * A[cols // r, :, cols % r]).sum(-1)
    return ModeData(head=head, component=comp, top_share=top_v, top_row=top_r, top_col=top_c, top_cos=cos.cpu(),
                     receiver_S=T.cpu())


def _baselines(d: int, r: int, samples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Random-matrix baselines (Monte Carlo, ``samples`` draws) and the expected ``|cos|`` of two random
    directions in ``R^d`` with its standard deviation."""
    baselines = monte_carlo_baselines(d, r, samples=samples, seed=seed) if samples else {}
    baselines["pair_cosine"] = (expected_abs_cosine(d), math.sqrt(max(1.0 / d - expected_abs_cosine(d) ** 2, 0.0)))
    return baselines
