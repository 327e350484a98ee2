"""One helper for progress bars (tqdm), disabled with ``TH_EDIT_DISABLE_PROGRESS=1`` or ``progress=False``."""

from __future__ import annotations

import os
from typing import Any


def progress_bar(*, total: int, desc: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar writing to stderr; silent when disabled by argument or environment."""
    from tqdm.auto import tqdm

    disable = not enabled or os.environ.get("TH_EDIT_DISABLE_PROGRESS", "") not in ("", "0")
    return tqdm(total=total, desc=desc, disable=disable, leave=False)
