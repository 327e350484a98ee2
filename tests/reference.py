"""An independent, dense reading of per-head weights straight from ``state_dict`` tensors.

Written separately from ``th_edit.core.layout`` (reshapes instead of offsets, explicit dense norm
matrices) so that the two can check each other.
"""

from __future__ import annotations

import torch


def _heads_in(w_out_in: torch.Tensor, n: int) -> torch.Tensor:
    """[n*dh, d] Linear weight -> [n, d, dh] row-form per-head weights."""
    out, d = w_out_in.shape
    return w_out_in.reshape(n, out // n, d).transpose(1, 2)


def reference_heads(model, arch: str) -> dict[str, torch.Tensor]:
    """Per-layer, per-head row-form weights: W_Q [L,H,d,dh], W_K/W_V [L,K,d,dh], W_O [L,H,dh,d],
    plus norm gain/bias [L,d] (raw stored values) and q/k norm gains [L,dh] where present."""
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    H = cfg.num_attention_heads
    K = getattr(cfg, "num_key_value_heads", None) or H
    d = cfg.hidden_size
    out = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "g", "b", "gq", "gk")}
    for i in range(cfg.num_hidden_layers):
        if arch == "gpt2":
            p = f"transformer.h.{i}."
            w = sd[p + "attn.c_attn.weight"]  # [d, 3d] Conv1D
            q, k, v = w.split(d, dim=1)
            Wq, Wk, Wv = (t.reshape(d, H, d // H).permute(1, 0, 2) for t in (q, k, v))
            Wo = sd[p + "attn.c_proj.weight"].reshape(H, d // H, d)
            g, b = sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]
        elif arch == "gpt_neox":
            p = f"gpt_neox.layers.{i}."
            w = sd[p + "attention.query_key_value.weight"]  # [3d, d]
            per = w.reshape(H, 3, d // H, d)
            Wq, Wk, Wv = (per[:, j].transpose(1, 2) for j in range(3))
            Wo = _heads_in(sd[p + "attention.dense.weight"].T.contiguous(), H).transpose(1, 2)
            g, b = sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"]
        elif arch == "phi3":
            p = f"model.layers.{i}."
            w = sd[p + "self_attn.qkv_proj.weight"]
            dh = w.shape[0] // (H + 2 * K)
            q, k, v = w.split([H * dh, K * dh, K * dh], dim=0)
            Wq, Wk, Wv = _heads_in(q, H), _heads_in(k, K), _heads_in(v, K)
            Wo = _heads_in(sd[p + "self_attn.o_proj.weight"].T.contiguous(), H).transpose(1, 2)
            g, b = sd[p + "input_layernorm.weight"], None
        else:
            names = {
                "opt": ("model.decoder.layers", "self_attn", "out_proj", "self_attn_layer_norm"),
                "gptj": ("transformer.h", "attn", "out_proj", "ln_1"),
                "phi": ("model.layers", "self_attn", "dense", "input_layernorm"),
            }.get(arch, ("model.layers", "self_attn", "o_proj", "input_layernorm"))
            p = f"{names[0]}.{i}."
            Wq = _heads_in(sd[p + f"{names[1]}.q_proj.weight"], H)
            Wk = _heads_in(sd[p + f"{names[1]}.k_proj.weight"], K)
            Wv = _heads_in(sd[p + f"{names[1]}.v_proj.weight"], K)
            Wo = _heads_in(sd[p + f"{names[1]}.{names[2]}.weight"].T.contiguous(), H).transpose(1, 2)
            g, b = sd.get(p + f"{names[3]}.weight"), sd.get(p + f"{names[3]}.bias")
            if p + "self_attn.q_norm.weight" in sd:
                out["gq"].append(sd[p + "self_attn.q_norm.weight"])
                out["gk"].append(sd[p + "self_attn.k_norm.weight"])
        for key, val in (("W_Q", Wq), ("W_K", Wk), ("W_V", Wv), ("W_O", Wo), ("g", g), ("b", b)):
            out[key].append(val)
    return {k: (torch.stack(v) if v and v[0] is not None else None) for k, v in out.items()}


def dense_norm_matrix(arch: str, gain: torch.Tensor) -> torch.Tensor:
    """The [d, d] linear part N of the pre-attention norm, built densely: C diag(g) or diag(g)."""
    d = gain.numel()
    if arch.startswith("gemma"):
        gain = 1.0 + gain
    N = torch.diag(gain.double())
    if arch in ("gpt2", "gpt_neox", "opt", "gptj", "phi"):
        C = torch.eye(d, dtype=torch.float64) - torch.ones(d, d, dtype=torch.float64) / d
        N = C @ N
    return N


def dense_circuit(model, arch: str, layer: int, head: int, circuit: str, folded: bool) -> torch.Tensor:
    """The [d, d] float64 circuit computed densely from the reference weights."""
    ref = reference_heads(model, arch)
    H = model.config.num_attention_heads
    K = ref["W_K"].shape[1]
    g = head // (H // K)
    Wq, Wk, Wv = (ref[n][layer, i].double() for n, i in (("W_Q", head), ("W_K", g), ("W_V", g)))
    Wo = ref["W_O"][layer, head].double()
    if folded:
        N = dense_norm_matrix(arch, ref["g"][layer])
        Wq, Wk, Wv = N @ Wq, N @ Wk, N @ Wv
        if ref["gq"] is not None:
            gq, gk = ref["gq"][layer].double(), ref["gk"][layer].double()
            if arch.startswith("gemma"):
                gq, gk = 1 + gq, 1 + gk
            Wq, Wk = Wq @ torch.diag(gq), Wk @ torch.diag(gk)
    return Wv @ Wo if circuit == "ov" else Wq @ Wk.T
