"""Safe writes on disk: output directories that th_edit shares with the user's own files.

:func:`atomic_directory` stages the files a save writes, then moves them into the target directory one
by one, beside whatever else is there, the way ``transformers``' ``save_pretrained`` does. Nothing
th_edit cannot prove it wrote is ever deleted: the manifest (:mod:`th_edit.utils.manifest`) records the
SHA-256 of every file a save wrote, so a later save removes its own stale files (old shards) only while
their bytes are unchanged, and replaces an existing file without ``overwrite`` only under the same proof.
A non-empty directory without a trusted manifest is refused unless ``overwrite=True``; names inside the
directory are never followed through a symbolic link. Saves into one directory are serialised by an
advisory lock on it (``flock``; a second save waits for the first). On any failure the replaced files
are restored; a staging directory left by a save that was killed is removed by the next save into that
directory. The staging directory sits inside the target (same file system, works on a mount point or
under a read-only parent) and falls back to the system temp directory. Modes follow the umask.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..errors import HubError, OutputDirectoryError
from .manifest import MANIFEST, Manifest, read_manifest, write_manifest

__all__ = ["MANIFEST", "atomic_directory", "replace_files", "read_manifest", "check_not_overlapping",
           "clean_abandoned_staging", "directory_lock", "check_output_directory"]

logger = logging.getLogger(__name__)

_STAGING_PREFIX = ".th_edit-staging-"


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


def _check_target(target: Path, overwrite: bool, manifest: Manifest | None) -> None:
    """Refuse a non-empty ``target`` without a trusted manifest, unless ``overwrite``."""
    if overwrite or not target.is_dir() or (manifest is not None and manifest.trusted):
        return
    foreign = [p.name for p in target.iterdir() if not p.name.startswith(_STAGING_PREFIX)]
    if foreign:
        why = f"th_edit cannot prove it wrote them ({manifest.reason})" if manifest else "it was not written by th_edit"
        raise OutputDirectoryError(
            f"{target} is not empty and {why}: it holds {', '.join(sorted(foreign)[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}. Choose an empty or new directory, or pass overwrite=True "
            "(--overwrite) to write beside those files (only the files th_edit writes are replaced)."
        )


def check_output_directory(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise :class:`OutputDirectoryError` now if a save into ``target`` would be refused (checked again
    when saving): lets a command refuse before a long computation instead of after it."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"{target} exists and is not a directory; choose another output path.")
    _check_target(target, overwrite, read_manifest(target) if target.is_dir() else None)


def _check_names(target: Path, names: Iterable[str], overwrite: bool, manifest: Manifest | None) -> None:
    """Refuse to write through a symbolic link (or a file) inside ``target``, and, without ``overwrite``,
    to replace a file th_edit cannot prove it wrote."""
    conflicts = []
    for name in names:
        path = target
        for part in PurePosixPath(name).parts[:-1]:
            path = path / part
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise OutputDirectoryError(
                    f"{path} is {'a symbolic link' if path.is_symlink() else 'not a directory'}, but th_edit needs "
                    f"to write {name} inside it; th_edit never writes through links. Replace it with a plain "
                    "directory or choose another output directory."
                )
        dst = target / name
        if (dst.exists() or dst.is_symlink()) and not (manifest is not None and manifest.owns(name)):
            conflicts.append(name)
    if conflicts and not overwrite:
        raise OutputDirectoryError(
            f"{target} holds {', '.join(conflicts[:5])}{', ...' if len(conflicts) > 5 else ''}, which this save "
            "would replace, but th_edit cannot prove it wrote them (changed since, or not listed with a matching "
            "hash in its manifest). Move them away, or pass overwrite=True (--overwrite) to replace them."
        )


def _stale(target: Path, names: Iterable[str], manifest: Manifest | None) -> list[str]:
    """Files of the previous save that this one does not write again and that th_edit provably wrote;
    the other listed files are left (with a warning)."""
    if manifest is None:
        return []
    old = sorted(set(manifest.files) - set(names))
    stale = [n for n in old if manifest.owns(n)]
    kept = [n for n in old if n not in stale and (target / n).exists()]
    if kept:
        logger.warning("%s: leaving %d file(s) an earlier save listed but th_edit cannot prove it wrote (%s): %s",
                       target, len(kept), manifest.reason or "changed since, or not plain files",
                       ", ".join(kept[:10]))
    return stale


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``directory`` (which must exist); a second holder
    waits. Where locks are unsupported (no ``fcntl``, some network file systems) this is a no-op."""
    try:
        import fcntl
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError) as exc:
        logger.debug("cannot lock %s (%s); writing without a lock", directory, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another th_edit process is writing into %s; waiting for it to finish", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.debug("cannot lock %s (%s); writing without a lock", directory, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


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
    save that this save does not write again are removed if th_edit provably wrote them (manifest hash).
    A non-empty ``target`` without a trusted manifest raises :class:`OutputDirectoryError` unless
    ``overwrite``; so does replacing a file th_edit cannot prove it wrote, writing through a symbolic
    link inside ``target``, or a ``target`` overlapping ``protect`` (the source model directory). Saves into
    one ``target`` wait for each other (:func:`directory_lock`). If the body or a move fails, ``target``
    is left as it was (a directory created for the save is removed again).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("hi")
    >>> (root / "out" / "a.txt").read_text()
    'hi'
    """
    target = Path(target)
    check_not_overlapping(target, protect)
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"{target} exists and is not a directory; choose another output path.")
    try:
        created = _mkdirs(target)
    except OSError as exc:
        raise HubError(f"cannot create the output directory {target}: {exc}. Choose a writable location.") from exc
    staging = None
    try:
        with directory_lock(target):
            _check_target(target, overwrite, read_manifest(target))
            clean_abandoned_staging(target)
            try:
                staging = _make_staging(target)
            except OSError as exc:
                raise HubError(f"cannot write into {target} or the temp directory: {exc}. "
                               "Choose a writable output directory.") from exc
            yield staging
            (staging / MANIFEST).unlink(missing_ok=True)
            names = _staged_files(staging)
            manifest = read_manifest(target)  # again: another save may have finished while this one waited
            _check_names(target, names, overwrite, manifest)
            stale = _stale(target, names, manifest)
            write_manifest(staging, names, target)
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
