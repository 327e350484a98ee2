"""File-format checks of edit plans: the JSON object, its required fields, and the factors file against the
SHA-256 the JSON records.

Called from :meth:`th_edit.edits.plan.EditPlan.load` (which also checks each edit's factors with
:func:`th_edit.edits.plan.check_edit_factors`). The checks of a plan against a live model (fingerprints,
factors against the recomputed SVD) live with ``verify_plan`` / ``apply_plan`` in
:mod:`th_edit.sharing.checkpoints`. Every failure is a :class:`PlanFormatError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanFormatError

__all__ = ["file_sha256", "read_plan_json", "check_plan_json", "read_plan_tensors", "REMAKE_HINT"]

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: the fix every plan error names
REMAKE_HINT = "Re-export the plan with th_edit from its base model (ChannelEditor.save_plan)."


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_plan_json(path: Path) -> dict[str, Any]:
    """The plan's JSON object (any schema version; check it with :func:`check_plan_json`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanFormatError(f"{path} is not valid JSON ({exc}). {REMAKE_HINT}") from exc
    if not isinstance(data, dict):
        raise PlanFormatError(f"{path} holds a JSON {type(data).__name__}, not an edit plan object. {REMAKE_HINT}")
    return data


def check_plan_json(data: dict[str, Any], path: Path) -> None:
    """The fields every schema version has: ``base_model`` (model type, fingerprints) and ``edits``."""
    base, edits = data.get("base_model"), data.get("edits")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise PlanFormatError(f"{path} has no base_model with a model_type. {REMAKE_HINT}")
    fingerprints = base.get("fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(
        isinstance(k, str) and re.fullmatch(r"\d+\.\d+", k) and isinstance(v, str) and _SHA256.match(v)
        for k, v in fingerprints.items()
    ):
        raise PlanFormatError(f"{path}: base_model.fingerprints must map 'layer.head' to a SHA-256 hex digest. {REMAKE_HINT}")
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise PlanFormatError(f"{path}: 'edits' must be a list of edit objects. {REMAKE_HINT}")


def read_plan_tensors(path: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The factors file, checked against the SHA-256 the JSON records (plans without one get a warning)."""
    expected = data.get("tensors_sha256")
    if expected is not None:
        if not isinstance(expected, str) or file_sha256(path) != expected:
            raise PlanFormatError(
                f"{path} does not match the tensors_sha256 recorded in the plan's JSON: the factors were changed, "
                f"truncated or swapped. Download or copy the plan again. {REMAKE_HINT}"
            )
    else:
        logger.warning("%s: the plan records no tensors_sha256 (written by an older th_edit); its factors are "
                       "checked against the base model when it is applied.", path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ... all mean a corrupt file
        raise PlanFormatError(f"{path} is not a readable safetensors file ({exc}). {REMAKE_HINT}") from exc
