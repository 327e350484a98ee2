"""The architecture table against an independent reading of every supported family's weights."""

import types

import pytest
import torch
from reference import dense_circuit, reference_heads
from tiny_models import ARCHS, input_ids, make_model

from th_edit import ChannelEditor, UnsupportedModelError, supported_model_types
from th_edit.core.layout import AttentionLayout

REQUIRED = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
            "opt", "gptj", "phi", "phi3"}


def test_table_covers_required_types():
    assert REQUIRED <= set(supported_model_types())
    assert REQUIRED <= set(ARCHS)


def test_unknown_model_type_is_refused_with_the_supported_list():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mamba"))
    with pytest.raises(UnsupportedModelError) as err:
        ChannelEditor(fake)
    assert "mamba" in str(err.value) and "gpt2" in str(err.value) and "llama" in str(err.value)


def test_unsupported_option_is_refused():
    with pytest.raises(UnsupportedModelError, match="qk_layernorm"):
        ChannelEditor(make_model("phi", qk_layernorm=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_per_head_views_match_independent_reading(arch):
    model = make_model(arch)
    layout = AttentionLayout(model)
    ref = reference_heads(model, arch)
    assert layout.n_kv_heads == ref["W_K"].shape[1]
    assert layout.d_head == ref["W_Q"].shape[-1]
    for layer in range(layout.n_layers):
        for h in range(layout.n_heads):
            g = h // (layout.n_heads // layout.n_kv_heads)
            assert torch.equal(layout.proj_weight(layer, h, "q").float(), ref["W_Q"][layer, h])
            assert torch.equal(layout.proj_weight(layer, h, "k").float(), ref["W_K"][layer, g])
            assert torch.equal(layout.proj_weight(layer, h, "v").float(), ref["W_V"][layer, g])
            assert torch.equal(layout.out_weight(layer, h).float(), ref["W_O"][layer, h])


@pytest.mark.parametrize("arch", ARCHS)
def test_read_then_write_back_is_bit_identical(arch):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = input_ids()
    with torch.no_grad():
        logits_before = model(ids).logits
    layout = AttentionLayout(model)
    with torch.no_grad():
        for layer in range(layout.n_layers):
            for h in range(layout.n_heads):
                for view in (layout.proj_weight(layer, h, "q"), layout.proj_weight(layer, h, "k"),
                             layout.proj_weight(layer, h, "v"), layout.out_weight(layer, h)):
                    view.copy_(view.detach().clone())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("circuit", ["ov", "qk"])
def test_circuits_and_svd_match_dense(arch, folded, circuit):
    model = make_model(arch)
    editor = ChannelEditor(model)
    for layer, head in ((0, 0), (2, 3)):
        dense = dense_circuit(model, arch, layer, head, circuit, folded)
        mine = editor.circuit_matrix(layer, head, circuit, folded=folded).double()
        scale = dense.abs().max()
        assert ((mine - dense).abs().max() / scale) < 1e-5
        U, S, V = editor.svd(layer, head, circuit, folded=folded)
        r = editor.d_head
        S_ref = torch.linalg.svd(dense).S[:r]
        assert ((S.double() - S_ref).abs().max() / S_ref[0]) < 1e-4
        recon = (U.double() * S.double()) @ V.double().T
        assert (torch.linalg.matrix_norm(recon - dense) / torch.linalg.matrix_norm(dense)) < 1e-4


def test_batched_svd_matches_per_head():
    editor = ChannelEditor(make_model("llama"))
    allU, allS, allV = editor.svd_all("qk")
    assert allU.shape == (3, 4, 48, 12) and allS.shape == (3, 4, 12)
    U, S, V = editor.svd(2, 1, "qk")
    torch.testing.assert_close(allS[2, 1], S, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(allU[2, 1] * allS[2, 1], U * S, rtol=1e-4, atol=1e-5)
