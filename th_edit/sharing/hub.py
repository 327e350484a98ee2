"""Thin Hub layer: folder pushes and plan resolution (a local directory or a repo id).

Everything here goes through the real ``huggingface_hub`` client; the endpoint is the client's own
(``HF_ENDPOINT``) unless one is passed. Under Accelerate only the main process reads the folder and
uploads; the others wait and return the same commit (or raise the same error). What a push uploads:
:func:`files_to_push` (never the manifest, dotfiles, links or key material).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
from pathlib import Path

from ..errors import HubError
from ..utils.distributed import run_on_main_process
from ..utils.manifest import MANIFEST, plain_file_inside, read_manifest

__all__ = ["push_folder", "resolve_local_or_hub", "files_to_push", "KNOWN_FILES"]

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    why = None
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        why = "use 'name' or 'owner/name' (letters, digits, '-', '_', '.')"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            why = str(exc)
        if repo_id.endswith((".git", ".", "-")) or len(repo_id.split("/")[-1]) > 96:
            why = "a name may not end in '.git', '.' or '-', nor be longer than 96 characters"
    if why:
        raise HubError(f"repo_id={repo_id!r} is not a Hub repository id: {why}.")


#: what a directory without a trusted manifest may upload: files th_edit or transformers write (plans,
#: checkpoints, tokenizers, cards, task datasets); anything else (``.env``, ``secrets/``, notes) stays local
KNOWN_FILES = (
    "README.md", "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "edit_plan.json", "edit_plan.safetensors", "adapter_config.json",
    "adapter_model.safetensors", "data/*.parquet",
)
#: never uploaded, whatever a manifest says: dotfiles (``.env``, ``.git``, the manifest itself) and key material
SECRET_PATTERNS = ("*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_dsa*", "id_ecdsa*",
                   "id_ed25519*", "*.gpg", "*.asc", "*credentials*", "*secret*", "*.token", "hf_token", "*.netrc", "*.pgpass")


def _is_secret(name: str) -> bool:
    parts = name.split("/")
    return any(p.startswith(".") for p in parts) or any(
        fnmatch.fnmatch(parts[-1].lower(), pat) for pat in SECRET_PATTERNS)


def files_to_push(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(upload, left_out)``: the files of ``folder`` th_edit may upload, and the others (relative POSIX
    paths, sorted).

    With a trusted manifest (:mod:`th_edit.utils.manifest`) only the files it lists whose bytes still have
    the recorded hash are uploaded; without one (plans, directories of older th_edit versions), plain files
    named like :data:`KNOWN_FILES`. Never uploaded: symbolic links (or files under one), dotfiles (``.env``,
    ``.git/``), key material (:data:`SECRET_PATTERNS`), and the manifest itself, which is listed in neither.
    """
    folder = Path(folder)
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if (p.is_file() or p.is_symlink()) and p.name != MANIFEST)  # th_edit's bookkeeping, never listed
    manifest = read_manifest(folder)
    trusted = manifest is not None and manifest.trusted
    if manifest is not None and not trusted:
        logger.warning("%s: %s; uploading only files named like th_edit's (KNOWN_FILES).", folder, manifest.reason)
    upload = []
    for f in present:
        if _is_secret(f) or plain_file_inside(folder, f) is None:
            continue
        if manifest.owns(f) if trusted else any(fnmatch.fnmatchcase(f, pat) for pat in KNOWN_FILES):
            upload.append(f)
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

    Only :func:`files_to_push` is uploaded; other files in ``folder`` are left out with a warning that
    names them. Files unchanged on the Hub are skipped; a push with no changes makes no commit. Returns
    the ``CommitInfo``. Raises :class:`HubError` on HTTP or network errors.

    Under Accelerate every process must call this: the main process alone reads ``folder`` (only it
    wrote it) and uploads; the others wait, then return the same commit (or raise the same error).
    """
    _check_repo_id(repo_id)
    return run_on_main_process(lambda: _push_main(
        Path(folder), repo_id, repo_type=repo_type, token=token, private=private, revision=revision,
        commit_message=commit_message, endpoint=endpoint))


def _push_main(folder: Path, repo_id: str, **kwargs):
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory; save the model or plan there first.")
    upload, left_out = files_to_push(folder)
    if not upload:
        raise HubError(f"{folder} holds no file th_edit wrote; save the model, plan or dataset there first.")
    if left_out:
        logger.warning("not uploading %d file(s) of %s (not written by th_edit, changed since, links, dotfiles "
                       "or key material): %s", len(left_out), folder,
                       ", ".join(left_out[:10]) + (", ..." if len(left_out) > 10 else ""))
    commit = _upload(folder, repo_id, upload, **kwargs)
    logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(commit, "oid", "?"))
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
            if _is_transport_error(exc) or _is_transport_error(exc.__cause__ or exc.__context__ or exc):
                raise _network_error(exc, action, repo_id) from exc
            raise HubError(f"{action} {repo_id!r} failed ({type(exc).__name__}: {exc}). Nothing was committed; "
                           "push again to retry.") from exc
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
    if not _REPO_ID.fullmatch(source):
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
