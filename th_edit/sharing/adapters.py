"""th_edit edits as standard peft LoRA adapters, and back.

Every th_edit edit is a low-rank change of one head's ``W_O[h]`` (OV) or ``W_Q[h]`` (QK). In the torch
``[out, in]`` convention of the projection modules:

- OV: ``Delta W_O[h] = left @ right.T`` (``[d_h, d]``, row form) changes the columns ``h*d_h:(h+1)*d_h``
  of ``o_proj.weight [d, H*d_h]`` by ``right @ left.T``; as LoRA (``Delta W = B @ A``):
  ``B = right [d, k]`` and ``A [k, H*d_h]`` holding ``left.T`` in the head's columns, zeros elsewhere.
- QK: ``Delta W_Q[h] = left @ right.T`` (``[d, d_h]``) changes the head's rows of the query projection's
  output (``q_proj.weight``, or the Q rows of a fused ``c_attn`` / ``query_key_value`` / ``qkv_proj``) by
  ``right @ left.T``: ``B [out, k]`` holds ``right`` in the head's rows (zeros elsewhere, so fused
  key/value rows get exactly ``+0``) and ``A = left.T [k, d]``.

All edits of one module are stacked into one factor pair whose rank is the number of scaled components
(per head at most ``d_h``: a head whose edits add up to more components is stored as ``I`` times its
summed change, still exact). ``lora_alpha`` equals each module's rank (``rank_pattern`` /
``alpha_pattern`` name every module in full), so peft's scaling is exactly 1 and
``W + B @ A`` is the th_edit-edited weight up to float32 rounding of the sum.

On disk an adapter is what ``peft.PeftModel.from_pretrained`` reads (``adapter_config.json`` +
``adapter_model.safetensors``) plus th_edit's edit plan (``edit_plan.json`` + ``edit_plan.safetensors``)
and a model card. The plan lets :func:`load_adapter_edits` rebuild the exact :class:`~th_edit.edits.plan.Edit`
objects (and check the base model's fingerprints); it also makes the directory a plan that
``ChannelEditor.from_plan`` reads. Nothing is unpickled.

peft is optional (``pip install th_edit[peft]``): it is imported only when an adapter is written, and
:class:`~th_edit.errors.MissingDependencyError` says how to install it. Reading an adapter back into
th_edit edits needs no peft.

>>> editor.save_adapter("smollm2-inhibition-x4")                             # doctest: +SKIP
>>> from peft import PeftModel                                              # doctest: +SKIP
>>> model = PeftModel.from_pretrained(base, "smollm2-inhibition-x4")        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file

from ..core.layout import AttentionLayout
from ..edits.plan import PLAN_JSON, EditPlan
from ..errors import AdapterError, PlanFormatError
from ..utils.distributed import run_on_main_process
from ..utils.files import atomic_directory
from . import hub
from .adapter_checks import check_adapter_config
from .cards import CardData, base_model_meta, card_fields, card_license, eval_results, template_text
from .checkpoints import verify_plan
from .lora import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    LAYOUTS,
    LORA_KEY,
    AdapterModule,
    adapter_modules,
    adapter_parts,
    adapter_state,
    check_uniform_layout,
    module_factors,
    pad_rank,
    require_peft,
    uniform_modules,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FILES", "AdapterModule", "require_peft", "adapter_modules",
    "adapter_state", "save_adapter", "push_adapter_to_hub", "load_adapter_edits",
    "adapter_card", "is_adapter_dir", "LAYOUTS", "check_uniform_layout", "serving_info", "VLLM_MAX_LORA_RANKS",
]

logger = logging.getLogger(__name__)


def _scale_text(desc: Mapping[str, Any]) -> str:
    """An edit's scale(s) for the card, whatever form the Edit records them in."""
    for key in ("alpha", "alphas", "scales"):
        value = desc.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.4g}"
        if isinstance(value, Sequence) and not isinstance(value, str):
            return ", ".join(f"{float(v):.4g}" for v in value)
    return "n/a"


#: the values vLLM accepts for ``--max-lora-rank`` (its default is 16)
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def serving_info(modules: Mapping[str, AdapterModule], layout: str) -> dict[str, Any]:
    """What the card's *Serving* section says: the layout, the rank a server must allow, the smallest
    vLLM ``--max-lora-rank`` that fits, and how many (zero) modules the uniform layout added."""
    rank = max(m.rank for m in modules.values())
    edited = [m for m in modules.values() if m.heads]
    return {"layout": layout, "max_rank": rank, "n_modules": len(modules), "n_zero": len(modules) - len(edited),
            "vllm_rank": next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None),
            "module_types": sorted({_module_type(m.name) for m in modules.values()})}


def _module_type(name: str) -> str:
    """``model.layers.3.self_attn.o_proj`` -> ``self_attn.o_proj`` (the part after the layer index)."""
    match = re.fullmatch(r".+?\.\d+\.(.+)", name)
    return match[1] if match else name


