"""Tiny random models of every supported architecture, built from configs (no downloads).

Shapes are chosen so that the traps of ``architectures.md`` are exercised: grouped-query attention
(K < H) wherever the family allows it, a head size that differs from d / H (Gemma, Qwen3), fused
projections (GPT-2, GPT-NeoX, Phi-3), biases, and non-trivial norm gains (every parameter is random).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

D, L, H, V = 48, 3, 4, 97
_COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_LLAMA_LIKE = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
                   intermediate_size=96, max_position_embeddings=64)

CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=D, n_layer=L, n_head=H, n_positions=64),
    "gpt_neox": dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=96,
                     max_position_embeddings=64, rotary_pct=0.5),
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=16),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, head_dim=16, num_key_value_heads=1),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "opt": dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=96, word_embed_proj_dim=D,
                max_position_embeddings=64),
    "gptj": dict(n_embd=D, n_layer=L, n_head=H, n_positions=64, rotary_dim=6),
    "phi": dict(_LLAMA_LIKE, partial_rotary_factor=0.5),
    "phi3": dict(_LLAMA_LIKE),
}
ARCHS = list(CONFIGS)


def make_config(arch: str, **overrides):
    return AutoConfig.for_model(arch, **{**_COMMON, **CONFIGS[arch], **overrides})


def make_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny ``arch`` causal LM with every parameter random (norm gains around 1), in eval mode."""
    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            is_gain = name.endswith("weight") and p.ndim == 1
            if is_gain and not arch.startswith("gemma"):
                p.add_(1.0)
    return model.to(dtype).eval()


def input_ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_tokenizer(words):
    """A word-level fast tokenizer over ``words`` (ids 0-3: pad, bos, eos, unk; punctuation split off)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")


def laundry_words(every_pool: bool = False) -> list[str]:
    """Every word and punctuation mark the th_edit task templates can produce (with ``every_pool``, the
    other item pools and omitted-item wordings too; off by default, so the tiny models stay as they were)."""
    import re

    from th_edit.tasks import data

    pools = data.ITEM_POOLS.values() if every_pool else [data.ITEMS]
    words = [w for pool in pools for w in pool] + list(data.NAMES)
    for template in ((*data.OMITTED_TEMPLATES, "recall") if every_pool else ("omitted", "recall")):
        for row in data.laundry_list(None, lengths=[2, 3], n_per_length=8, template=template)["train"]:
            words += re.findall(r"\w+|[^\w\s]+", row["prompt"])
    for t in data._IOI_TEMPLATES:
        words += re.findall(r"\w+|[^\w\s]+", t.replace("{A}", "").replace("{B}", ""))
    return list(dict.fromkeys(words))


def laundry_tokenizer(every_pool: bool = False):
    """A word-level tokenizer covering the task templates (one token per word)."""
    return make_tokenizer(laundry_words(every_pool))


def laundry_model(arch: str = "llama", seed: int = 0, every_pool: bool = False, **overrides):
    """A tiny random ``arch`` model whose vocabulary matches :func:`laundry_tokenizer`."""
    tok = laundry_tokenizer(every_pool)
    return make_model(arch, seed=seed, vocab_size=len(tok), max_position_embeddings=256,
                      **({"n_positions": 256} if arch in ("gpt2", "gptj") else {}), **overrides), tok
