"""Per-head views of a live model's attention weights, from its :class:`~th_edit.core.architectures.ArchSpec`.

:class:`AttentionLayout` turns a spec plus a live model into views of per-head weights in row-vector
form (``W_Q[h], W_K[h], W_V[h]: [d, d_h]``, ``W_O[h]: [d_h, d]``). Views alias the model's storage, so
writing through them edits the model in place and touches nothing else. Parameters offloaded by
accelerate are followed to their real storage (:func:`resolve_param`).

Grouped-query attention: query head ``h`` reads key/value head ``h // (H // K)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, OffloadedWeightsError, QuantizedModelError, UnsupportedModelError
from .architectures import ArchSpec, get_spec

__all__ = ["AttentionLayout", "resolve_param", "check_not_quantized"]

#: the weight dtypes th_edit reads and writes exactly
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: substrings of the class names of quantized linear layers (bitsandbytes, GPTQ, AWQ, HQQ, EETQ, quanto, ...)
_QUANT_CLASS_MARKERS = ("8bit", "4bit", "Int8", "Int4", "QuantLinear", "WQLinear", "Quant", "HQQ", "EetqLinear",
                        "FP8", "Fp8", "Marlin", "Exllama", "Gemlite")
_FIX = ("th_edit edits floating-point weights in place and cannot change quantized codes. Load the model in "
        "float (e.g. from_pretrained(..., dtype=torch.float32) without quantization_config / load_in_8bit / "
        "load_in_4bit), edit and save it, then quantize the edited checkpoint.")


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def check_not_quantized(model: nn.Module, modules: list[nn.Module]) -> None:
    """Raise :class:`QuantizedModelError` if ``model`` is quantized or any of ``modules`` (the attention
    projections) holds a quantized layer or a non-float weight. GGUF models are de-quantized floats: allowed."""
    method = _quant_method(model.config)
    if method is not None and method != "gguf":
        raise QuantizedModelError(f"the model is quantized (quantization_config with quant_method={method!r}). {_FIX}")
    for mod in modules:
        name = type(mod).__name__
        if any(marker in name for marker in _QUANT_CLASS_MARKERS):
            raise QuantizedModelError(f"the attention projection is a quantized layer ({type(mod).__module__}.{name}). {_FIX}")
        weight = getattr(mod, "weight", None)
        if weight is None:
            continue
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or type(data) is not torch.Tensor:
            kind = type(data).__name__ if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise QuantizedModelError(
                f"an attention projection ({name}) holds a {getattr(weight, 'dtype', kind)} weight of type {kind}, "
                f"not a plain float tensor. {_FIX}"
            )


def resolve_param(module: nn.Module, name: str, *, write: bool = False) -> torch.Tensor:
    """The tensor holding ``module.<name>``'s real values, following accelerate's offload hooks.

    Offloaded parameters are ``meta`` tensors whose values live in ``module._hf_hook.weights_map``.
    Reading works for any offload; writing (``write=True``) needs the real storage, which exists for
    in-memory offload (``cpu_offload``: a dict of tensors) but not for disk offload (each access reads
    a fresh copy from a file), so that case raises :class:`OffloadedWeightsError` instead of becoming a
    silent no-op.
    """
    param = getattr(module, name)
    if param is None or param.device.type != "meta":
        return param
    for weights_map in _weights_maps(getattr(module, "_hf_hook", None)):
        try:
            real = weights_map[name]
        except Exception:  # noqa: BLE001 - any failure means the storage is not reachable here
            continue
        if not isinstance(real, torch.Tensor) or real.device.type == "meta":
            continue
        if not write:
            return real
        dataset = getattr(weights_map, "dataset", weights_map)
        key = getattr(weights_map, "prefix", "") + name
        storage = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", None)
        if isinstance(storage, dict) and storage.get(key) is real:
            return real
    raise OffloadedWeightsError(
        f"parameter {name!r} of {type(module).__name__} is on the meta device (offloaded by accelerate) and "
        f"th_edit cannot {'edit its real storage in place' if write else 'read its real values'} (disk "
        "offload). Load the model so the attention layers fit in CPU/GPU memory (device_map with max_memory, "
        "or offload to 'cpu' rather than 'disk'), or edit a non-offloaded copy and save it."
    )


def _weights_maps(hook) -> list:
    """The ``weights_map`` of an accelerate hook, looking inside a ``SequentialHook``'s hooks too."""
    if hook is None:
        return []
    maps = [hook.weights_map] if getattr(hook, "weights_map", None) is not None else []
    for inner in getattr(hook, "hooks", ()) or ():
        maps += _weights_maps(inner)
    return maps


