"""The manifest of an output directory: which files th_edit wrote there, and proof that they are unchanged.

``.th_edit_manifest.json`` (schema 2) records, for every file a save wrote, its SHA-256 and size, and the
inode of the directory it was written into::

    {"written_by": "th_edit", "version": 2, "directory_id": "1234567",
     "files": {"config.json": {"sha256": "...", "size": 812}, ...}}

A manifest is *trusted* only in the directory it was written into (same ``directory_id``): one copied,
downloaded or crafted elsewhere proves nothing. Even then a listed file counts as th_edit's
(:meth:`Manifest.owns`) only if it is a plain file strictly inside the directory (no symbolic link on
the way, a canonical relative name: ``./a.txt``, ``b.txt/``, ``a/../b`` are refused) whose bytes still have
the recorded hash. Only such files are ever removed or replaced without ``overwrite``, or uploaded by
``push``. Manifests of older th_edit versions (a plain list of names, no hashes) prove nothing: their
directory is treated like any other the user owns. The manifest itself is never uploaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = ["MANIFEST", "Manifest", "read_manifest", "write_manifest", "canonical_name", "plain_file_inside",
           "sha256_file", "directory_id"]

logger = logging.getLogger(__name__)

#: the file listing what th_edit wrote into an output directory
MANIFEST = ".th_edit_manifest.json"
MANIFEST_VERSION = 2


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def directory_id(directory: str | os.PathLike) -> str:
    """The identity a manifest is bound to: the directory's inode number (unchanged by a rename,
    different for a copy or a download)."""
    return str(os.stat(directory).st_ino)


def canonical_name(name: object) -> str | None:
    """``name`` if it is a canonical relative POSIX path (no ``.``/``..``/empty parts, no trailing ``/``,
    no backslash or NUL, not absolute), else None."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or path.as_posix() != name or any(p in (".", "..") for p in path.parts):
        return None
    return name


def plain_file_inside(directory: Path, name: str) -> Path | None:
    """``directory / name`` if every part below ``directory`` is a real directory (no symbolic link) and
    the last is a regular file; else None. ``name`` must be canonical (:func:`canonical_name`)."""
    if canonical_name(name) is None:
        return None
    path = directory
    parts = PurePosixPath(name).parts
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if not (stat.S_ISREG(mode) if i == len(parts) - 1 else stat.S_ISDIR(mode)):
            return None
    return path


@dataclass
class Manifest:
    """A parsed manifest. ``files`` maps each canonical name to ``(sha256, size)`` (``None`` for entries of an
    old manifest without hashes); ``trusted`` says whether it was written into this very directory;
    ``reason`` says why not; ``refused`` lists entries dropped as malformed or non-canonical."""

    directory: Path
    files: dict[str, tuple[str, int] | None]
    trusted: bool
    reason: str = ""
    refused: list[str] = field(default_factory=list)

    def owns(self, name: str) -> bool:
        """True if ``name`` is a file th_edit provably wrote here and nobody changed since."""
        record = self.files.get(name) if self.trusted else None
        path = plain_file_inside(self.directory, name) if record else None
        if path is None:
            return False
        digest, size = record
        return path.stat().st_size == size and sha256_file(path) == digest


def _entries(files: object) -> tuple[dict[str, tuple[str, int] | None], list[str], bool] | None:
    """Parse the ``files`` field (v2 dict or v1 list) into ``(entries, refused, hashed)``."""
    entries: dict[str, tuple[str, int] | None] = {}
    refused: list[str] = []
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        for f in files:
            if canonical_name(f) is None:
                refused.append(f)
            elif f != MANIFEST:
                entries[f] = None
        return entries, refused, False
    if not isinstance(files, dict):
        return None
    for f, rec in files.items():
        ok = (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
              and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool))
        if canonical_name(f) is None or not ok or f == MANIFEST:
            refused.append(str(f))
        else:
            entries[f] = (rec["sha256"].lower(), rec["size"])
    return entries, refused, True


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """The manifest of ``directory`` (None if it has none, or one that is not a th_edit manifest)."""
    directory = Path(directory)
    path = plain_file_inside(directory, MANIFEST)
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    parsed = _entries(data.get("files")) if isinstance(data, dict) else None
    if parsed is None:
        return None
    entries, refused, hashed = parsed
    if refused:
        logger.warning("%s: ignoring %d manifest entr(y/ies) that are not plain names inside the directory: %s",
                       directory, len(refused), ", ".join(map(repr, refused[:5])))
    if not hashed:
        reason = "its manifest was written by an older th_edit and records no hashes, so no file can be proven th_edit's"
    elif data.get("directory_id") != directory_id(directory):
        reason = "its manifest was written in another directory (copied or downloaded), so it proves nothing here"
    else:
        reason = ""
    return Manifest(directory, entries, trusted=not reason, reason=reason, refused=refused)


def write_manifest(staging: Path, names: list[str], target: Path) -> None:
    """Write the manifest of ``names`` (staged in ``staging``, to be moved into ``target``) into ``staging``."""
    files = {}
    for name in names:
        path = staging / name
        files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    data = {"written_by": "th_edit", "version": MANIFEST_VERSION, "directory_id": directory_id(target),
            "files": files}
    (staging / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
