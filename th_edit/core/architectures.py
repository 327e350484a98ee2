"""Where each model family keeps its per-head attention weights: one declarative table.

Keyed by ``config.model_type``, never by a model's name. Each :class:`ArchSpec` says where the blocks
are, which module holds the pre-attention normalisation, how the query/key/value projections are laid
out (separate modules, one fused matrix in contiguous ``[Q | K | V]`` blocks, or a fused matrix
interleaved per head as ``(head, {q, k, v}, d_h)``), and whether weights are stored ``[out, in]``
(``nn.Linear``) or ``[in, out]`` (GPT-2's ``Conv1D``).

This module is data (plus :func:`get_spec`); :mod:`th_edit.core.layout` turns a spec and a live model into
per-head weight views. To add an architecture, add one :class:`ArchSpec` entry here and a tiny config to
``tests/tiny_models.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError

__all__ = ["ArchSpec", "ARCHITECTURES", "supported_model_types", "get_spec"]


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its attention weights.

    Attributes:
        layers: dotted path from the ``*ForCausalLM`` module to the ``ModuleList`` of blocks.
        attn_norm: path, relative to a block, of the pre-attention norm (None if there is none).
        norm_kind: ``"layernorm"``, ``"rmsnorm"`` or ``"rmsnorm_plus_one"`` (Gemma stores gain as 1 + w).
        qkv_layout: ``"separate"``, ``"contiguous"`` (fused ``[Q | K | V]`` row blocks) or
            ``"interleaved"`` (fused, ordered ``(head, {q, k, v}, d_h)``).
        q, k, v: module paths relative to a block (the same path for fused layouts).
        o: output projection path relative to a block.
        conv1d: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``) instead of ``[out, in]``.
        q_norm, k_norm: per-head query/key norm paths (Qwen3, Gemma3); only their gain is folded.
        qk_norm_kind: norm kind of ``q_norm``/``k_norm``.
        norm_enabled_flag: config flag that must be true for ``attn_norm`` to apply (OPT).
        unsupported_flags: config flags that make the model unsupported, with the reason.
        final_norm: path from the ``*ForCausalLM`` module to the norm before the unembedding (same kind as
            ``norm_kind``); used for direct logit attribution.
        post_attn_norm: path, relative to a block, of a norm applied to the attention output before it is
            added to the residual stream (Gemma2/Gemma3 "sandwich" norms; same kind as ``norm_kind``), or None.
            Direct logit attribution linearises it like the final norm. (In Llama and Gemma 1 the module
            called ``post_attention_layernorm`` is the pre-MLP norm, so they have None here.)
    """

    layers: str
    attn_norm: str | None
    norm_kind: str
    qkv_layout: str
    q: str
    k: str
    v: str
    o: str
    conv1d: bool = False
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_kind: str = "rmsnorm"
    norm_enabled_flag: str | None = None
    unsupported_flags: tuple[tuple[str, str], ...] = ()
    final_norm: str = "model.norm"
    post_attn_norm: str | None = None


_LLAMA = ArchSpec(
    layers="model.layers", attn_norm="input_layernorm", norm_kind="rmsnorm", qkv_layout="separate",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
)
_GEMMA = ArchSpec(
    layers="model.layers", attn_norm="input_layernorm", norm_kind="rmsnorm_plus_one", qkv_layout="separate",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
)

#: The architecture table, keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", attn_norm="ln_1", norm_kind="layernorm", qkv_layout="contiguous",
        q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj", conv1d=True,
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", attn_norm="input_layernorm", norm_kind="layernorm", qkv_layout="interleaved",
        q="attention.query_key_value", k="attention.query_key_value", v="attention.query_key_value",
        o="attention.dense", final_norm="gpt_neox.final_layer_norm",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": ArchSpec(**{**_LLAMA.__dict__, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}),
    "smollm3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": ArchSpec(**{**_GEMMA.__dict__, "post_attn_norm": "post_attention_layernorm"}),
    "gemma3_text": ArchSpec(
        **{**_GEMMA.__dict__, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
           "qk_norm_kind": "rmsnorm_plus_one", "post_attn_norm": "post_attention_layernorm"}
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers", attn_norm="self_attn_layer_norm", norm_kind="layernorm",
        qkv_layout="separate", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        o="self_attn.out_proj", norm_enabled_flag="do_layer_norm_before",
        final_norm="model.decoder.final_layer_norm",
    ),
    "gptj": ArchSpec(
        layers="transformer.h", attn_norm="ln_1", norm_kind="layernorm", qkv_layout="separate",
        q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", o="attn.out_proj", final_norm="transformer.ln_f",
    ),
    "phi": ArchSpec(
        layers="model.layers", attn_norm="input_layernorm", norm_kind="layernorm", qkv_layout="separate",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense",
        final_norm="model.final_layernorm",
        unsupported_flags=(("qk_layernorm", "its per-head LayerNorm on queries and keys (centering "
                            "included) cannot be folded into W_Q/W_K"),),
    ),
    "phi3": ArchSpec(
        layers="model.layers", attn_norm="input_layernorm", norm_kind="rmsnorm", qkv_layout="contiguous",
        q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj", o="self_attn.o_proj",
    ),
}


def supported_model_types() -> list[str]:
    """Sorted list of the ``config.model_type`` values th_edit supports."""
    return sorted(ARCHITECTURES)


def get_spec(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a transformers config, or :class:`UnsupportedModelError`."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by th_edit. Supported types: "
            f"{', '.join(supported_model_types())}. To add one, describe where its attention weights live "
            "with an ArchSpec and pass it as ChannelEditor(model, spec=...)."
        )
    for flag, reason in spec.unsupported_flags:
        if getattr(config, flag, False):
            raise UnsupportedModelError(
                f"{model_type} with {flag}=True is not supported: {reason}. Use a checkpoint with {flag}=False."
            )
    return spec
