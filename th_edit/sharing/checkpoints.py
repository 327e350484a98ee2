"""Edit plans, native checkpoints and Hub pushes, as free functions on explicit inputs.

Plans: the applied edits with the base model's identity (a SHA-256 per touched head), saved as JSON +
safetensors and verified against the model they are applied to (:func:`verify_plan`, :func:`check_consistent`:
fingerprints present and equal for every edited head, factors equal to the edit recomputed from the base
model's SVD within :data:`FACTOR_RTOL`). Checkpoints: the model's own ``save_pretrained`` plus tokenizer, plan and
model card, written atomically. Hub: one commit per push; :func:`load_plan` takes a directory or a repo id.
Under Accelerate only the main process writes or pushes. :class:`th_edit.ChannelEditor` delegates here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..core.layout import AttentionLayout
from ..edits.plan import PLAN_FILES, BaseModelIdentity, Edit, EditPlan
from ..edits.plan_checks import REMAKE_HINT
from ..edits.scale import EditLog, head_fingerprint, make_edit
from ..errors import OutputDirectoryError, PlanMismatchError
from ..utils.devices import runtime_record
from ..utils.distributed import is_main_process, run_on_main_process
from ..utils.files import atomic_directory
from . import hub
from .bundled_models import published_name
from .cards import CardData, model_card, plan_card

__all__ = ["export_plan", "verify_plan", "apply_plan", "load_plan", "save_plan", "save_pretrained", "push_to_hub",
           "push_plan", "check_fingerprints", "check_consistent", "FACTOR_RTOL"]

logger = logging.getLogger(__name__)

#: relative tolerance between a plan's weight change and the one recomputed from the base model's SVD
FACTOR_RTOL = 1e-3


def check_fingerprints(plan: EditPlan) -> None:
    """Every edited head must carry the fingerprint of its base weights (plans without one are refused)."""
    missing = sorted({f"{e.layer}.{e.head}" for e in plan.edits} - set(plan.base.fingerprints))
    if missing:
        raise PlanMismatchError(
            f"the plan has no base-model fingerprint for head(s) {', '.join(missing)}, so it cannot be checked "
            f"against this model. {REMAKE_HINT} Or pass verify=False to apply it unchecked."
        )


def check_consistent(layout: AttentionLayout, edit: Edit) -> None:
    """Raise :class:`PlanMismatchError` unless ``edit``'s factors equal the edit recomputed from the current
    weights' SVD (same components, alpha and folding) within :data:`FACTOR_RTOL`."""
    target = layout.target(edit.layer, edit.head, edit.circuit)
    if tuple(edit.delta().shape) != tuple(target.shape):
        raise PlanMismatchError(
            f"the edit of layer {edit.layer} head {edit.head} changes a {tuple(edit.delta().shape)} block but this "
            f"model's {edit.target} is {tuple(target.shape)}: the plan was made for a different geometry."
        )
    expected = make_edit(layout, edit.layer, edit.head, edit.circuit, list(edit.components), edit.alpha,
                         folded=edit.folded, alphas=edit.alphas, couplings=edit.couplings)
    if tuple(expected.components) != tuple(edit.components) or (edit.alphas is not None and edit.alpha != 1.0):
        raise PlanMismatchError(
            f"the edit of layer {edit.layer} head {edit.head} lists components {list(edit.components)} with alpha "
            f"{edit.alpha}{'' if edit.alphas is None else f' and alphas {list(edit.alphas)}'}: th_edit writes "
            "components in ascending order and alpha 1.0 beside per-component alphas, so the plan was altered. "
            f"{REMAKE_HINT} Or pass verify=False to apply it unchecked."
        )
    want, got = expected.delta(), edit.delta()
    scale = float(want.norm()) + 1e-6 * float(target.detach().float().norm())
    err = float((got - want).norm())
    if err > FACTOR_RTOL * max(scale, 1e-12):
        raise PlanMismatchError(
            f"the factors of the edit of layer {edit.layer} head {edit.head} ({edit.circuit}, components "
            f"{list(edit.components)}, alpha {edit.alpha}) do not match that rescaling of this model's circuit "
            f"(relative difference {err / max(scale, 1e-12):.2e}): the plan was altered or made on other weights. "
            f"{REMAKE_HINT} Or pass verify=False to apply it unchecked."
        )


def export_plan(model: nn.Module, log: EditLog, *, provenance: dict[str, Any] | None = None) -> EditPlan:
    """The edits of ``log``, in order, with the identity of ``model``'s base weights (its name as published:
    a bundled model's Hub id, never a local path; see :func:`th_edit.sharing.bundled_models.published_name`) and the
    ``provenance`` record (how the edits were made; JSON-serialisable, see :attr:`EditPlan.provenance`)."""
    cfg = model.config
    touched = {f"{e.layer}.{e.head}" for e in log.edits}
    dtype = next(model.parameters()).dtype
    base = BaseModelIdentity(
        model_type=cfg.model_type, name_or_path=published_name(str(getattr(cfg, "_name_or_path", "") or "")),
        revision=getattr(cfg, "_commit_hash", None), dtype=str(dtype).replace("torch.", ""),
        fingerprints={k: v for k, v in sorted(log.fingerprints.items()) if k in touched},
    )
    return EditPlan(base=base, edits=log.edits, provenance=dict(provenance or {}))


