"""Edit plans, native checkpoints and Hub pushes for :class:`th_edit.ChannelEditor` (a mixin).

Plans: the applied edits with the base model's identity (a SHA-256 per touched head), saved as JSON +
safetensors and verified on load. Checkpoints: the model's own ``save_pretrained`` plus tokenizer, plan and
model card, written atomically. Hub: one commit per push; ``from_plan`` takes a directory or a repo id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cards, hub
from .errors import PlanMismatchError
from .plan import PLAN_FILES, BaseModelIdentity, Edit, EditPlan

__all__ = ["SharingMixin"]

logger = logging.getLogger("th_edit")


class SharingMixin:
    """Plan, checkpoint and Hub methods of :class:`th_edit.ChannelEditor` (needs ``model``, ``edits``,
    ``head_weights``, ``apply_edit``, ``undo``, ``evidence``, ``evaluation``, ``tokenizer``)."""

    # ----- plans --------------------------------------------------------------------------------
    def head_fingerprint(self, layer: int, head: int) -> str:
        """SHA-256 of head ``(layer, head)``'s weights (W_Q, W_K, W_V, W_O, biases, norm and q/k gains)
        as float32 bytes. Identifies the base model an edit plan applies to."""
        h = hashlib.sha256()
        w = self.head_weights(layer, head)
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "norm_gain", "norm_bias", "q_gain", "k_gain"):
            t = getattr(w, name)
            h.update(name.encode())
            if t is not None:
                h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def export_plan(self) -> EditPlan:
        """The applied edits, in order, with the base model's identity."""
        cfg = self.model.config
        touched = {f"{e.layer}.{e.head}" for e in self.edits}
        dtype = next(self.model.parameters()).dtype
        base = BaseModelIdentity(
            model_type=cfg.model_type, name_or_path=str(getattr(cfg, "_name_or_path", "") or ""),
            revision=getattr(cfg, "_commit_hash", None), dtype=str(dtype).replace("torch.", ""),
            fingerprints={k: v for k, v in sorted(self._fingerprints.items()) if k in touched},
        )
        return EditPlan(base=base, edits=self.edits)

    def save_plan(self, directory: str | os.PathLike) -> None:
        """Write :meth:`export_plan` to ``directory`` (JSON + safetensors, atomic; main process only)."""
        if hub.is_main_process():
            self.export_plan().save(directory)
        hub.wait_for_everyone()

    def apply_plan(self, plan: EditPlan | str | os.PathLike, *, verify: bool = True) -> list[Edit]:
        """Apply every edit of ``plan`` (an :class:`EditPlan` or a directory holding one).

        With ``verify`` (default) the plan's model type and the fingerprint of every head it touches are
        checked against this model first; a mismatch raises :class:`PlanMismatchError` and changes
        nothing. If an edit fails half-way, the edits of this plan already written are undone.
        """
        if not isinstance(plan, EditPlan):
            plan = EditPlan.load(plan)
        if verify:
            self.verify_plan(plan)
        applied = 0
        try:
            for edit in plan.edits:
                self.apply_edit(edit)
                applied += 1
        except BaseException:
            for _ in range(applied):
                self.undo()
            raise
        return plan.edits

    def verify_plan(self, plan: EditPlan) -> None:
        """Raise :class:`PlanMismatchError` unless ``plan`` was made on this model's current weights."""
        model_type = self.model.config.model_type
        if plan.base.model_type != model_type:
            raise PlanMismatchError(
                f"the plan was made for a {plan.base.model_type!r} model "
                f"({plan.base.name_or_path or 'unnamed'}), this model is {model_type!r}."
            )
        for key, expected in plan.base.fingerprints.items():
            layer, head = (int(x) for x in key.split("."))
            if layer >= self.n_layers or head >= self.n_heads:
                raise PlanMismatchError(f"the plan edits layer {layer} head {head}, which this model lacks.")
            if self.head_fingerprint(layer, head) != expected:
                raise PlanMismatchError(
                    f"layer {layer} head {head} of this model differs from the plan's base model "
                    f"({plan.base.name_or_path or 'unnamed'}, dtype {plan.base.dtype}). Apply the plan to the "
                    "exact base checkpoint it was made on, in the same dtype and without other edits, or pass "
                    "verify=False to apply it anyway."
                )

    @classmethod
    def from_plan(
        cls,
        model: nn.Module,
        plan: EditPlan | str | os.PathLike,
        *,
        verify: bool = True,
        revision: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """A new editor on ``model`` with ``plan`` applied: an :class:`EditPlan`, a local directory, or a
        Hub repo id (a plan repo, or a full checkpoint saved by :meth:`save_pretrained`, which carries its
        plan). Only the plan's two files are downloaded; nothing is executed or unpickled.

        >>> editor = ChannelEditor.from_plan(base_model, "me/gpt2-laundry-plan")  # doctest: +SKIP
        """
        if not isinstance(plan, EditPlan):
            folder = hub.resolve_local_or_hub(plan, allow_patterns=list(PLAN_FILES), revision=revision, token=token)
            plan = EditPlan.load(folder)
        editor = cls(model, **kwargs)
        editor.apply_plan(plan, verify=verify)
        return editor

    # ----- saving and sharing -------------------------------------------------------------------
    def model_card(self, repo_id: str | None = None):
        """The ``huggingface_hub.ModelCard`` written by :meth:`save_pretrained` (see :mod:`th_edit.cards`)."""
        return cards.model_card(self.export_plan(), repo_id=repo_id, evidence=self.evidence, evaluation=self.evaluation)

    def save_pretrained(
        self, directory: str | os.PathLike, *, tokenizer: Any = None, repo_id: str | None = None, **save_kwargs: Any
    ) -> Path:
        """Save the edited model in native Hugging Face format, with tokenizer, model card and edit plan.

        The weights go through the model's own ``save_pretrained`` (safetensors, sharding and the
        architecture's own layout), so ``AutoModelForCausalLM.from_pretrained(directory)`` needs no
        th_edit. The plan files sit beside them, so ``ChannelEditor.from_plan(base, directory)`` works too.
        The directory is replaced atomically: on any failure its previous contents stay as they were.
        Under Accelerate only the main process writes. Extra keyword arguments go to the model's
        ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        directory = Path(directory)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if hub.is_main_process():
            with hub.atomic_directory(directory) as staging:
                self.model.save_pretrained(staging, **save_kwargs)
                if tokenizer is not None:
                    tokenizer.save_pretrained(staging)
                self.export_plan().save(staging)
                self.model_card(repo_id).save(staging / "README.md")
            logger.info("saved the edited model to %s", directory)
        hub.wait_for_everyone()
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        tokenizer: Any = None,
        commit_message: str = "Upload model edited with th_edit",
        **save_kwargs: Any,
    ):
        """Save as :meth:`save_pretrained` does (to a temporary directory) and upload it to ``repo_id`` in one
        commit, creating the repo if needed. Returns the ``CommitInfo``. Raises :class:`HubError` with the
        fix on a bad token or a server error; nothing local changes."""
        with tempfile.TemporaryDirectory(prefix="th_edit_push_") as tmp:
            self.save_pretrained(Path(tmp) / "model", tokenizer=tokenizer, repo_id=repo_id, **save_kwargs)
            return hub.push_folder(Path(tmp) / "model", repo_id, token=token, private=private, commit_message=commit_message)

    def push_plan_to_hub(
        self, repo_id: str, *, token: str | None = None, private: bool | None = None,
        commit_message: str = "Upload th_edit edit plan",
    ):
        """Upload the edit plan alone (JSON + safetensors, a few KB) with a card to ``repo_id``."""
        with tempfile.TemporaryDirectory(prefix="th_edit_plan_") as tmp:
            plan = self.export_plan()
            plan.save(tmp)
            cards.plan_card(plan, repo_id=repo_id).save(Path(tmp) / "README.md")
            return hub.push_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message)

