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
and a model card. The plan lets :func:`load_adapter_edits` rebuild the exact :class:`~th_edit.plan.Edit`
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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .errors import AdapterError, MissingDependencyError, PlanFormatError
from .plan import PLAN_FILES, PLAN_JSON, Edit, EditPlan

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FILES", "AdapterModule", "require_peft", "adapter_modules",
    "adapter_state", "save_adapter", "push_adapter_to_hub", "load_adapter_edits", "editor_from_adapter",
    "adapter_card", "is_adapter_dir",
]

logger = logging.getLogger("th_edit")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: every file :func:`save_adapter` writes besides ``README.md``
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *PLAN_FILES)
_KEY = "base_model.model.{name}.lora_{ab}.weight"  # peft's saved key (adapter name removed)
_PEFT_MIN = "0.13"


def require_peft():
    """Import and return ``peft``, or raise :class:`MissingDependencyError` with the install command."""
    try:
        import peft
    except ImportError as exc:
        raise MissingDependencyError(
            "writing a LoRA adapter needs peft, which is not installed (or failed to import: "
            f"{exc}). Install it with `pip install 'th_edit[peft]'` (or `pip install 'peft>={_PEFT_MIN}'`)."
        ) from exc
    return peft


@dataclass
class AdapterModule:
    """The LoRA factors of one projection module: ``Delta weight = lora_B @ lora_A`` (torch ``[out, in]``).

    Attributes:
        name: full module name relative to the causal LM (``model.layers.3.self_attn.o_proj``).
        layer, circuit: the block and the circuit (``"ov"``: output projection, ``"qk"``: query projection).
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]`` (float32).
        heads: ``head -> (first rank column, number of columns)`` of each edited head's block.
        edits: indices (in the plan) of the edits stacked here.
    """

    name: str
    layer: int
    circuit: str
    lora_A: torch.Tensor = field(repr=False)
    lora_B: torch.Tensor = field(repr=False)
    heads: dict[int, tuple[int, int]] = field(default_factory=dict)
    edits: list[int] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


def _editor(editor_or_model: Any):
    from .editor import ChannelEditor

    return editor_or_model if isinstance(editor_or_model, ChannelEditor) else ChannelEditor(editor_or_model)


def _plan(editor, edits: EditPlan | Sequence[Edit] | None) -> EditPlan:
    """The plan to export: the editor's applied edits (default), a given plan, or a list of edits made on
    this editor's base (fingerprints of the touched heads from the editor, or from the current weights)."""
    if isinstance(edits, EditPlan):
        return edits
    plan = editor.export_plan()
    if edits is None:
        return plan
    edits = list(edits)
    fingerprints = {}
    for e in edits:
        key = f"{e.layer}.{e.head}"
        fingerprints[key] = plan.base.fingerprints.get(key) or editor.head_fingerprint(e.layer, e.head)
    base = dataclasses.replace(plan.base, fingerprints=dict(sorted(fingerprints.items())))
    return EditPlan(base=base, edits=edits, th_edit_version=plan.th_edit_version)


def _module_name(layout, layer: int, circuit: str) -> str:
    """Full name of the module an edit of ``circuit`` in ``layer`` writes, from the architecture table."""
    path = layout.spec.o if circuit == "ov" else layout.spec.q
    return f"{layout.spec.layers}.{layer}.{path}"


def _check_module(layout, name: str) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    try:
        module = layout.model.get_submodule(name)
    except AttributeError as exc:
        raise AdapterError(f"module {name!r} (from the architecture table) is not in this model: {exc}") from exc
    expected = Conv1D if layout.spec.conv1d else nn.Linear
    if type(module) is not expected:
        raise AdapterError(
            f"{name} is a {type(module).__module__}.{type(module).__name__}, not a plain "
            f"{expected.__name__}: peft's LoRA on it would not be the exact weight change th_edit made (e.g. a "
            "quantized or wrapped layer). Write the adapter from the unquantized float model, or save the edited "
            "model with save_pretrained / the edit plan with save_plan instead."
        )
    return module


