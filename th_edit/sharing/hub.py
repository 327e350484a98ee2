"""Thin Hub layer: folder pushes and plan resolution (a local directory or a repo id).

Everything here goes through the real ``huggingface_hub`` client; the endpoint is the client's own
(``HF_ENDPOINT``) unless one is passed. Under Accelerate only the main process writes or pushes; the
others wait at a barrier and receive nothing.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import HubError
from ..utils.distributed import is_main_process, wait_for_everyone

__all__ = ["push_folder", "resolve_local_or_hub"]

logger = logging.getLogger("th_edit")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
