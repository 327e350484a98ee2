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
from ..edits.scale import head_fingerprint
from ..errors import AdapterError, InvalidArgumentError, MissingDependencyError
from ..utils.deprecation import renamed_attributes
from .bundled_models import published_name

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FILES", "AdapterModule", "require_peft", "adapter_modules",
    "adapter_state", "plan_to_export", "LAYOUTS", "uniform_modules", "check_uniform_layout",
]


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: every file :func:`save_adapter` writes besides ``README.md``
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *PLAN_FILES)
LORA_KEY = "base_model.model.{name}.lora_{ab}.weight"  # peft's saved key (adapter name removed)
_PEFT_MIN = "0.13"
#: adapter layouts: ``compact`` (only the edited modules, each with its own rank; the smallest file) and
#: ``uniform`` (every layer has the same target modules with one rank: zero factors where nothing is edited)
LAYOUTS = ("compact", "uniform")


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


def plan_to_export(plan: EditPlan, layout: AttentionLayout, edits: EditPlan | Sequence[Edit] | None) -> EditPlan:
    """The plan to export: ``plan`` (the applied edits, by default), a given plan, or a list of edits made on
    the same base (fingerprints of the touched heads from ``plan``, or from the layout's current weights)."""
    if isinstance(edits, EditPlan):
        return edits
    if edits is None:
        return plan
    edits = list(edits)
    fingerprints = {}
    for e in edits:
        key = f"{e.layer}.{e.head}"
        fingerprints[key] = plan.base.fingerprints.get(key) or head_fingerprint(layout, e.layer, e.head)
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


def adapter_modules(layout: AttentionLayout, edits: EditPlan | Sequence[Edit]) -> dict[str, AdapterModule]:
    """The LoRA factors of every module the edits touch, keyed by full module name (in layer order, the
    output projection before the query projection). See the module docstring for the layout.

    Args:
        layout: the model's :class:`AttentionLayout`.
        edits: an :class:`EditPlan` or a list of :class:`Edit` (e.g. ``editor.edits``).

    Raises:
        AdapterError: no edits, an edit whose factors do not fit this model, or a projection module that
            is not a plain ``nn.Linear`` / ``Conv1D``.
    """
    if isinstance(edits, EditPlan):
        edits = edits.edits
    return module_factors(layout, list(edits))


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


def uniform_modules(layout, modules: Mapping[str, AdapterModule]) -> dict[str, AdapterModule]:
    """``modules`` completed to the uniform layout: every layer gets each circuit's module that any edit
    uses (zero factors ``A [rank, in]``, ``B [out, rank]`` where nothing is edited), and every module is
    zero-padded to the largest rank. ``B @ A`` of every module is unchanged (still exact in peft)."""
    if not modules:
        raise AdapterError("there are no edits to write as an adapter: apply an edit (scale_component, apply_plan) first.")
    top = max(m.rank for m in modules.values())
    circuits = sorted({m.circuit for m in modules.values()}, key=lambda c: c != "ov")
    out: dict[str, AdapterModule] = {}
    for layer in range(layout.n_layers):
        for circuit in circuits:
            name = _module_name(layout, layer, circuit)
            m = modules.get(name)
            if m is None:
                n_in, n_out = layout.row_form(_check_module(layout, name).weight).shape
                m = AdapterModule(name=name, layer=layer, circuit=circuit, lora_A=torch.zeros(top, n_in),
                                  lora_B=torch.zeros(n_out, top))
            out[name] = pad_rank(m, top)
    return out


