"""LoRA factors of th_edit edits: which projection modules an edit touches and its exact ``B @ A``.

See :mod:`th_edit.sharing.adapters` for the layout of the factors and the files on disk. Everything here
is in memory; peft is imported only to check that it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.layout import AttentionLayout
from ..edits.plan import PLAN_FILES, Edit, EditPlan
from ..errors import AdapterError, InvalidArgumentError, MissingDependencyError
from .models import published_name

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FILES", "AdapterModule", "require_peft", "adapter_modules",
    "adapter_state", "layout_of",
]


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: every file :func:`save_adapter` writes besides ``README.md``
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *PLAN_FILES)
LORA_KEY = "base_model.model.{name}.lora_{ab}.weight"  # peft's saved key (adapter name removed)
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


def layout_of(editor_or_model: Any) -> AttentionLayout:
    """The :class:`AttentionLayout` of an editor (its ``layout``) or of a bare model."""
    return editor_or_model.layout if hasattr(editor_or_model, "layout") else AttentionLayout(editor_or_model)


def require_editor(editor: Any):
    """``editor`` if it is an editor (it exports plans), else :class:`InvalidArgumentError` with the fix."""
    if not hasattr(editor, "export_plan"):
        raise InvalidArgumentError(
            "this needs a ChannelEditor (its edits and base fingerprints): pass ChannelEditor(model), "
            "not the model itself."
        )
    return editor


def plan_of(editor, edits: EditPlan | Sequence[Edit] | None) -> EditPlan:
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
    editor = require_editor(editor_or_model)
    if isinstance(edits, EditPlan):
        edits = edits.edits
    return module_factors(editor.layout, list(editor.edits if edits is None else edits))


def module_factors(layout, edits: Sequence[Edit]) -> dict[str, AdapterModule]:
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
        n_in, n_out = layout.row_form(module.weight).shape  # meta tensors (offloaded) still have shapes
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
                start = layout.head_offset("q", head)
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


def pad_rank(m: AdapterModule, r: int) -> AdapterModule:
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
    editor = require_editor(editor_or_model)
    config, tensors, _ = state_of(editor, plan_of(editor, edits), dtype, base_model_name_or_path, uniform_rank)
    return config, tensors


def state_of(editor, plan: EditPlan, dtype, base_model_name_or_path, uniform_rank):
    modules = module_factors(editor.layout, plan.edits)
    if uniform_rank:
        top = max(m.rank for m in modules.values())
        modules = {n: pad_rank(m, top) for n, m in modules.items()}
    name = base_model_name_or_path if base_model_name_or_path is not None else published_name(plan.base.name_or_path)
    config = _config_dict(editor.layout, modules, plan, name)
    tensors = {}
    for n, m in modules.items():
        tensors[LORA_KEY.format(name=n, ab="A")] = m.lora_A.to(dtype).contiguous()
        tensors[LORA_KEY.format(name=n, ab="B")] = m.lora_B.to(dtype).contiguous()
    return config, tensors, modules


