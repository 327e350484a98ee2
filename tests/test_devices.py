"""Device and dtype choices: resolution and its errors (GPU presence simulated by monkeypatching torch.cuda),
load_model on a device/dtype/device map, the CLI flags and what they record, --batch-size auto, and the
fit's candidate logits (int logits_to_keep) against a plain full forward."""

import json

import pytest
import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor, DeviceError
from th_edit.app.cli import main
from th_edit.edits.fit import FitConfig
from th_edit.edits.fit_problem import FitProblem, split_rows
from th_edit.sharing.bundled_models import load_model
from th_edit.tasks.data import laundry_list
from th_edit.utils import devices
from th_edit.utils.devices import auto_batch_size, resolve_device, resolve_dtype


def _gpus(monkeypatch, n: int, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_resolve_device_without_a_gpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="no CUDA GPU.*--device cpu"):
            resolve_device(spec)
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu")


def test_resolve_device_with_gpus(monkeypatch):
    _gpus(monkeypatch, 1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"1 GPU\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:7")
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under accelerate launch each process takes its own GPU
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", "cpu") == resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(DeviceError, match="bfloat16.*float32"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(DeviceError):
        resolve_dtype(torch.float16, "cpu")
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")
    _gpus(monkeypatch, 1)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") == torch.float16
    _gpus(monkeypatch, 1, bf16=False)
    assert resolve_dtype("auto", "cuda:0") == torch.float16


@pytest.fixture
def model_dir(tiny_model_dir):
    """The session's tiny saved llama (conftest ``tiny_model_dir``)."""
    return tiny_model_dir


def test_load_model_device_dtype_and_map(model_dir, monkeypatch):
    ref, _ = load_model(str(model_dir))
    assert {p.dtype for p in ref.parameters()} == {torch.float32}
    bf, _ = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():  # loading in bf16 is the fp32 checkpoint cast to bf16
        assert torch.equal(bf(ids).logits, load_model(str(model_dir))[0].to(torch.bfloat16)(ids).logits)
    mapped, _ = load_model(str(model_dir), device_map="auto")  # CPU only here: everything on the CPU
    assert set(getattr(mapped, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert devices.runtime_record(mapped)["device"] == "cpu"
    with pytest.raises(DeviceError, match="disk"):
        load_model(str(model_dir), device_map={"": "disk"})
    with pytest.raises(DeviceError, match="float16"):
        load_model(str(model_dir), device="cpu", dtype="float16")
    _gpus(monkeypatch, 0)
    with pytest.raises(DeviceError, match="--device cpu"):
        load_model(str(model_dir), device="cuda")


def run(capsys, *argv):
    code = main([*argv, "--json", "--quiet"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, json.loads(out.out.strip().splitlines()[-1])


def test_cli_records_device_dtype_and_batch_size(capsys, model_dir, tmp_path):
    code, out = run(capsys, "eval", str(model_dir), "--lengths", "2", "3", "--n", "8", "--device", "cpu",
                    "--dtype", "bfloat16", "--batch-size", "auto", "--report", str(tmp_path / "r"))
    assert code == 0, out
    assert out["runtime"]["device"] == "cpu" and out["runtime"]["dtype"] == "bfloat16"
    assert out["runtime"]["batch_size"] == 16  # auto on the CPU: the default, no probing
    assert "bfloat16" in (tmp_path / "r" / "report.md").read_text()
    code, out = run(capsys, "edit", str(model_dir), "--plan", str(_plan(tmp_path)), "--out", str(tmp_path / "e"),
                    "--device", "cpu")
    assert code == 0 and out["runtime"]["dtype"] == "float32"
    card = (tmp_path / "e" / "README.md").read_text()
    assert "th_edit_runtime" in card and "float32" in card


def _plan(tmp_path):
    model, _ = laundry_model("llama", seed=3)
    editor = ChannelEditor(model)
    editor.scale_component(1, 0, "ov", 0, 0.5)
    editor.save_plan(tmp_path / "plan")
    return tmp_path / "plan"


@pytest.mark.parametrize("flags, match", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "cuda:7"], "no CUDA GPU"),
    (["--device", "cpu", "--dtype", "float16"], "float16 on the CPU"),
    (["--batch-size", "0"], "positive integer or 'auto'"),
])
def test_cli_bad_device_input_exits_2(capsys, model_dir, monkeypatch, flags, match):
    _gpus(monkeypatch, 0)
    code, out = run(capsys, "eval", str(model_dir), "--lengths", "2", "--n", "4", *flags)
    assert code == 2 and match in out["error"]


def test_cli_cuda_index_out_of_range(capsys, model_dir, monkeypatch):
    _gpus(monkeypatch, 1)
    code, out = run(capsys, "eval", str(model_dir), "--lengths", "2", "--n", "4", "--device", "cuda:7")
    assert code == 2 and out["error_type"] == "DeviceError" and "cuda:0 to cuda:0" in out["error"]


def test_auto_batch_size_halves_on_out_of_memory_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("TH_EDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "_BATCH_SIZES", {})
    tried = []

    def probe(b):
        tried.append(b)
        if b > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert auto_batch_size(probe, "m|bf16", "cuda:0", start=256) == 32
    assert tried == [256, 128, 64, 32]
    assert json.loads((tmp_path / "batch_sizes.json").read_text()) == {"m|bf16|cuda:0": 32}
    monkeypatch.setattr(devices, "_BATCH_SIZES", {})  # a new process reads the file
    assert auto_batch_size(lambda b: 1 / 0, "m|bf16", "cuda:0") == 32
    assert auto_batch_size(lambda b: 1 / 0, "m|bf16", "cpu", default=16) == 16
    with pytest.raises(ZeroDivisionError):  # only out-of-memory errors are retried
        auto_batch_size(lambda b: 1 / 0, "other", "cuda:0")
    with pytest.raises(DeviceError, match="--dtype bfloat16"):
        auto_batch_size(lambda b: probe(10 ** 6), "huge", "cuda:0", start=4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_candidate_logits_int_keep_equal_full_forward(arch):
    """The fit's candidate logits (an int logits_to_keep, then each row's answer position) equal the
    candidates' logits read from a plain full forward of the model, for every batch."""
    model, tok = laundry_model(arch, seed=1)
    ds = laundry_list(tok, lengths=[2, 3, 5], n_per_length=8, seed=0)
    editor = ChannelEditor(model, tokenizer=tok)
    problem = FitProblem(model, editor.layout, tok, split_rows(ds["train"], "train"), split_rows(ds["dev"], "dev"),
                         FitConfig(batch_size=5))
    data = problem.data_from(1)
    cache, train, dev = data.cache, data.train, data.dev
    assert problem.keep
    with torch.no_grad():
        for b in train + dev:
            got = problem.candidate_logits(cache, b)
            full = model(**cache.batches[b.index]).logits  # [B, T, V]
            ref = full[torch.arange(len(b.last)), b.last].float().gather(1, b.cand)
            ref = ref.masked_fill(~b.cand_ok, float("-inf"))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            problem.keep = False
            torch.testing.assert_close(problem.candidate_logits(cache, b), ref, rtol=1e-5, atol=1e-5)
            problem.keep = True