def adapter_modules(editor_or_model: Any, edits: EditPlan | Sequence[Edit] | None = None) -> dict[str, AdapterModule]:
    """The LoRA factors of every module the edits touch, keyed by full module name (in layer order, the
    output projection before the query projection). See the module docstring for the layout.

    Args:
        editor_or_model: a :class:`~th_edit.ChannelEditor` (its applied edits by default) or a model.
        edits: an :class:`EditPlan` or a list of :class:`Edit` (default: the editor's applied edits).

    Raises:
        AdapterError: no edits, an edit whose factors do not fit this model, or a projection module that
            is not a plain ``nn.Linear`` / ``Conv1D``.
    """
    editor = _editor(editor_or_model)
    if isinstance(edits, EditPlan):
        edits = edits.edits
    return _modules(editor.layout, list(editor.edits if edits is None else edits))


def _modules(layout, edits: Sequence[Edit]) -> dict[str, AdapterModule]:
    if not edits:
        raise AdapterError("there are no edits to write as an adapter: apply an edit (scale_component, apply_plan) first.")
    dh = layout.d_head
    groups: dict[tuple[int, str], dict[int, list[int]]] = {}
    for i, e in enumerate(edits):
        layout.check(e.layer, e.head)
        if e.circuit not in ("ov", "qk"):
            raise AdapterError(f"edit {i} has circuit {e.circuit!r}; adapters hold 'ov' and 'qk' edits.")
        shape = (dh, layout.d_model) if e.circuit == "ov" else (layout.d_model, dh)
        k = e.left.shape[-1]
        if e.left.shape != (shape[0], k) or e.right.shape != (shape[1], k):
            raise AdapterError(
                f"edit {i} (layer {e.layer} head {e.head} {e.circuit}) has factors {tuple(e.left.shape)} and "
                f"{tuple(e.right.shape)}, which do not fit this model's {shape[0]}x{shape[1]} {e.target}: it was "
                "made for a different geometry."
            )
        groups.setdefault((e.layer, e.circuit), {}).setdefault(e.head, []).append(i)

    out: dict[str, AdapterModule] = {}
    for (layer, circuit) in sorted(groups, key=lambda lc: (lc[0], lc[1] != "ov")):
        name = _module_name(layout, layer, circuit)
        module = _check_module(layout, name)
        n_in, n_out = layout._row_form(module.weight).shape  # meta tensors (offloaded) still have shapes
        As, Bs, heads, col = [], [], {}, 0
        for head, idx in groups[(layer, circuit)].items():
            total = sum(edits[i].left.shape[-1] for i in idx)
            if total <= dh:  # the edits' own factors, placed: pure copies
                left = torch.cat([edits[i].left.detach().cpu().float() for i in idx], dim=1)
                right = torch.cat([edits[i].right.detach().cpu().float() for i in idx], dim=1)
            else:  # more components than the head has: identity times the summed change (rank d_h)
                delta = sum(edits[i].delta().detach().cpu().float() for i in idx)
                if circuit == "ov":
                    left, right = torch.eye(dh), delta.T.contiguous()
                else:
                    left, right = delta, torch.eye(dh)
            r = left.shape[1]
            if circuit == "ov":  # rows h*d_h.. of the row form = input columns of o_proj
                A = torch.zeros(r, n_in)
                A[:, head * dh:(head + 1) * dh] = left.T
                B = right
            else:  # columns of the query's row form = output rows of q_proj / the fused Q rows
                start = layout._offset("q", head)
                A = left.T.contiguous()
                B = torch.zeros(n_out, r)
                B[start:start + dh] = right
            As.append(A)
            Bs.append(B)
            heads[head] = (col, r)
            col += r
        out[name] = AdapterModule(
            name=name, layer=layer, circuit=circuit, lora_A=torch.cat(As, 0).contiguous(),
            lora_B=torch.cat(Bs, 1).contiguous(), heads=heads,
            edits=sorted(i for idx in groups[(layer, circuit)].values() for i in idx),
        )
    return out