def adapter_card(
    plan: EditPlan,
    modules: Mapping[str, AdapterModule],
    *,
    repo_id: str | None = None,
    evidence: Sequence[Mapping[str, Any]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    size_bytes: int | None = None,
    license: str | None = None,
    layout: str = "compact",
):
    """The ``README.md`` of an adapter: ``library_name: peft``, ``base_model``, edits, evidence, evaluation,
    and a *Serving* section (the ``layout``, which LoRA servers load it and how)."""
    meta = base_model_meta(plan)
    if meta:
        meta["base_model_relation"] = "adapter"
    common = card_fields(plan, repo_id)
    name = (repo_id or "").split("/")[-1] or "th_edit LoRA adapter"
    results = eval_results(evaluation)
    data = ModelCardData(
        library_name="peft", pipeline_tag="text-generation", license=card_license(plan, license),
        tags=["th_edit", "model-editing", "talking-heads", "lora", "peft"], **meta,
        **({"eval_results": results, "model_name": name} if results else {}),
    )
    for row, e in zip(common["edits"], plan.edits):
        row["scale_text"] = _scale_text(row)
        row["n_components"] = int(e.left.shape[-1])
    rows = []
    if evaluation:
        before, after = evaluation.get("before", {}), evaluation.get("after", {})
        rows = [{"length": n, "before": float(before[n]), "after": float(after[n])}
                for n in sorted(before, key=int) if n in after]
    mods = [{"name": m.name, "rank": sum(n for _, n in m.heads.values()) or m.rank, "circuit": m.circuit, "heads": ", ".join(map(str, sorted(m.heads)))}
            for m in modules.values() if m.heads or layout == "compact"]
    return ModelCard.from_template(
        data, template_str=template_text("adapter"), evidence=list(evidence or []), evaluation=rows,
        evaluation_note=(evaluation or {}).get("note", "Accuracy by list length, before and after the edit."),
        modules=mods, total_rank=sum(m["rank"] for m in mods), size_kb=None if size_bytes is None else size_bytes / 1024,
        serving=serving_info(modules, layout),
        **{**common, "model_name": name},
    )


def save_adapter(
    layout: AttentionLayout,
    directory: str | os.PathLike,
    *,
    plan: EditPlan,
    card: CardData | None = None,
    dtype: torch.dtype = torch.float32,
    repo_id: str | None = None,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
    license: str | None = None,
    adapter_layout: str = "compact",
    max_rank: int | None = None,
) -> Path:
    """Write the edits as a standard peft LoRA adapter to ``directory`` (replaced atomically).

    Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (what ``PeftModel.from_pretrained``
    reads), ``edit_plan.json`` + ``edit_plan.safetensors`` (th_edit's exact edits and the base model's
    fingerprints, for :func:`load_adapter_edits` and ``ChannelEditor.from_plan``) and ``README.md``
    (``library_name: peft``, ``base_model``, the edits, the ``card``'s evidence and evaluation).
    Only the main process writes under Accelerate. ``layout``: the model's :class:`AttentionLayout`;
    ``plan``: the edits (e.g. ``editor.export_plan()``); other arguments as in :func:`adapter_state`.

    ``adapter_layout="uniform"`` writes every edited module type in every layer with one rank (zero factors where
    nothing is edited; checked with :func:`check_uniform_layout` before writing), which text-generation-
    inference and LoRAX need; the default ``"compact"`` holds only the edited modules (smaller; peft and
    vLLM load it). The card's *Serving* section names the layout and the rank a server must allow.

    Raises:
        MissingDependencyError: peft is not installed.
        AdapterError: nothing to write, the model's projections are not plain Linear/Conv1D modules, or
            the rank exceeds ``max_rank`` (nothing is written then).
    """
    card = card or CardData()
    name = base_model_name_or_path if base_model_name_or_path is not None else plan.base.name_or_path
    if name != plan.base.name_or_path:
        plan = dataclasses.replace(plan, base=dataclasses.replace(plan.base, name_or_path=name))
    config, tensors, modules = adapter_parts(layout, plan, dtype, None, uniform_rank, adapter_layout=adapter_layout,
                                        max_rank=max_rank)
    directory = Path(directory)

    def write() -> None:
        with atomic_directory(directory) as staging:
            # one metadata key: safetensors writes several in hash order and the bytes must be reproducible
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            plan.save(staging)
            size = sum((staging / f).stat().st_size for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
            adapter_card(plan, modules, repo_id=repo_id, evidence=card.evidence,
                         evaluation=card.evaluation, size_bytes=size,
                         license=license, layout=adapter_layout).save(staging / "README.md")
        logger.info("saved a %s LoRA adapter of %d edit(s) on %d module(s) to %s", adapter_layout, len(plan.edits),
                    len(modules), directory)

    run_on_main_process(write)  # the others wait, and raise the main process's error if it fails
    return directory


def push_adapter_to_hub(
    layout: AttentionLayout,
    repo_id: str,
    *,
    plan: EditPlan,
    card: CardData | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload th_edit LoRA adapter",
    **save_kwargs: Any,
):
    """Save as :func:`save_adapter` does (to a temporary directory) and upload it to ``repo_id`` in one
    commit. Returns the ``CommitInfo``; raises :class:`~th_edit.errors.HubError` on HTTP errors."""
    with tempfile.TemporaryDirectory(prefix="th_edit_adapter_") as tmp:
        folder = save_adapter(layout, Path(tmp) / "adapter", plan=plan, card=card, repo_id=repo_id, **save_kwargs)
        return hub.push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)


def is_adapter_dir(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a peft adapter (``adapter_config.json``), th_edit's or not."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _read(folder: Path, source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], EditPlan]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(
            f"{source} is not a peft adapter: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(a .bin adapter is not read: th_edit never unpickles)."
        )
    if not (folder / PLAN_JSON).is_file():
        raise AdapterError(
            f"{source} is a LoRA adapter that was not written by th_edit (it has no {PLAN_JSON} beside "
            f"{ADAPTER_CONFIG}), so it cannot be read back as th_edit edits. Load it with "
            "peft.PeftModel.from_pretrained instead."
        )
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise AdapterError(f"{source}: the adapter files are unreadable: {exc}") from exc
    try:
        plan = EditPlan.load(folder)
    except PlanFormatError as exc:
        raise AdapterError(f"{source}: the th_edit plan beside the adapter is malformed: {exc}") from exc
    return config, tensors, plan


def _check_matches(layout, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], plan: EditPlan, source: Any) -> None:
    """Refuse an adapter whose LoRA config or weights are not exactly the plan's edits (e.g. trained further)."""
    def fail(why: str) -> None:
        raise AdapterError(
            f"{source}: {why}. The LoRA adapter no longer holds the th_edit edits recorded beside it (edited or "
            "trained after th_edit wrote it?); load it with peft.PeftModel.from_pretrained, or use its plan "
            "alone with ChannelEditor.from_plan."
        )

    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        fail(f"it is not a plain LoRA adapter (peft_type={config.get('peft_type')!r}, use_dora="
             f"{config.get('use_dora')}, use_rslora={config.get('use_rslora')})")
    check_adapter_config(config, conv1d=bool(layout.spec.conv1d), fail=fail)
    modules = module_factors(layout, plan.edits)
    targets = config.get("target_modules")
    targets = sorted(targets if isinstance(targets, list) else [targets])
    if targets != sorted(modules) and not (config.get("rank_pattern") or config.get("alpha_pattern")):
        modules = uniform_modules(layout, modules)  # the uniform layout: zero modules in the other layers
    if targets != sorted(modules):
        fail(f"its target_modules {targets} are not the edited modules {sorted(modules)}")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected = {LORA_KEY.format(name=n, ab=ab) for n in modules for ab in "AB"}
    if set(tensors) != expected:
        fail(f"its tensors {sorted(set(tensors) ^ expected)[:4]} do not match the edited modules")
    for name, m in modules.items():
        A, B = tensors[LORA_KEY.format(name=name, ab="A")], tensors[LORA_KEY.format(name=name, ab="B")]
        r = A.shape[0]
        rank, alpha = ranks.get(name, config.get("r")), alphas.get(name, config.get("lora_alpha"))
        if rank != r or alpha != r or B.shape[-1] != r:
            fail(f"module {name} has rank {r} with r={rank}, lora_alpha={alpha}: its scaling is not 1")
        m = pad_rank(m, r)
        if m.rank != r:
            fail(f"module {name} has rank {r}, the plan's edits need {m.rank}")
        for stored, rebuilt in ((A, m.lora_A), (B, m.lora_B)):
            rebuilt = rebuilt.to(stored.dtype).float()
            tol = 4 * torch.finfo(stored.dtype).eps * max(float(rebuilt.abs().max()), 1e-30)
            if stored.shape != rebuilt.shape or float((stored.float() - rebuilt).abs().max()) > tol:
                fail(f"the LoRA factors of {name} differ from the plan's edits")


