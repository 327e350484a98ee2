"""Where a weights-only analysis reads from: a local checkpoint directory, or only the needed files of a Hub repo.

For a Hub id, ``config.json`` and ``model.safetensors.index.json`` come first; the index says which shards
hold the attention projections and the norms folded into them, and only those shards are downloaded
(for Llama-3-70B about 24 GB of its 140 GB; MLP-only shards are skipped). A repo without an index has
one ``model.safetensors``, downloaded whole.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path

from ..core.checkpoint_layout import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, needed_tensor_names, read_checkpoint_config
from ..errors import ModelFileError
from .hub import resolve_local_or_hub

__all__ = ["checkpoint_directory"]

logger = logging.getLogger(__name__)


def checkpoint_directory(source: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                         endpoint: str | None = None) -> Path:
    """``source`` if it is a directory, else the local snapshot of Hub repo ``source`` holding its config,
    index and the shards with attention weights (downloaded through the huggingface_hub cache)."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists():
        raise ModelFileError(f"{source} is a file; pass the checkpoint directory that holds config.json.")
    kw = dict(revision=revision, token=token, endpoint=endpoint)
    folder = resolve_local_or_hub(source, allow_patterns=[CONFIG_FILE, INDEX_FILE], **kw)
    config, spec = read_checkpoint_config(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        folder = resolve_local_or_hub(source, allow_patterns=[SINGLE_FILE], **kw)
        if not (folder / SINGLE_FILE).is_file():
            raise ModelFileError(f"Hub repo {source!r} has neither {INDEX_FILE} nor {SINGLE_FILE}: weights-only "
                                 "analysis reads safetensors checkpoints.")
        return folder
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{index} is not a safetensors index ({exc}).") from exc
    shards = sorted({weight_map[n] for n in needed_tensor_names(config, spec, weight_map, index)})
    logger.info("downloading %d of %d shards of %s (the ones holding attention weights)", len(shards),
                len(set(weight_map.values())), source)
    return resolve_local_or_hub(source, allow_patterns=[glob.escape(s) for s in shards], **kw)
