"""One pattern for th_edit's settings: a dataclass base with validation at construction, a JSON round trip
and keyword overrides.

A settings class subclasses :class:`Settings` as a ``@dataclass``, documents each field with
``field(default=..., metadata={"help": ...})`` and overrides :meth:`Settings.validate` (called by
``__post_init__``, so a bad value is refused when the object is built, naming the field and the fix).

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Demo(Settings):
...     steps: int = field(default=3, metadata={"help": "steps"})
...     scales: tuple[float, ...] = field(default=(0.5, 2.0), metadata={"help": "scales"})
>>> Demo().with_overrides(steps=5).to_dict()
{'steps': 5, 'scales': [0.5, 2.0]}
>>> Demo.from_dict({"steps": 5, "scales": [0.5, 2.0]}) == Demo(steps=5)
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from ..errors import InvalidArgumentError

__all__ = ["Settings", "field_help"]

S = TypeVar("S", bound="Settings")


def _jsonable(value: Any) -> Any:
    """Tuples and lists (nested) as lists; everything else as is."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _like_default(f: dataclasses.Field, value: Any) -> Any:
    """A JSON list back as a tuple where the field's default is a tuple."""
    if isinstance(value, list) and isinstance(f.default, tuple):
        return tuple(value)
    return value


@dataclasses.dataclass
class Settings:
    """Base of the settings dataclasses (``ChannelMapConfig``, ``DiscoveryConfig``, ``EditSearchConfig``,
    ``FitConfig``): validated when built, :meth:`to_dict` / :meth:`from_dict` for JSON, :meth:`with_overrides`
    for keyword overrides (an unknown name raises :class:`InvalidArgumentError` listing the known ones)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the first bad field and the fix (subclasses override)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def check_names(cls, names: Any) -> None:
        """Raise :class:`InvalidArgumentError` if any of ``names`` is not a field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(names) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """The settings written by :meth:`to_dict` (missing fields take their defaults)."""
        cls.check_names(data)
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: _like_default(by_name[k], v) for k, v in data.items()})

    def with_overrides(self: S, **overrides: Any) -> S:
        """A copy with ``overrides`` replacing fields (validated again); ``self`` when there are none."""
        self.check_names(overrides)
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def merged(cls: type[S], config: S | None = None, **overrides: Any) -> S:
        """``config`` (or the defaults) with ``overrides`` applied: the one merge of a facade method's
        ``config=`` and keyword settings."""
        if config is None:
            cls.check_names(overrides)
            return cls(**overrides)
        if not isinstance(config, cls):
            raise InvalidArgumentError(f"config must be a {cls.__name__}, got {type(config).__name__}.")
        return config.with_overrides(**overrides)


def field_help(cls: type, name: str) -> str:
    """The ``help`` text of a settings field (for CLI flags and docs)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)
