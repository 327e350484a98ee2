"""The uniform adapter layout (every layer has every target module with one rank) against the compact one,
through real, unpatched peft; the structural check servers rely on; the ``max_rank`` limit."""

import json
import warnings

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import L, input_ids, make_model

from th_edit import ChannelEditor
from th_edit.app.cli import main
from th_edit.core.architectures import ARCHITECTURES
from th_edit.errors import AdapterError
from th_edit.sharing.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_state,
    check_uniform_layout,
    load_adapter_edits,
)


def _edit(editor):
    """OV edits in layers 0 and 1 (ranks 1 and 3), a QK edit in layer 2 only (rank 2)."""
    editor.scale_component(0, 1, "ov", 1, 3.0)
    editor.scale_component(1, 2, "ov", [0, 1], 0.0)
    editor.scale_component(1, 3, "ov", 0, 4.0)
    editor.scale_component(2, 2, "qk", [0, 1], 1.5)
    return editor


def _peft(arch, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(make_model(arch), str(folder)).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_uniform_adapter_equals_compact_through_peft(arch, tmp_path):
    editor = _edit(ChannelEditor(make_model(arch)))
    editor.save_adapter(tmp_path / "compact")
    editor.save_adapter(tmp_path / "uniform", layout="uniform")
    spec = ARCHITECTURES[arch]

    config = json.loads((tmp_path / "uniform" / ADAPTER_CONFIG).read_text())
    want = {f"{spec.layers}.{layer}.{path}" for layer in range(L) for path in (spec.o, spec.q)}
    assert set(config["target_modules"]) == want  # both module types in every layer
    assert config["r"] == config["lora_alpha"] == 3 and not config["rank_pattern"] and not config["alpha_pattern"]
    tensors = load_file(str(tmp_path / "uniform" / ADAPTER_WEIGHTS))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {3}
    assert {t.shape[1] for k, t in tensors.items() if "lora_B" in k} == {3}
    zero = f"base_model.model.{spec.layers}.2.{spec.o}.lora_B.weight"  # nothing edited there
    assert not tensors[zero].any()

    compact, uniform = _peft(arch, tmp_path / "compact"), _peft(arch, tmp_path / "uniform")
    edited = _logits(editor.model)
    assert float((_logits(uniform) - _logits(compact)).abs().max()) < 1e-5  # float32 sums in another order
    assert float((_logits(uniform) - edited).abs().max()) < 1e-5
    assert (_logits(uniform) - _logits(make_model(arch))).abs().max() > 1e-3  # the edit does something
    merged_c, merged_u = compact.merge_and_unload().state_dict(), uniform.merge_and_unload().state_dict()
    assert merged_c.keys() == merged_u.keys()
    assert max(float((merged_c[k] - merged_u[k]).abs().max()) for k in merged_c) < 1e-6
    state = editor.model.state_dict()
    assert max(float((merged_u[k] - state[k]).abs().max()) for k in merged_u) < 1e-6

    # th_edit reads it back as the same edits, and the structural check passes on what was written
    assert len(load_adapter_edits(ChannelEditor(make_model(arch)).layout, tmp_path / "uniform").edits) == 4
    check_uniform_layout(config, tensors, L)


def test_compact_is_the_smaller_default_and_cards_name_the_layout(tmp_path):
    editor = _edit(ChannelEditor(make_model("llama")))
    editor.save_adapter(tmp_path / "c")
    editor.save_adapter(tmp_path / "u", layout="uniform")
    sizes = [(tmp_path / d / ADAPTER_WEIGHTS).stat().st_size for d in "cu"]
    assert sizes[0] < sizes[1]
    compact, uniform = (ModelCard.load(tmp_path / d / "README.md").text for d in "cu")
    assert "**Layout: compact.**" in compact and "re-save with" in compact
    assert "**Layout: uniform.**" in uniform and "--max-lora-rank 8" in uniform
    assert "3 of the 6" in uniform  # o and q of 3 layers; o of layers 0, 1 and q of layer 2 are edited
    for text in (compact, uniform):
        assert "## Serving" in text and "vllm serve" in text


def test_structural_check_refuses_every_partial_adapter():
    editor = _edit(ChannelEditor(make_model("llama")))
    config, tensors = adapter_state(editor.layout, editor.export_plan(), adapter_layout="uniform")
    check_uniform_layout(config, tensors, L)
    with pytest.raises(AdapterError, match="missing in layer"):
        check_uniform_layout(*adapter_state(editor.layout, editor.export_plan()), L)  # the compact layout is partial
    with pytest.raises(AdapterError, match="rank_pattern"):
        check_uniform_layout(*adapter_state(editor.layout, editor.export_plan()), L)

    name = config["target_modules"][0]
    dropped = {**config, "target_modules": config["target_modules"][1:]}
    rest = {k: v for k, v in tensors.items() if f".{name}." not in k}
    with pytest.raises(AdapterError, match="missing in layer"):
        check_uniform_layout(dropped, rest, L)
    with pytest.raises(AdapterError, match=r"missing in layer\(s\) \[3\]"):
        check_uniform_layout(config, tensors, L + 1)  # a model with one more layer
    key = f"base_model.model.{name}.lora_A.weight"
    with pytest.raises(AdapterError, match="not r=3"):
        check_uniform_layout(config, {**tensors, key: tensors[key][:2]}, L)
    with pytest.raises(AdapterError, match="lora_alpha"):
        check_uniform_layout({**config, "lora_alpha": 6}, tensors, L)
    with pytest.raises(AdapterError, match="do not match"):
        check_uniform_layout(config, {k: v for k, v in tensors.items() if k != key}, L)


def test_rank_over_max_rank_is_refused_before_writing(tmp_path):
    editor = _edit(ChannelEditor(make_model("llama")))
    editor.save_adapter(tmp_path / "a", layout="uniform", max_rank=3)  # exactly at the limit: fine
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    editor.scale_component(2, 0, "qk", [0, 1, 2, 3], 2.0)  # layer 2 now needs rank 6
    with pytest.raises(AdapterError, match="max_rank=4"):
        editor.save_adapter(tmp_path / "a", layout="uniform", max_rank=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    with pytest.raises(AdapterError, match="max_rank=4"):
        editor.save_adapter(tmp_path / "new", max_rank=4)  # compact too
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="layout='sparse'"):
        editor.save_adapter(tmp_path / "new", layout="sparse")


def test_cli_edit_writes_a_uniform_adapter(tmp_path):
    editor = _edit(ChannelEditor(make_model("llama")))
    editor.save_plan(tmp_path / "plan")
    model_dir = tmp_path / "base"
    make_model("llama").save_pretrained(model_dir)
    from tiny_models import make_tokenizer

    make_tokenizer(["a", "b"]).save_pretrained(model_dir)
    code = main(["edit", str(model_dir), "--plan", str(tmp_path / "plan"), "--out", str(tmp_path / "out"),
                 "--adapter", "--adapter-layout", "uniform", "--quiet"])
    assert code == 0
    config = json.loads((tmp_path / "out" / "adapter" / ADAPTER_CONFIG).read_text())
    check_uniform_layout(config, load_file(str(tmp_path / "out" / "adapter" / ADAPTER_WEIGHTS)), L)
