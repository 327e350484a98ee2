"""Old import paths that keep working for one release, with a :class:`DeprecationWarning`.

A module that moved leaves a two-line stub at its old path whose module-level ``__getattr__`` (PEP 562)
forwards every attribute to the new module and warns once per name::

    from ..utils.deprecation import forward_module
    __getattr__ = forward_module(__name__, "th_edit.analysis.circuit_discovery")

The stub imports nothing at load time, so it adds no import edge and no doctest; the old names are removed
in the release after the one that moved them.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

__all__ = ["forward_module", "moved_attribute", "renamed_attributes", "REMOVED_IN"]

#: the release in which the old paths go away
REMOVED_IN = "0.4"


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in th_edit {REMOVED_IN}: use {new}.",
                  DeprecationWarning, stacklevel=3)


def moved_attribute(old_module: str, name: str, new_module: str) -> Any:
    """``new_module.name``, with a warning that ``old_module.name`` moved there."""
    _warn(f"{old_module}.{name}", f"{new_module}.{name}")
    return getattr(importlib.import_module(new_module), name)


def forward_module(old_module: str, new_module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that forwards every name of ``old_module`` to ``new_module`` (with a warning).

    >>> getattr_ = forward_module("th_edit.old_place", "th_edit.errors")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     getattr_("ThEditError").__name__, caught[0].category.__name__
    ('ThEditError', 'DeprecationWarning')
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return moved_attribute(old_module, name, new_module)
        except AttributeError:
            raise AttributeError(f"module {old_module!r} (moved to {new_module!r}) has no attribute {name!r}") from None

    return __getattr__


def renamed_attributes(module: str, renames: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that answers each old name in ``renames`` with its new name's value (warning).

    >>> getattr_ = renamed_attributes("th_edit.errors", {"OldError": "ThEditError"})
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     getattr_("OldError").__name__
    'ThEditError'
    """

    def __getattr__(name: str) -> Any:
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        _warn(f"{module}.{name}", f"{module}.{renames[name]}")
        return getattr(importlib.import_module(module), renames[name])

    return __getattr__
