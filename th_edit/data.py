"""Public face of :mod:`th_edit.tasks.data` (datasets) and :mod:`th_edit.sharing.datasets` (disk and Hub).

>>> from th_edit.data import laundry_list
>>> laundry_list(None, lengths=[3], n_per_length=4, seed=0)["test"][0]["list_length"]
3
"""

from .sharing.datasets import load_task, push_task, save_task
from .tasks.data import *  # noqa: F401,F403
from .tasks.data import __all__ as _data_all

__all__ = [*_data_all, "save_task", "load_task", "push_task"]
