"""Atomic writes on disk: whole directories and named files, replaced only once the new ones are complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import HubError

__all__ = ["atomic_directory", "replace_files"]


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target`` as a whole.

    The staging directory sits beside ``target`` (same file system, so the swap is two renames). If the
    body raises, the staging directory is removed and ``target`` is left exactly as it was. The old
    ``target`` is kept as a backup until the new one is in place and restored if the swap fails.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("hi")
    >>> (root / "out" / "a.txt").read_text()
    'hi'
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HubError(f"{target} exists and is not a directory; choose another output path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        backup = target.parent / f".{target.name}.old-{staging.name[-8:]}"
        had_old = target.exists()
        if had_old:
            os.replace(target, backup)
        try:
            os.replace(staging, target)
        except BaseException:
            if had_old:
                os.replace(backup, target)
            raise
        if had_old:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_files(staging: Path, directory: Path, names: tuple[str, ...]) -> None:
    """Move ``names`` from ``staging`` into ``directory``, restoring the old files on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.bak-", dir=directory.parent))
    moved: list[str] = []
    try:
        for name in names:
            if (directory / name).exists():
                os.replace(directory / name, backup / name)
        for name in names:
            os.replace(staging / name, directory / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            (directory / name).unlink(missing_ok=True)
        for name in names:
            if (backup / name).exists():
                os.replace(backup / name, directory / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
