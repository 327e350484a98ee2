"""Thin Hub layer: folder pushes and plan resolution (a local directory or a repo id).

Everything here goes through the real ``huggingface_hub`` client; the endpoint is the client's own
(``HF_ENDPOINT``) unless one is passed. Under Accelerate only the main process writes or pushes; the
others wait at a barrier and receive nothing.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
from pathlib import Path

from ..errors import HubError
from ..utils.distributed import is_main_process, wait_for_everyone
from ..utils.files import MANIFEST, read_manifest

__all__ = ["push_folder", "resolve_local_or_hub", "files_to_push", "KNOWN_FILES"]

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"repo_id={repo_id!r} is not a Hub repository id; use 'name' or 'owner/name'.")


#: what a directory without a manifest may upload: files th_edit or transformers write (plans, checkpoints,
#: tokenizers, cards, task datasets); anything else (``.env``, ``secrets/``, notes) stays local
KNOWN_FILES = (
    "README.md", "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "edit_plan.json", "edit_plan.safetensors", "adapter_config.json",
    "adapter_model.safetensors", "data/*.parquet", MANIFEST,
)


def files_to_push(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(upload, left_out)``: the files of ``folder`` th_edit wrote (its manifest, else :data:`KNOWN_FILES`)
    and the others, which are never uploaded (relative POSIX paths, sorted)."""
    folder = Path(folder)
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    manifest = read_manifest(folder)
    if manifest is not None:
        wanted = set(manifest) | {MANIFEST}
        upload = [f for f in present if f in wanted]
    else:
        upload = [f for f in present if any(fnmatch.fnmatchcase(f, pat) for pat in KNOWN_FILES)]
    return upload, [f for f in present if f not in set(upload)]


def _is_transport_error(exc: BaseException) -> bool:
    """A refused, reset or dropped connection (OSError, or an httpx transport error, which is none)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "h11")


def _network_error(exc: BaseException, action: str, repo_id: str) -> HubError:
    return HubError(
        f"{action} {repo_id!r} failed: the Hub endpoint could not be reached or dropped the connection "
        f"({type(exc).__name__}: {exc}). Check the network and HF_ENDPOINT, then retry; nothing was committed."
    )


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
    """Create ``repo_id`` if needed and upload the files th_edit wrote in ``folder`` in a single commit.

    Only :func:`files_to_push` is uploaded; other files in ``folder`` are left out with a warning.
    Files unchanged on the Hub are skipped; a push with no changes makes no commit. Returns the
    ``CommitInfo`` (``None`` on non-main processes). Raises :class:`HubError` on HTTP or network errors.
    """
    _check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory; save the model or plan there first.")
    upload, left_out = files_to_push(folder)
    if not upload:
        raise HubError(f"{folder} holds no file th_edit wrote; save the model, plan or dataset there first.")
    if left_out:
        logger.warning("not uploading %d file(s) th_edit did not write in %s: %s", len(left_out), folder,
                       ", ".join(left_out[:10]) + (", ..." if len(left_out) > 10 else ""))
    commit = None
    if is_main_process():
        commit = _upload(folder, repo_id, upload, repo_type=repo_type, token=token, private=private,
                         revision=revision, commit_message=commit_message, endpoint=endpoint)
        logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(commit, "oid", "?"))
    wait_for_everyone()
    return commit


def _upload(folder: Path, repo_id: str, files: list[str], *, repo_type, token, private, revision, commit_message,
            endpoint):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    for action, call in (
        ("creating", lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)),
        ("uploading to", lambda: api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
            commit_message=commit_message, allow_patterns=[glob.escape(f) for f in files])),
    ):
        try:
            result = call()
        except HfHubHTTPError as exc:
            raise _explain(exc, action, repo_id) from exc
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            raise _network_error(exc, action, repo_id) from exc
    return result


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
    except Exception as exc:
        if not _is_transport_error(exc):
            raise
        raise _network_error(exc, "downloading", source) from exc
