"""Deprecated: moved to :mod:`th_edit.app.demo_checks` (this path goes in th_edit 0.4)."""

from ..utils.deprecation import forward_module

__getattr__ = forward_module(__name__, "th_edit.app.demo_checks")
