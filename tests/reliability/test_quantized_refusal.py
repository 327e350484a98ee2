"""Issue 13, High: quantized models (bitsandbytes 4/8-bit, GPTQ/AWQ, torchao, any non-float weight) are refused
with a typed error naming the fix, before anything is read or written."""

import pytest
import torch
from tiny_models import make_model
from torch import nn

from th_edit import ChannelEditor, QuantizedModelError, UnsupportedModelError


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_int8_projection_weight_is_refused():
    model = make_model("llama")
    proj = model.model.layers[1].self_attn.o_proj
    proj.weight = nn.Parameter(torch.randint(-127, 127, proj.weight.shape, dtype=torch.int8), requires_grad=False)
    before = _snapshot(model)
    with pytest.raises(QuantizedModelError, match="load the model in float|Load the model in float") as info:
        ChannelEditor(model)
    assert isinstance(info.value, UnsupportedModelError) and "int8" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_float8_weight_is_refused():
    model = make_model("llama")
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = nn.Parameter(proj.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(QuantizedModelError):
        ChannelEditor(model)


@pytest.mark.parametrize("class_name", ["Linear8bitLt", "Linear4bit", "QuantLinear", "WQLinear_GEMM"])
def test_quantized_layer_classes_are_refused(class_name):
    model = make_model("gpt2")
    attn = model.transformer.h[2].attn
    fake = type(class_name, (type(attn.c_proj),), {})  # a float weight, but a quantized layer class
    attn.c_proj.__class__ = fake
    with pytest.raises(QuantizedModelError, match=class_name):
        ChannelEditor(model)


class _Subclass(torch.Tensor):
    """Stands in for torchao's AffineQuantizedTensor (a tensor subclass holding codes)."""


def test_tensor_subclass_weight_is_refused():
    model = make_model("llama")
    proj = model.model.layers[0].self_attn.v_proj
    proj.weight = nn.Parameter(proj.weight.data.as_subclass(_Subclass), requires_grad=False)
    with pytest.raises(QuantizedModelError, match="_Subclass"):
        ChannelEditor(model)


@pytest.mark.parametrize("qc", [{"quant_method": "bitsandbytes", "load_in_8bit": True}, {"quant_method": "gptq", "bits": 4},
                                {"quant_method": "awq"}, {"quant_method": "torchao"}])
def test_quantization_config_is_refused(qc):
    model = make_model("llama")
    model.config.quantization_config = qc
    with pytest.raises(QuantizedModelError, match=qc["quant_method"]):
        ChannelEditor(model)


def test_gguf_dequantized_floats_are_still_accepted():
    model = make_model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    assert ChannelEditor(model).n_layers == 3


def test_float_dtypes_are_accepted():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ChannelEditor(make_model("gpt2", dtype=dtype)).n_heads == 4