def _pad(m: AdapterModule, r: int) -> AdapterModule:
    extra = r - m.rank
    if extra <= 0:
        return m
    A = torch.cat([m.lora_A, m.lora_A.new_zeros(extra, m.lora_A.shape[1])], 0)
    B = torch.cat([m.lora_B, m.lora_B.new_zeros(m.lora_B.shape[0], extra)], 1)
    return dataclasses.replace(m, lora_A=A, lora_B=B)


def _config_dict(layout, modules: Mapping[str, AdapterModule], plan: EditPlan, base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's ``LoraConfig`` for ``modules`` as a JSON-ready dict (keys and lists sorted: reproducible bytes)."""
    peft = require_peft()
    ranks = {name: m.rank for name, m in modules.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], -v))  # the most common rank (a tool ignoring patterns gets most right)
    revision = plan.base.revision if plan.base.revision and re.fullmatch(r"[0-9a-f]{40}", plan.base.revision) else None
    config = peft.LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(modules),
        # every module in full, so no pattern can also match another layer's module (peft matches
        # r"(.*\.)?(key)$", and these names differ in their layer index)
        rank_pattern={name: v for name, v in sorted(ranks.items())},
        alpha_pattern={name: v for name, v in sorted(ranks.items())},
        lora_dropout=0.0, bias="none", fan_in_fan_out=bool(layout.spec.conv1d), use_rslora=False, use_dora=False,
        init_lora_weights=True, task_type="CAUSAL_LM", inference_mode=True,
        base_model_name_or_path=base_model_name_or_path or None, revision=revision,
    )
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.loads(json.dumps(data, default=lambda v: getattr(v, "value", str(v))))