class AttentionLayout:
    """Per-head views of one model's attention weights, in row-vector form.

    Args:
        model: a transformers causal LM whose ``config.model_type`` is in :data:`ARCHITECTURES`.
        spec: override the table entry (for architectures th_edit does not know).

    Attributes:
        n_layers (L), n_heads (H), n_kv_heads (K), d_model (d), d_head (d_h).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            raise UnsupportedModelError(
                f"th_edit edits a transformers causal LM (a model with a .config), not {type(model).__name__}: "
                "load one with AutoModelForCausalLM.from_pretrained(...) or th_edit.models.load_model(...)."
            )
        self.spec = spec if spec is not None else get_spec(config)
        self.model = model
        self.blocks = list(model.get_submodule(self.spec.layers))
        paths = dict.fromkeys(p for p in (self.spec.q, self.spec.k, self.spec.v, self.spec.o) if p)
        check_not_quantized(model, [b.get_submodule(p) for b in self.blocks for p in paths])
        o_in = self.row_form(self._tensor(0, self.spec.o)).shape[0]
        self._set_geometry(config, len(self.blocks), o_in)

    def _set_geometry(self, config, n_layers: int, o_in: int) -> None:
        """Set L, H, K, d, d_h and ``norm_enabled`` from the config and the output projection's input size."""
        self.n_layers = n_layers
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}."
            )
        self.d_model = int(config.hidden_size)
        if o_in % self.n_heads:
            raise UnsupportedModelError(
                f"output projection input size {o_in} is not a multiple of {self.n_heads} heads."
            )
        self.d_head = o_in // self.n_heads
        self.norm_enabled = self.spec.attn_norm is not None and (
            self.spec.norm_enabled_flag is None or bool(getattr(config, self.spec.norm_enabled_flag, True))
        )

    # ----- low-level access ---------------------------------------------------------------------
    def _param(self, module: nn.Module, name: str, write: bool = False) -> torch.Tensor | None:
        if getattr(module, name, None) is None:
            return None
        return resolve_param(module, name, write=write)

    def _tensor(self, layer: int | None, path: str, name: str = "weight", write: bool = False) -> torch.Tensor | None:
        """The tensor ``name`` of the module at ``path`` in block ``layer`` (``layer=None``: ``path`` from the
        model's root), or None. Every weight view below reads through here (a checkpoint-backed layout
        overrides it)."""
        module = self.model.get_submodule(path) if layer is None else self.module(layer, path)
        return self._param(module, name, write)

    def _norm_eps(self, layer: int | None, path: str) -> float:
        """The epsilon of the norm at ``path`` (as :meth:`_tensor` locates it)."""
        mod = self.model.get_submodule(path) if layer is None else self.module(layer, path)
        return float(next((getattr(mod, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(mod, a)), 1e-5))

    def row_form(self, weight: torch.Tensor) -> torch.Tensor:
        """``[in, out]`` view of a projection weight."""
        return weight if self.spec.conv1d else weight.t()

    def head_offset(self, kind: str, head: int) -> int:
        """Start of head ``head``'s ``kind`` ('q', 'k' or 'v') columns in its module's output dim."""
        H, K, dh = self.n_heads, self.n_kv_heads, self.d_head
        layout = self.spec.qkv_layout
        if layout == "separate":
            return head * dh
        if layout == "contiguous":
            return {"q": 0, "k": H * dh, "v": H * dh + K * dh}[kind] + head * dh
        if layout == "interleaved":
            return head * 3 * dh + {"q": 0, "k": dh, "v": 2 * dh}[kind]
        raise UnsupportedModelError(f"unknown qkv_layout {layout!r}")

    def kv_head(self, head: int) -> int:
        """Key/value head read by query head ``head`` (GQA): ``head // (H // K)``."""
        return head // (self.n_heads // self.n_kv_heads)

    def check(self, layer: int, head: int) -> None:
        """Raise :class:`InvalidArgumentError` if ``(layer, head)`` is out of range."""
        for name, value, n in (("layer", layer, self.n_layers), ("head", head, self.n_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"{name}={value!r} must be a Python int, not {type(value).__name__} "
                                           f"(pass int({name})).")
            if not 0 <= value < n:
                raise InvalidArgumentError(f"{name}={value!r} is out of range: this model has {n} (0..{n - 1}).")

    def module(self, layer: int, path: str) -> nn.Module:
        return self.blocks[layer].get_submodule(path)

    # ----- per-head views (aliasing model storage) ----------------------------------------------
    def out_module(self, layer: int) -> nn.Module:
        """The output projection of ``layer``: its input ``[..., H * d_h]`` holds every head's output
        ``z`` side by side (head ``h`` at :meth:`head_slice`); hooking it is how head outputs are read."""
        return self.module(layer, self.spec.o)

    def head_slice(self, head: int) -> slice:
        """Columns of head ``head`` in the output projection's input ``[..., H * d_h]``."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    def proj_weight(self, layer: int, head: int, kind: str, *, write: bool = False) -> torch.Tensor:
        """``[d, d_h]`` view of ``W_Q[h]`` (kind 'q'), ``W_K[g]`` or ``W_V[g]`` (g = kv head of h).
        With ``write=True`` the view is guaranteed to alias the real storage (or an error is raised)."""
        idx = head if kind == "q" else self.kv_head(head)
        weight = self.row_form(self._tensor(layer, getattr(self.spec, kind), "weight", write))
        return weight.narrow(1, self.head_offset(kind, idx), self.d_head)

    def proj_bias(self, layer: int, head: int, kind: str) -> torch.Tensor | None:
        """``[d_h]`` view of the q/k/v bias of the head, or None."""
        idx = head if kind == "q" else self.kv_head(head)
        bias = self._tensor(layer, getattr(self.spec, kind), "bias")
        return None if bias is None else bias.narrow(0, self.head_offset(kind, idx), self.d_head)

    def out_weight(self, layer: int, head: int, *, write: bool = False) -> torch.Tensor:
        """``[d_h, d]`` view of ``W_O[h]`` (``write``: as in :meth:`proj_weight`)."""
        w = self.row_form(self._tensor(layer, self.spec.o, "weight", write))
        return w.narrow(0, head * self.d_head, self.d_head)

    def out_bias(self, layer: int) -> torch.Tensor | None:
        """``[d]`` output bias of the layer (shared by all heads), or None."""
        return self._tensor(layer, self.spec.o, "bias")

    def _effective_gain(self, layer: int | None, path: str, kind: str) -> torch.Tensor | None:
        """A norm's multiplicative gain as applied (``1 + w`` for Gemma's ``rmsnorm_plus_one``), or None."""
        w = self._tensor(layer, path)
        if w is None:
            return None
        return 1.0 + w.float() if kind == "rmsnorm_plus_one" else w

    def norm_params(self, layer: int) -> tuple[str | None, torch.Tensor | None, torch.Tensor | None]:
        """``(kind, gain [d], bias [d])`` of the pre-attention norm; gain is the effective one (1 + w
        for Gemma). ``kind`` is None when the attention reads the residual stream directly."""
        if not self.norm_enabled:
            return None, None, None
        path, kind = self.spec.attn_norm, self.spec.norm_kind
        return kind, self._effective_gain(layer, path, kind), self._tensor(layer, path, "bias")

    def final_norm_params(self) -> tuple[str, torch.Tensor | None, torch.Tensor | None, float]:
        """``(kind, effective gain [d], bias [d], eps)`` of the norm before the unembedding."""
        return self._norm_params(None, self.spec.final_norm)

    def _norm_params(self, layer: int | None, path: str) -> tuple[str, torch.Tensor | None, torch.Tensor | None, float]:
        kind = self.spec.norm_kind
        return kind, self._effective_gain(layer, path, kind), self._tensor(layer, path, "bias"), self._norm_eps(layer, path)

    def post_attn_norm_params(self, layer: int) -> tuple[str, torch.Tensor | None, torch.Tensor | None, float] | None:
        """``(kind, effective gain [d], bias [d], eps)`` of the norm on ``layer``'s attention output before the
        residual add (Gemma2/3), or None when the architecture has none."""
        if self.spec.post_attn_norm is None:
            return None
        return self._norm_params(layer, self.spec.post_attn_norm)

    def qk_gains(self, layer: int, head: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Effective ``[d_h]`` gains of the per-head query and key norms, or ``(None, None)``."""
        if self.spec.q_norm is None:
            return None, None
        q, k = (self._effective_gain(layer, path, self.spec.qk_norm_kind) for path in (self.spec.q_norm, self.spec.k_norm))
        return q, k

    def target(self, layer: int, head: int, circuit: str) -> torch.Tensor:
        """The writable view an edit of ``circuit`` changes: ``W_O[h]`` for 'ov', ``W_Q[h]`` for 'qk'."""
        if circuit == "ov":
            return self.out_weight(layer, head, write=True)
        if circuit == "qk":
            return self.proj_weight(layer, head, "q", write=True)
        raise InvalidArgumentError(f"circuit={circuit!r} is not one of 'ov', 'qk'.")
