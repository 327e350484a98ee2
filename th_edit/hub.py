"""Thin Hub and disk layer: atomic directory writes, folder pushes, plan resolution, main-process gating.

Everything here goes through the real ``huggingface_hub`` client; the endpoint is the client's own
(``HF_ENDPOINT``) unless one is passed. Under Accelerate only the main process writes or pushes; the
others wait at a barrier and receive nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import HubError

__all__ = [
    "atomic_directory", "push_folder", "resolve_local_or_hub", "distributed_state", "is_main_process", "wait_for_everyone",
]

logger = logging.getLogger("th_edit")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def distributed_state():
    """Accelerate's ``PartialState`` for this launch, or None in a single process.

    On machines without CUDA the processes talk over gloo (``PartialState(cpu=True)``), so
    ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``) also splits work over CPU processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def is_main_process() -> bool:
    """True outside distributed runs, and on the main process of an Accelerate launch."""
    state = distributed_state()
    return state is None or state.is_main_process


def wait_for_everyone() -> None:
    """Barrier across Accelerate processes (no-op in a single process)."""
    state = distributed_state()
    if state is not None:
        state.wait_for_everyone()


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


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"repo_id={repo_id!r} is not a Hub repository id; use 'name' or 'owner/name'.")


def _explain(exc: Exception, action: str, repo_id: str) -> HubError:
    """Turn a huggingface_hub HTTP error into a :class:`HubError` that says what to do."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        fix = "pass a write token (token=... or --token), or log in with `hf auth login`"
    elif status == 404:
        fix = "check the repository id and revision"
    elif status == 412:
        fix = "the repository changed during the upload; push again"
    else:
        fix = "nothing was committed; push again to retry (uploaded files are not sent twice)"
    return HubError(f"{action} {repo_id!r} failed (HTTP {status}): {fix}. Server said: {exc}")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with th_edit",
    endpoint: str | None = None,
):
    """Create ``repo_id`` if needed and upload ``folder`` to it in a single commit.

    Files unchanged on the Hub are skipped; a push with no changes makes no commit. Returns the
    ``CommitInfo`` (``None`` on non-main processes). Raises :class:`HubError` on HTTP errors.
    """
    _check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory; save the model or plan there first.")
    commit = None
    if is_main_process():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        except HfHubHTTPError as exc:
            raise _explain(exc, "creating", repo_id) from exc
        try:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                commit_message=commit_message,
            )
        except HfHubHTTPError as exc:
            raise _explain(exc, "uploading to", repo_id) from exc
        logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(commit, "oid", "?"))
    wait_for_everyone()
    return commit


def resolve_local_or_hub(
    source: str | os.PathLike,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    repo_type: str = "model",
    endpoint: str | None = None,
) -> Path:
    """A local directory as is, else download ``allow_patterns`` of Hub repo ``source`` and return the
    snapshot directory."""
    path = Path(source)
    if path.is_dir():
        return path
    source = str(source)
    if not _REPO_ID.match(source):
        raise HubError(f"{source!r} is neither an existing directory nor a Hub repository id ('owner/name').")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            source, repo_type=repo_type, revision=revision, token=token, allow_patterns=allow_patterns,
            endpoint=endpoint,
        ))
    except HfHubHTTPError as exc:
        raise _explain(exc, "downloading", source) from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(
            f"{source!r} is not a local directory and could not be downloaded (offline, or HF_HUB_OFFLINE=1 "
            f"is set): {exc}"
        ) from exc