def check_uniform_layout(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], n_layers: int) -> None:
    """Raise :class:`AdapterError` unless the adapter ``(config, tensors)`` has the uniform layout that
    LoRA servers which stack one layer type across layers rely on (text-generation-inference, LoRAX):
    every one of the ``n_layers`` layers has every target module type, each with both factors of the one
    rank ``config["r"]``, ``lora_alpha == r`` (scaling 1) and no ``rank_pattern`` / ``alpha_pattern``.

    Module names are split as ``<prefix>.<layer>.<module path>`` (``model.layers.3.self_attn.o_proj``).
    """
    problems: list[str] = []
    r, alpha = config.get("r"), config.get("lora_alpha")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern are set (servers read only r and lora_alpha)")
    if alpha != r:
        problems.append(f"lora_alpha={alpha} differs from r={r} (the scaling would not be 1)")
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    kinds: dict[str, set[int]] = {}
    for name in targets:
        match = re.fullmatch(r"(.+?)\.(\d+)\.(.+)", name)
        if match is None:
            problems.append(f"target module {name!r} names no layer")
            continue
        kinds.setdefault(f"{match[1]}.*.{match[3]}", set()).add(int(match[2]))
    for kind, layers in sorted(kinds.items()):
        missing = sorted(set(range(n_layers)) - layers)
        if missing:
            problems.append(f"{kind} is missing in layer(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    expected = {LORA_KEY.format(name=n, ab=ab) for n in targets for ab in "AB"}
    if set(tensors) != expected:
        problems.append(f"the tensors do not match the target modules: {sorted(set(tensors) ^ expected)[:4]}")
    for name in targets:
        A, B = tensors.get(LORA_KEY.format(name=name, ab="A")), tensors.get(LORA_KEY.format(name=name, ab="B"))
        if A is not None and B is not None and (A.shape[0] != r or B.shape[-1] != r):
            problems.append(f"{name} has rank {A.shape[0]}/{B.shape[-1]}, not r={r}")
    if problems:
        raise AdapterError("not a uniform LoRA adapter: " + "; ".join(problems[:6]) + ". Write it with "
                           "save_adapter(..., layout='uniform').")


def pad_rank(m: AdapterModule, r: int) -> AdapterModule:
    extra = r - m.rank
    if extra <= 0:
        return m
    A = torch.cat([m.lora_A, m.lora_A.new_zeros(extra, m.lora_A.shape[1])], 0)
    B = torch.cat([m.lora_B, m.lora_B.new_zeros(m.lora_B.shape[0], extra)], 1)
    return dataclasses.replace(m, lora_A=A, lora_B=B)


def _config_dict(layout, modules: Mapping[str, AdapterModule], plan: EditPlan, base_model_name_or_path: str | None,
                 uniform: bool = False) -> dict[str, Any]:
    """peft's ``LoraConfig`` for ``modules`` as a JSON-ready dict (keys and lists sorted: reproducible bytes);
    ``uniform``: one ``r`` = ``lora_alpha`` for all and no patterns (every module has that rank)."""
    peft = require_peft()
    ranks = {} if uniform else {name: m.rank for name, m in modules.items()}
    counts = Counter(m.rank for m in modules.values())
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
    layout: AttentionLayout,
    plan: EditPlan,
    *,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
    adapter_layout: str = "compact",
    max_rank: int | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The peft adapter of ``plan``'s edits on the model of ``layout``, in memory:
    ``(adapter_config dict, {safetensors key: tensor})``.

    Args:
        layout: the model's :class:`AttentionLayout`.
        plan: the :class:`EditPlan` (e.g. ``editor.export_plan()``).
        dtype: dtype of the stored factors (float32 by default; bf16/fp16 halve the size and round them).
        base_model_name_or_path: written to the config (default: the model's ``_name_or_path``).
        uniform_rank: zero-pad every module to the largest rank and give all the same ``r`` (for servers
            that ignore ``rank_pattern``); still exact.
        adapter_layout: ``"compact"`` (default: the edited modules only, the smallest file) or ``"uniform"``
            (every layer has every edited module type with one rank, zero factors where nothing is edited:
            what text-generation-inference and LoRAX need; see :func:`uniform_modules`).
        max_rank: the largest LoRA rank the target server accepts (e.g. vLLM's ``--max-lora-rank``);
            a larger (padded) rank raises :class:`AdapterError` before anything is written.

    Raises:
        MissingDependencyError: peft is not installed.
        AdapterError: see :func:`adapter_modules`; a rank above ``max_rank``.
        InvalidArgumentError: an unknown ``adapter_layout``.
    """
    config, tensors, _ = adapter_parts(layout, plan, dtype, base_model_name_or_path, uniform_rank,
                                  adapter_layout=adapter_layout, max_rank=max_rank)
    return config, tensors


def adapter_parts(layout: AttentionLayout, plan: EditPlan, dtype: torch.dtype, base_model_name_or_path: str | None,
             uniform_rank: bool, *, adapter_layout: str = "compact", max_rank: int | None = None,
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, AdapterModule]]:
    """``(adapter_config dict, tensors, modules)`` of ``plan`` on ``layout``; see :func:`adapter_state`."""
    if adapter_layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout={adapter_layout!r} is not one of {LAYOUTS}: use 'compact' (default) or 'uniform'.")
    modules = module_factors(layout, plan.edits)
    top = max(m.rank for m in modules.values())
    if max_rank is not None and top > max_rank:
        raise AdapterError(
            f"the adapter needs LoRA rank {top} (the most components edited in one module), above max_rank="
            f"{max_rank}: the server would refuse it. Raise the server's limit (vLLM: --max-lora-rank >= {top}) "
            "or edit fewer components per layer (a smaller fit budget)."
        )
    if adapter_layout == "uniform":
        modules = uniform_modules(layout, modules)
    elif uniform_rank:
        modules = {n: pad_rank(m, top) for n, m in modules.items()}
    name = base_model_name_or_path if base_model_name_or_path is not None else published_name(plan.base.name_or_path)
    config = _config_dict(layout, modules, plan, name, uniform=adapter_layout == "uniform")
    tensors = {}
    for n, m in modules.items():
        tensors[LORA_KEY.format(name=n, ab="A")] = m.lora_A.to(dtype).contiguous()
        tensors[LORA_KEY.format(name=n, ab="B")] = m.lora_B.to(dtype).contiguous()
    if adapter_layout == "uniform":
        check_uniform_layout(config, tensors, layout.n_layers)
    return config, tensors, modules


__getattr__ = renamed_attributes(__name__, {"plan_of": "plan_to_export", "state_of": "adapter_parts"})