def adapter_state(
    editor_or_model: Any,
    edits: EditPlan | Sequence[Edit] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The peft adapter of the edits, in memory: ``(adapter_config dict, {safetensors key: tensor})``.

    Args:
        editor_or_model: a :class:`~th_edit.ChannelEditor` or (with ``edits``) its unedited base model.
        edits: an :class:`EditPlan` or list of :class:`Edit` (default: the editor's applied edits).
        dtype: dtype of the stored factors (float32 by default; bf16/fp16 halve the size and round them).
        base_model_name_or_path: written to the config (default: the model's ``_name_or_path``).
        uniform_rank: zero-pad every module to the largest rank and give all the same ``r`` (for servers
            that ignore ``rank_pattern``); still exact.

    Raises:
        MissingDependencyError: peft is not installed.
        AdapterError: see :func:`adapter_modules`.
    """
    editor = _editor(editor_or_model)
    config, tensors, _ = _state(editor, _plan(editor, edits), dtype, base_model_name_or_path, uniform_rank)
    return config, tensors


def _state(editor, plan: EditPlan, dtype, base_model_name_or_path, uniform_rank):
    modules = _modules(editor.layout, plan.edits)
    if uniform_rank:
        top = max(m.rank for m in modules.values())
        modules = {n: _pad(m, top) for n, m in modules.items()}
    name = base_model_name_or_path if base_model_name_or_path is not None else plan.base.name_or_path
    config = _config_dict(editor.layout, modules, plan, name)
    tensors = {}
    for n, m in modules.items():
        tensors[_KEY.format(name=n, ab="A")] = m.lora_A.to(dtype).contiguous()
        tensors[_KEY.format(name=n, ab="B")] = m.lora_B.to(dtype).contiguous()
    return config, tensors, modules


def _scale_text(desc: Mapping[str, Any]) -> str:
    """An edit's scale(s) for the card, whatever form the Edit records them in."""
    for key in ("alpha", "alphas", "scales"):
        value = desc.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.4g}"
        if isinstance(value, Sequence) and not isinstance(value, str):
            return ", ".join(f"{float(v):.4g}" for v in value)
    return "n/a"


def adapter_card(
    plan: EditPlan,
    modules: Mapping[str, AdapterModule],
    *,
    repo_id: str | None = None,
    evidence: Sequence[Mapping[str, Any]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    size_bytes: int | None = None,
    license: str | None = None,
):
    """The ``README.md`` of an adapter: ``library_name: peft``, ``base_model``, edits, evidence, evaluation."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import cards

    meta = cards._base_model_meta(plan)
    if meta:
        meta["base_model_relation"] = "adapter"
    data = ModelCardData(
        library_name="peft", pipeline_tag="text-generation", license=license,
        tags=["th_edit", "model-editing", "talking-heads", "lora", "peft"], **meta,
    )
    common = cards._common(plan, repo_id)
    for row, e in zip(common["edits"], plan.edits):
        row["scale_text"] = _scale_text(row)
        row["n_components"] = int(e.left.shape[-1])
    rows = []
    if evaluation:
        before, after = evaluation.get("before", {}), evaluation.get("after", {})
        rows = [{"length": n, "before": float(before[n]), "after": float(after[n])}
                for n in sorted(before, key=int) if n in after]
    mods = [{"name": m.name, "rank": m.rank, "circuit": m.circuit, "heads": ", ".join(map(str, sorted(m.heads)))}
            for m in modules.values()]
    return ModelCard.from_template(
        data, template_path=str(cards.template_path("adapter")), evidence=list(evidence or []), evaluation=rows,
        evaluation_note=(evaluation or {}).get("note", "Accuracy by list length, before and after the edit."),
        modules=mods, total_rank=sum(m["rank"] for m in mods), size_kb=None if size_bytes is None else size_bytes / 1024,
        **{**common, "model_name": (repo_id or "").split("/")[-1] or "th_edit LoRA adapter"},
    )


def save_adapter(
    editor: Any,
    directory: str | os.PathLike,
    *,
    edits: EditPlan | Sequence[Edit] | None = None,
    dtype: torch.dtype = torch.float32,
    repo_id: str | None = None,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
    license: str | None = None,
) -> Path:
    """Write the edits as a standard peft LoRA adapter to ``directory`` (replaced atomically).

    Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (what ``PeftModel.from_pretrained``
    reads), ``edit_plan.json`` + ``edit_plan.safetensors`` (th_edit's exact edits and the base model's
    fingerprints, for :func:`load_adapter_edits` and ``ChannelEditor.from_plan``) and ``README.md``
    (``library_name: peft``, ``base_model``, the edits, the editor's ``evidence`` and ``evaluation``).
    Only the main process writes under Accelerate. Arguments as in :func:`adapter_state`.

    Raises:
        MissingDependencyError: peft is not installed.
        AdapterError: nothing to write, or the model's projections are not plain Linear/Conv1D modules.
    """
    from safetensors.torch import save_file

    editor = _editor(editor)
    plan = _plan(editor, edits)
    name = base_model_name_or_path if base_model_name_or_path is not None else plan.base.name_or_path
    if name != plan.base.name_or_path:
        plan = dataclasses.replace(plan, base=dataclasses.replace(plan.base, name_or_path=name))
    config, tensors, modules = _state(editor, plan, dtype, None, uniform_rank)
    directory = Path(directory)
    if hub.is_main_process():
        with hub.atomic_directory(directory) as staging:
            # one metadata key: safetensors writes several in hash order and the bytes must be reproducible
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            plan.save(staging)
            size = sum((staging / f).stat().st_size for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
            adapter_card(plan, modules, repo_id=repo_id, evidence=getattr(editor, "evidence", None),
                         evaluation=getattr(editor, "evaluation", None), size_bytes=size,
                         license=license).save(staging / "README.md")
        logger.info("saved a LoRA adapter of %d edit(s) on %d module(s) to %s", len(plan.edits), len(modules), directory)
    hub.wait_for_everyone()
    return directory


def push_adapter_to_hub(
    editor: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload th_edit LoRA adapter",
    **save_kwargs: Any,
):
    """Save as :func:`save_adapter` does (to a temporary directory) and upload it to ``repo_id`` in one
    commit. Returns the ``CommitInfo``; raises :class:`~th_edit.errors.HubError` on HTTP errors."""
    with tempfile.TemporaryDirectory(prefix="th_edit_adapter_") as tmp:
        folder = save_adapter(editor, Path(tmp) / "adapter", repo_id=repo_id, **save_kwargs)
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
    modules = _modules(layout, plan.edits)
    targets = config.get("target_modules")
    if sorted(targets if isinstance(targets, list) else [targets]) != sorted(modules):
        fail(f"its target_modules {targets} are not the edited modules {sorted(modules)}")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected = {_KEY.format(name=n, ab=ab) for n in modules for ab in "AB"}
    if set(tensors) != expected:
        fail(f"its tensors {sorted(set(tensors) ^ expected)[:4]} do not match the edited modules")
    for name, m in modules.items():
        A, B = tensors[_KEY.format(name=name, ab="A")], tensors[_KEY.format(name=name, ab="B")]
        r = A.shape[0]
        rank, alpha = ranks.get(name, config.get("r")), alphas.get(name, config.get("lora_alpha"))
        if rank != r or alpha != r or B.shape[-1] != r:
            fail(f"module {name} has rank {r} with r={rank}, lora_alpha={alpha}: its scaling is not 1")
        m = _pad(m, r)
        if m.rank != r:
            fail(f"module {name} has rank {r}, the plan's edits need {m.rank}")
        for stored, rebuilt in ((A, m.lora_A), (B, m.lora_B)):
            rebuilt = rebuilt.to(stored.dtype).float()
            tol = 4 * torch.finfo(stored.dtype).eps * max(float(rebuilt.abs().max()), 1e-30)
            if stored.shape != rebuilt.shape or float((stored.float() - rebuilt).abs().max()) > tol:
                fail(f"the LoRA factors of {name} differ from the plan's edits")


def load_adapter_edits(
    editor_or_model: Any,
    source: str | os.PathLike,
    *,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
) -> EditPlan:
    """Read a th_edit adapter (a directory or a Hub repo id) back as the exact :class:`EditPlan` it holds.

    Only the adapter's and plan's four files are downloaded; nothing is executed or unpickled, and peft is
    not needed. The edits are not applied (``editor.apply_plan(plan)`` or :func:`editor_from_adapter` do).

    Args:
        editor_or_model: the base model (or an editor on it) the adapter is meant for.
        verify: check the plan's model type and the fingerprint of every head it touches against this
            model (:class:`~th_edit.errors.PlanMismatchError` on a different base).

    Raises:
        AdapterError: not a peft adapter, a LoRA adapter not written by th_edit, or one whose LoRA factors
            no longer equal the recorded edits.
        PlanMismatchError: (``verify``) the adapter was made on another model.
    """
    editor = _editor(editor_or_model)
    folder = hub.resolve_local_or_hub(source, allow_patterns=list(ADAPTER_FILES), revision=revision, token=token)
    config, tensors, plan = _read(folder, source)
    if verify:
        editor.verify_plan(plan)
    try:
        _check_matches(editor.layout, config, tensors, plan, source)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a geometry the layout cannot place (verify=False on another model)
        raise AdapterError(f"{source}: the adapter does not fit this model ({exc!r}).") from exc
    return plan


def editor_from_adapter(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    verify: bool = True,
    revision: str | None = None,
    token: str | None = None,
    editor_cls: type | None = None,
    **editor_kwargs: Any,
):
    """A new editor on ``model`` with the th_edit adapter ``source`` applied as th_edit edits (exact factors,
    undoable); the body of ``ChannelEditor.from_adapter``. See :func:`load_adapter_edits`."""
    if editor_cls is None:
        from .editor import ChannelEditor as editor_cls
    editor = editor_cls(model, **editor_kwargs)
    plan = load_adapter_edits(editor, source, verify=verify, revision=revision, token=token)
    editor.apply_plan(plan, verify=False)  # verified above
    return editor