def verify_plan(plan: EditPlan, layout: AttentionLayout) -> None:
    """Raise :class:`PlanMismatchError` unless ``plan`` was made on this model's current weights: the model
    type matches and every edited head carries a fingerprint equal to this model's (fingerprints are
    mandatory). The factors are checked against the recomputed SVD as the plan is applied (:func:`apply_plan`)."""
    model_type = layout.model.config.model_type
    if plan.base.model_type != model_type:
        raise PlanMismatchError(
            f"the plan was made for a {plan.base.model_type!r} model "
            f"({plan.base.name_or_path or 'unnamed'}), this model is {model_type!r}."
        )
    check_fingerprints(plan)
    for key, expected in plan.base.fingerprints.items():
        layer, head = (int(x) for x in key.split("."))
        if layer >= layout.n_layers or head >= layout.n_heads:
            raise PlanMismatchError(f"the plan edits layer {layer} head {head}, which this model lacks.")
        if head_fingerprint(layout, layer, head) != expected:
            raise PlanMismatchError(
                f"layer {layer} head {head} of this model differs from the plan's base model "
                f"({plan.base.name_or_path or 'unnamed'}, dtype {plan.base.dtype}). Apply the plan to the "
                "exact base checkpoint it was made on, in the same dtype and without other edits, or pass "
                "verify=False to apply it anyway."
            )


def apply_plan(log: EditLog, plan: EditPlan, *, verify: bool = True) -> list[Edit]:
    """Apply every edit of ``plan`` through ``log``; with ``verify`` check the base model first.

    A mismatch raises :class:`PlanMismatchError` and changes nothing. With ``verify`` each edit's factors
    must also equal the rescaling recomputed from the weights it is applied to (within
    :data:`FACTOR_RTOL`). If an edit fails half-way, the edits of this plan
    already written are undone.
    """
    if verify:
        verify_plan(plan, log.layout)
    applied = 0
    try:
        for edit in plan.edits:
            if verify:
                check_consistent(log.layout, edit)
            log.apply(edit)
            applied += 1
    except BaseException:
        for _ in range(applied):
            log.undo()
        raise
    return plan.edits


def load_plan(source: EditPlan | str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> EditPlan:
    """An :class:`EditPlan` from itself, a local directory, or a Hub repo id (a plan repo, or a full
    checkpoint saved by :func:`save_pretrained`). Only the plan's two files are downloaded."""
    if isinstance(source, EditPlan):
        return source
    folder = hub.resolve_local_or_hub(source, allow_patterns=list(PLAN_FILES), revision=revision, token=token)
    return EditPlan.load(folder)


def save_plan(plan: EditPlan, directory: str | os.PathLike) -> None:
    """Write ``plan`` to ``directory`` (JSON + safetensors, atomic; main process only)."""
    run_on_main_process(lambda: plan.save(directory))


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, *, plan: EditPlan, tokenizer: Any = None,
    card: CardData | None = None, repo_id: str | None = None, overwrite: bool = False, **save_kwargs: Any,
) -> Path:
    """Save ``model`` in native Hugging Face format with tokenizer, model card and edit plan.

    The weights go through the model's own ``save_pretrained`` (safetensors, sharding), so
    ``AutoModelForCausalLM.from_pretrained(directory)`` needs no th_edit. Files are written beside what
    is already in ``directory`` and replaced atomically; files th_edit did not write are never deleted
    (see :func:`th_edit.utils.files.atomic_directory`). A non-empty directory not written by th_edit
    needs ``overwrite=True``; the source model's own directory is refused (:class:`OutputDirectoryError`).
    Main process only.
    """
    directory = Path(directory)
    card = card or CardData()

    _refuse_hub_cache(directory)

    def write() -> None:
        source = getattr(model, "th_edit_source_dir", None) or str(getattr(model.config, "_name_or_path", "") or "") or None
        with atomic_directory(directory, overwrite=overwrite, protect=source) as staging:
            model.save_pretrained(staging, **save_kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            plan.save(staging)
            model_card(plan, repo_id=repo_id, evidence=card.evidence, evaluation=card.evaluation,
                       runtime=runtime_record(model)).save(staging / "README.md")
        logger.info("saved the edited model to %s", directory)

    run_on_main_process(write)  # the others wait, and raise the main process's error if it fails
    return directory


def _refuse_hub_cache(directory: Path) -> None:
    """A save into the Hugging Face download cache would change what ``from_pretrained(repo_id)`` loads."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE).resolve()
    if directory.resolve().is_relative_to(cache):
        raise OutputDirectoryError(
            f"{directory} is inside the Hugging Face download cache ({cache}): saving there would change what "
            "from_pretrained loads for that repository. Choose an output directory outside the cache."
        )


def push_to_hub(
    model: nn.Module, repo_id: str, *, plan: EditPlan, tokenizer: Any = None, card: CardData | None = None,
    token: str | None = None, private: bool | None = None, commit_message: str = "Upload model edited with th_edit",
    **save_kwargs: Any,
):
    """:func:`save_pretrained` into a temporary directory, then upload it to ``repo_id`` in one commit.
    Returns the ``CommitInfo``; raises :class:`HubError` with the fix on a bad token or server error.
    Under Accelerate every process calls it; the main process saves and uploads, and every process
    returns its commit."""
    with tempfile.TemporaryDirectory(prefix="th_edit_push_") as tmp:
        save_pretrained(model, Path(tmp) / "model", plan=plan, tokenizer=tokenizer, card=card, repo_id=repo_id,
                        **save_kwargs)
        return hub.push_folder(Path(tmp) / "model", repo_id, token=token, private=private, commit_message=commit_message)


def push_plan(
    plan: EditPlan, repo_id: str, *, token: str | None = None, private: bool | None = None,
    commit_message: str = "Upload th_edit edit plan",
):
    """Upload ``plan`` alone (JSON + safetensors, a few KB) with a card to ``repo_id``."""
    with tempfile.TemporaryDirectory(prefix="th_edit_plan_") as tmp:
        if is_main_process():  # the main process writes and uploads; the others get its commit
            plan.save(tmp)
            plan_card(plan, repo_id=repo_id).save(Path(tmp) / "README.md")
        return hub.push_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message)