def load_adapter_edits(
    layout: AttentionLayout,
    source: str | os.PathLike,
    *,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
) -> EditPlan:
    """Read a th_edit adapter (a directory or a Hub repo id) back as the exact :class:`EditPlan` it holds.

    Only the adapter's and plan's four files are downloaded; nothing is executed or unpickled, and peft is
    not needed. The edits are not applied (``editor.apply_plan(plan)`` or ``ChannelEditor.from_adapter`` do).

    Args:
        layout: the :class:`AttentionLayout` of the base model the adapter is meant for.
        verify: check the plan's model type and the fingerprint of every head it touches against this
            model (:class:`~th_edit.errors.PlanMismatchError` on a different base).

    Raises:
        AdapterError: not a peft adapter, a LoRA adapter not written by th_edit, or one whose LoRA factors
            no longer equal the recorded edits.
        PlanMismatchError: (``verify``) the adapter was made on another model.
    """
    folder = hub.resolve_local_or_hub(source, allow_patterns=list(ADAPTER_FILES), revision=revision, token=token)
    config, tensors, plan = _read(folder, source)
    if verify:
        verify_plan(plan, layout)
    try:
        _check_matches(layout, config, tensors, plan, source)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a geometry the layout cannot place (verify=False on another model)
        raise AdapterError(f"{source}: the adapter does not fit this model ({exc!r}).") from exc
    return plan
