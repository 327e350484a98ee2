"""Composition of a live model's heads: the whole channel map, or one sender into one receiver.

These join :mod:`th_edit.core.circuits` (the SVDs of the heads' circuits) with the pure streaming maths
of :mod:`th_edit.analysis.channel_stream`. Settings that a user passes around and records travel as one
:class:`ChannelMapConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..core.circuits import MODES, check_mode, receiver_side, select_heads, svd, svd_of_heads
from ..core.layout import AttentionLayout
from ..errors import InvalidArgumentError
from ..utils.progress import progress_bar
from ..utils.settings import Settings
from .channel_stream import ChannelMap, compute_channel_map, pair_composition

__all__ = ["ChannelMapConfig", "channel_map", "head_composition", "config_from"]


MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ChannelMapConfig(Settings):
    """Settings of a channel map (recorded in ``ChannelMap.meta``).

    Attributes:
        modes: any of ``"q"``, ``"k"``, ``"v"`` (Q-, K-, V-composition).
        memory_limit_mb: bound on the streaming blocks' working memory.
        keep_top: strongest component pairs kept per mode (for ``ChannelMap.top_channels``).
        baseline_samples: Monte Carlo samples for the random-matrix baselines (0: none).
        seed: seed of the baselines (the same on every process of a launch).
        matmul_dtype: ``"float32"`` (default) or ``"bfloat16"``: input dtype of the streaming GEMMs,
            accumulated in float32 (for GPUs; scores then agree with float32 to about 1e-2 relative).

    Under ``accelerate launch --num_processes N`` the senders are split over the processes and every
    process returns the full map; ``memory_limit_mb`` bounds each process's working blocks.
    """

    modes: tuple[str, ...] = field(default=MODES, metadata={"help": "composition modes to compute"})
    memory_limit_mb: float = field(default=512.0, metadata={"help": "working-memory bound of the streaming blocks"})
    keep_top: int = field(default=1000, metadata={"help": "component pairs kept per mode"})
    baseline_samples: int = field(default=64, metadata={"help": "Monte Carlo samples of the random baselines"})
    seed: int = field(default=0, metadata={"help": "seed of the random baselines"})
    matmul_dtype: str = field(default="float32", metadata={"help": "GEMM input dtype: float32 or bfloat16"})

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        super().__post_init__()

    def validate(self) -> None:
        self.modes = tuple(check_mode(m) for m in self.modes)
        if not self.modes:
            raise InvalidArgumentError("modes is empty: pick at least one of 'q', 'k', 'v'.")
        if self.memory_limit_mb <= 0 or self.keep_top < 1 or self.baseline_samples < 0:
            raise InvalidArgumentError(
                f"memory_limit_mb={self.memory_limit_mb}, keep_top={self.keep_top}, baseline_samples="
                f"{self.baseline_samples}: need memory_limit_mb > 0, keep_top >= 1 and baseline_samples >= 0."
            )
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise InvalidArgumentError(f"matmul_dtype={self.matmul_dtype!r} is not one of {sorted(MATMUL_DTYPES)}.")

def config_from(cls: type, config: Any = None, **overrides: Any):
    """``config`` (an instance of the settings class ``cls``, or None for its defaults) with ``overrides``
    applied (:meth:`th_edit.utils.settings.Settings.merged`); an unknown override raises
    :class:`InvalidArgumentError` naming the known fields."""
    return cls.merged(config, **overrides)


def channel_map(
    layout: AttentionLayout,
    config: ChannelMapConfig | None = None,
    *,
    folded: bool = True,
    senders: Sequence[tuple[int, int]] | None = None,
    receivers: Sequence[tuple[int, int]] | None = None,
    layers: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ChannelMap:
    """Composition of every sender head's OV components into every later receiver head.

    ``senders`` / ``receivers``: ``(layer, head)`` lists (default every head of ``layers``, default all).
    ``device``: where to compute (default where the first layer's weights are; for a model dispatched
    with ``device_map`` pass one device, e.g. ``"cuda:0"``, to stream there).
    Under ``accelerate launch`` every process returns the full map, ``meta["processes"]`` records how
    many computed it (see :func:`~th_edit.analysis.channel_stream.compute_channel_map`). Every process must
    call it (it gathers), with the same heads and settings.
    """
    config = config or ChannelMapConfig()
    senders_l = select_heads(layout, senders, layers)
    receivers_l = select_heads(layout, receivers, layers)
    ov_send = svd_of_heads(layout, senders_l, "ov", folded=folded, device=device)
    device = ov_send.V.device
    ov_recv = qk_recv = None
    if "v" in config.modes:
        same = receivers_l == senders_l
        ov_recv = ov_send if same else svd_of_heads(layout, receivers_l, "ov", folded=folded, device=device)
    if "q" in config.modes or "k" in config.modes:
        qk_recv = svd_of_heads(layout, receivers_l, "qk", folded=folded, device=device)
    ordered = {m: receiver_side(m, ov_recv, qk_recv) for m in MODES if m in config.modes}
    cmap = compute_channel_map(
        sender_svd=(ov_send.S, ov_send.V), receiver_svds=ordered, senders=senders_l, receivers=receivers_l,
        n_layers=layout.n_layers, n_heads=layout.n_heads, folded=folded, memory_limit_mb=config.memory_limit_mb,
        keep_top=config.keep_top, baseline_samples=config.baseline_samples, seed=config.seed,
        progress=(lambda **kw: progress_bar(enabled=progress, **kw)), matmul_dtype=MATMUL_DTYPES[config.matmul_dtype],
    )
    cmap.meta["config"] = config.to_dict()
    return cmap


def head_composition(
    layout: AttentionLayout, sender: tuple[int, int], receiver: tuple[int, int], mode: str = "q", *, folded: bool = True
) -> dict[str, Any]:
    """Composition of one sender head into one later receiver head, all three levels.

    Returns:
        dict with ``head`` (the Elhage et al. score), ``component [d_h]`` (per sender component),
        ``cosine [d_h, d_h]`` (signed ``v_i . a_j``) and ``share [d_h, d_h]`` (each pair's share of the
        head score), plus the two heads' singular values ``sender_S`` and ``receiver_S``.
    """
    check_mode(mode)
    (sl, sh), (rl, rh) = sender, receiver
    layout.check(sl, sh)
    layout.check(rl, rh)
    if sl >= rl:
        raise InvalidArgumentError(
            f"sender layer {sl} is not before receiver layer {rl}: a head can only read what earlier layers wrote."
        )
    _, s, v = svd(layout, sl, sh, "ov", folded=folded)
    receiver_svd = svd(layout, rl, rh, "ov" if mode == "v" else "qk", folded=folded)
    t, a = receiver_side(mode, receiver_svd, receiver_svd)
    out = pair_composition(s, v, t, a)
    out.update(sender_S=s, receiver_S=t)
    return out

