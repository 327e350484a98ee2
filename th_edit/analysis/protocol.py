"""What analysis may use of an editor: a :class:`typing.Protocol` that :class:`th_edit.ChannelEditor` meets.

Roles, discovery, the edit search and the positional subspace drive an editor through exactly these
members, so the dependency is declared and runs one way (analysis never imports the facade).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from torch import nn

from ..core.circuits import SVDResult
from ..core.layout import AttentionLayout
from ..edits.plan import Edit

__all__ = ["HeadEditor"]


class HeadEditor(Protocol):
    """The editor interface used by :mod:`th_edit.analysis`."""

    model: nn.Module
    layout: AttentionLayout
    folded: bool

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def d_head(self) -> int: ...

    @property
    def edits(self) -> list[Edit]: ...

    def svd(self, layer: int, head: int, circuit: str = "ov", *, folded: bool | None = None) -> SVDResult: ...

    def composition(self, sender: tuple[int, int], receiver: tuple[int, int], mode: str = "q") -> dict[str, Any]: ...

    def channel_map(self, modes: Sequence[str] = ..., **kwargs: Any) -> Any: ...

    def scale_component(self, layer: int, head: int, circuit: str = "ov", component: Any = 0,
                        alpha: float = 0.0) -> Edit: ...

    def apply_edit(self, edit: Edit) -> None: ...

    def undo(self) -> Edit: ...

    def steer(self, layer: int, head: int, circuit: str = "ov", **kwargs: Any) -> Any: ...
