"""Validation of edit plans: their files on disk, their factors, and their consistency with a base model.

Called from :meth:`th_edit.edits.plan.EditPlan.load` (structure, tensor hash, dtypes, shapes) and from
``th_edit.sharing.checkpoints.verify_plan`` / ``apply_plan`` (fingerprints present for every edited head,
factors equal to the edit recomputed from the base model's SVD within a tolerance). Every failure is a
:class:`PlanFormatError` or :class:`PlanMismatchError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PlanFormatError, PlanMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.layout import AttentionLayout
    from .plan import Edit, EditPlan

__all__ = ["file_sha256", "read_plan_json", "check_plan_json", "read_plan_tensors", "check_edit_factors", "check_fingerprints",
           "check_consistent", "FACTOR_RTOL"]

logger = logging.getLogger(__name__)

#: relative tolerance between a plan's weight change and the one recomputed from the base model's SVD
FACTOR_RTOL = 1e-3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REMAKE = "Re-export the plan with th_edit from its base model (ChannelEditor.save_plan)."


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
        raise PlanFormatError(f"{path} is not valid JSON ({exc}). {_REMAKE}") from exc
    if not isinstance(data, dict):
        raise PlanFormatError(f"{path} holds a JSON {type(data).__name__}, not an edit plan object. {_REMAKE}")
    return data


def check_plan_json(data: dict[str, Any], path: Path) -> None:
    """The fields every schema version has: ``base_model`` (model type, fingerprints) and ``edits``."""
    base, edits = data.get("base_model"), data.get("edits")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise PlanFormatError(f"{path} has no base_model with a model_type. {_REMAKE}")
    fingerprints = base.get("fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(
        isinstance(k, str) and re.fullmatch(r"\d+\.\d+", k) and isinstance(v, str) and _SHA256.match(v)
        for k, v in fingerprints.items()
    ):
        raise PlanFormatError(f"{path}: base_model.fingerprints must map 'layer.head' to a SHA-256 hex digest. {_REMAKE}")
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise PlanFormatError(f"{path}: 'edits' must be a list of edit objects. {_REMAKE}")


def read_plan_tensors(path: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The factors file, checked against the SHA-256 the JSON records (plans without one get a warning)."""
    expected = data.get("tensors_sha256")
    if expected is not None:
        if not isinstance(expected, str) or file_sha256(path) != expected:
            raise PlanFormatError(
                f"{path} does not match the tensors_sha256 recorded in the plan's JSON: the factors were changed, "
                f"truncated or swapped. Download or copy the plan again. {_REMAKE}"
            )
    else:
        logger.warning("%s: the plan records no tensors_sha256 (written by an older th_edit); its factors are "
                       "checked against the base model when it is applied.", path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ... all mean a corrupt file
        raise PlanFormatError(f"{path} is not a readable safetensors file ({exc}). {_REMAKE}") from exc


def check_edit_factors(edit: "Edit", where: str) -> None:
    """Shapes, dtypes, rank and finiteness of one edit's factors, and its components and singular values."""
    k = len(edit.components)
    problem = None
    if edit.circuit not in ("ov", "qk"):
        problem = f"circuit {edit.circuit!r} is not 'ov' or 'qk'"
    elif k == 0 or len(set(edit.components)) != k or min(edit.components) < 0:
        problem = f"components {list(edit.components)} must be distinct non-negative indices"
    elif len(edit.singular_values) != k:
        problem = f"{len(edit.singular_values)} singular values for {k} components"
    else:
        for name in ("left", "right"):
            t = getattr(edit, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim != 2 or t.shape[1] != k:
                desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                problem = f"factor {name} is {desc}; expected float32 [n, {k}] (one column per component)"
                break
            if not torch.isfinite(t).all():
                problem = f"factor {name} holds non-finite values"
                break
    if problem:
        raise PlanFormatError(f"{where}: edit of layer {edit.layer} head {edit.head}: {problem}. {_REMAKE}")


def check_fingerprints(plan: "EditPlan") -> None:
    """Every edited head must carry the fingerprint of its base weights (plans without one are refused)."""
    missing = sorted({f"{e.layer}.{e.head}" for e in plan.edits} - set(plan.base.fingerprints))
    if missing:
        raise PlanMismatchError(
            f"the plan has no base-model fingerprint for head(s) {', '.join(missing)}, so it cannot be checked "
            f"against this model. {_REMAKE} Or pass verify=False to apply it unchecked."
        )


def check_consistent(layout: "AttentionLayout", edit: "Edit") -> None:
    """Raise :class:`PlanMismatchError` unless ``edit``'s factors equal the edit recomputed from the current
    weights' SVD (same components, alpha and folding) within :data:`FACTOR_RTOL`."""
    from .scale import make_edit

    target = layout.target(edit.layer, edit.head, edit.circuit)
    if tuple(edit.delta().shape) != tuple(target.shape):
        raise PlanMismatchError(
            f"the edit of layer {edit.layer} head {edit.head} changes a {tuple(edit.delta().shape)} block but this "
            f"model's {edit.target} is {tuple(target.shape)}: the plan was made for a different geometry."
        )
    alphas = getattr(edit, "alphas", None)  # per-component scales (learned edits), when the Edit has them
    if alphas is not None:
        expected = make_edit(layout, edit.layer, edit.head, edit.circuit, list(edit.components), edit.alpha,
                             folded=edit.folded, alphas=alphas)
    else:
        expected = make_edit(layout, edit.layer, edit.head, edit.circuit, list(edit.components), edit.alpha,
                             folded=edit.folded)
    if tuple(expected.components) != tuple(edit.components) or (alphas is not None and edit.alpha != 1.0):
        raise PlanMismatchError(
            f"the edit of layer {edit.layer} head {edit.head} lists components {list(edit.components)} with alpha "
            f"{edit.alpha}{'' if alphas is None else f' and alphas {list(alphas)}'}: th_edit writes components in "
            "ascending order and alpha 1.0 beside per-component alphas, so the plan was altered. "
            f"{_REMAKE} Or pass verify=False to apply it unchecked."
        )
    want, got = expected.delta(), edit.delta()
    scale = float(want.norm()) + 1e-6 * float(target.detach().float().norm())
    err = float((got - want).norm())
    if err > FACTOR_RTOL * max(scale, 1e-12):
        raise PlanMismatchError(
            f"the factors of the edit of layer {edit.layer} head {edit.head} ({edit.circuit}, components "
            f"{list(edit.components)}, alpha {edit.alpha}) do not match that rescaling of this model's circuit "
            f"(relative difference {err / max(scale, 1e-12):.2e}): the plan was altered or made on other weights. "
            f"{_REMAKE} Or pass verify=False to apply it unchecked."
        )
