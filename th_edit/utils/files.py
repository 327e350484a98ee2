"""Safe writes on disk: output directories that th_edit shares with the user's own files.

:func:`atomic_directory` stages the files a save writes, then moves them into the target directory one
by one, beside whatever else is there, the way ``transformers``' ``save_pretrained`` does. Nothing
th_edit did not write is ever deleted: a manifest (:data:`MANIFEST`) lists what th_edit wrote, so a
later save may remove its own stale files (old shards) and nothing else. A non-empty directory without
a manifest is refused unless ``overwrite=True``. On any failure the replaced files are restored;
a staging directory left by a save that was killed is removed by the next save into that directory.
The staging directory sits inside the target (same file system, works on a mount point or under a
read-only parent) and falls back to the system temp directory. Modes follow the umask.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import HubError, OutputDirectoryError

__all__ = ["MANIFEST", "atomic_directory", "replace_files", "read_manifest", "check_not_overlapping",
           "clean_abandoned_staging"]

logger = logging.getLogger(__name__)

#: the file listing what th_edit wrote into an output directory (relative POSIX paths)
MANIFEST = ".th_edit_manifest.json"
_STAGING_PREFIX = ".th_edit-staging-"


def read_manifest(directory: str | os.PathLike) -> list[str] | None:
    """The files th_edit wrote into ``directory`` (from its manifest), or None if it has no valid one."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if f and not f.startswith("/") and ".." not in Path(f).parts]


def check_not_overlapping(target: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """Raise :class:`OutputDirectoryError` if ``target`` is, contains or lies inside ``source``."""
    if source is None or not Path(source).exists():
        return
    t, s = Path(target).resolve(), Path(source).resolve()
    if t == s or s.is_relative_to(t) or t.is_relative_to(s):
        raise OutputDirectoryError(
            f"the output directory {target} overlaps the source model directory {source}: saving there would "
            "overwrite the base model. Choose an output directory outside the source model's directory."
        )


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"{target} exists and is not a directory; choose another output path.")
    if overwrite or not target.is_dir() or read_manifest(target) is not None:
        return
    foreign = [p.name for p in target.iterdir() if not p.name.startswith(_STAGING_PREFIX)]
    if foreign:
        raise OutputDirectoryError(
            f"{target} is not empty and was not written by th_edit (it holds {', '.join(sorted(foreign)[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}). Choose an empty or new directory, or pass overwrite=True "
            "(--overwrite) to write beside those files (only the files th_edit writes are replaced)."
        )


def _owner_tag() -> str:
    """``<host hash>-<pid>-``: names this process's staging directories, so that a later save can tell
    an abandoned one (its process was killed) from one in use."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_abandoned_staging(target: Path) -> list[Path]:
    """Remove staging directories that an earlier th_edit save on this host left in ``target`` when its
    process was killed (SIGKILL, power loss) before it could clean up; returns those removed.

    Only directories named by :func:`_owner_tag` for this host whose process no longer exists are
    removed: they hold copies th_edit wrote and never moved into place. A set-aside directory
    (``...-old-...``) of a save killed while committing may hold the only copy of replaced files: it is
    never removed; a warning names it."""
    removed: list[Path] = []
    if not target.is_dir():
        return removed
    host = _owner_tag().split("-")[0]
    for entry in target.iterdir():
        if not entry.name.startswith(_STAGING_PREFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        parts = entry.name[len(_STAGING_PREFIX):].split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        if parts[2] == "old":
            logger.warning("%s holds files an interrupted th_edit save set aside (it was killed while replacing "
                           "them); check them and move back what you need, then delete it.", entry)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logger.info("removed %s, left by a th_edit save that was killed", entry)
    return removed


def _make_staging(target: Path) -> Path:
    """A staging directory inside ``target`` (same file system), else in the system temp directory."""
    try:
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + _owner_tag(), dir=target))
    except OSError as exc:
        logger.debug("cannot stage inside %s (%s); staging in the temp directory", target, exc)
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + _owner_tag()))


def _move(src: Path, dst: Path) -> None:
    """``os.replace`` (atomic per file), falling back to a copy across file systems."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.move(str(src), str(dst))


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdirs(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents (modes from the umask); return those created, top first."""
    created = []
    for d in reversed([directory, *directory.parents]):
        if not d.exists():
            d.mkdir()
            created.append(d)
    return created


def _staged_files(staging: Path) -> list[str]:
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() or p.is_symlink())


def _commit(staging: Path, target: Path, names: Iterable[str], stale: Iterable[str]) -> None:
    """Move ``names`` from ``staging`` into ``target`` and set aside ``stale``; undo it all on failure."""
    backup = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + _owner_tag() + "old-", dir=target))
    saved: list[str] = []
    moved: list[str] = []
    try:
        for name in [*stale, *names]:
            dst = target / name
            if dst.is_dir() and not dst.is_symlink():
                raise OutputDirectoryError(f"{dst} is a directory, but th_edit needs to write a file there; "
                                           "move it away or choose another output directory.")
            if dst.exists() or dst.is_symlink():
                (backup / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(dst, backup / name)
                saved.append(name)
        mode = 0o666 & ~_umask()  # libraries write some files 0600 (temp file + rename): use the umask
        for name in names:
            _mkdirs((target / name).parent)
            _move(staging / name, target / name)
            moved.append(name)
            with contextlib.suppress(OSError):
                os.chmod(target / name, mode)
    except BaseException:
        for name in moved:
            (target / name).unlink(missing_ok=True)
        for name in saved:
            os.replace(backup / name, target / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     protect: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty staging directory; on success its files are moved into ``target``.

    Files already in ``target`` that the save does not write stay untouched; files of an earlier th_edit
    save (listed in its manifest) that this save does not write again are removed. A non-empty
    ``target`` without a manifest raises :class:`OutputDirectoryError` unless ``overwrite``; so does a
    ``target`` overlapping ``protect`` (the source model directory). If the body or a move fails,
    ``target`` is left as it was (a directory created for the save is removed again).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("hi")
    >>> (root / "out" / "a.txt").read_text()
    'hi'
    """
    target = Path(target)
    check_not_overlapping(target, protect)
    _check_target(target, overwrite)
    try:
        created = _mkdirs(target)
    except OSError as exc:
        raise HubError(f"cannot create the output directory {target}: {exc}. Choose a writable location.") from exc
    clean_abandoned_staging(target)
    staging = None
    try:
        try:
            staging = _make_staging(target)
        except OSError as exc:
            raise HubError(f"cannot write into {target} or the temp directory: {exc}. "
                           "Choose a writable output directory.") from exc
        yield staging
        (staging / MANIFEST).unlink(missing_ok=True)
        names = _staged_files(staging)
        (staging / MANIFEST).write_text(json.dumps({"written_by": "th_edit", "files": [*names, MANIFEST]},
                                                   indent=1) + "\n")
        old = set(read_manifest(target) or ())
        stale = sorted(n for n in old - set(names) - {MANIFEST} if (target / n).is_file())
        _commit(staging, target, [*names, MANIFEST], stale)
        created = []
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def replace_files(staging: Path, directory: Path, names: tuple[str, ...]) -> None:
    """Move ``names`` from ``staging`` into ``directory``, restoring the old files on failure.

    Nothing else in ``directory`` is touched (used for plans, which may sit beside any files)."""
    directory.mkdir(parents=True, exist_ok=True)
    _commit(staging, directory, list(names), ())
