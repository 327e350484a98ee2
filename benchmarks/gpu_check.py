"""GPU self-check in one command: correctness against the CPU, then throughput at real geometries.

Run:  python benchmarks/gpu_check.py                        # first GPU, bf16 throughput, gpu_check.json
      python benchmarks/gpu_check.py --device cuda:1 --dtype float16 --out check.json
      python benchmarks/gpu_check.py --device cpu --small   # the test suite's run (tests/test_gpu_check.py)

Correctness (float32, tiny random models of every architecture in tests/tiny_models.py, each computed on
``--device`` and on the CPU): per-head SVD, an exact edit (logits), undo bit for bit, steering equal to the
weight edit, the channel map, a plan made on the device re-applied on the CPU, the peft LoRA adapter, and a
short fit whose log-scales match the CPU fit. Every check stores its error and a pass flag under
``correctness``; ``all_correct`` is their conjunction.

Throughput (``--dtype``, random weights at the attention geometry of SmolLM2-135M, Gemma-3-270M,
Llama-3-8B (GQA) and Llama-2-7B): the channel map (q, k, v), ``evaluate`` against a per-prompt loop, fit
steps and a whole (short) fit of every upper-layer head at budget 256, with the device's peak memory for
each. ``--small`` shrinks every geometry to a toy one (for the CPU test); ``--skip-throughput`` skips it.

Needs torch, transformers, accelerate and peft (the adapter check is skipped without peft); not
``datasets`` (the task rows are built as plain lists when it is missing). Results: one JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import ARCHS, input_ids, laundry_model, make_model  # noqa: E402

from th_edit import ChannelEditor  # noqa: E402
from th_edit.tasks.data import laundry_list  # noqa: E402
from th_edit.tasks.evaluate import evaluate  # noqa: E402
from th_edit.utils.devices import resolve_device, resolve_dtype  # noqa: E402

#: attention geometry of real models (MLP widths and vocabularies as published); random weights
GEOMETRIES = {
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=576, intermediate_size=1536, vocab_size=49152),
    "gemma-3-270m": dict(model_type="gemma3_text", num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                         hidden_size=640, head_dim=256, intermediate_size=2048, vocab_size=262144,
                         query_pre_attn_scalar=256, sliding_window=512),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       hidden_size=4096, intermediate_size=14336, vocab_size=128256),
    "llama-7b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     hidden_size=4096, intermediate_size=11008, vocab_size=32000),
}
SMALL = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, vocab_size=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Reset CUDA's peak-memory counter (CUDA initialised first: resetting before raises)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----- correctness -----------------------------------------------------------------------------------
def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


def check_arch(arch: str, device: torch.device) -> dict:
    """SVD, edit, undo, steering, channel map and plan of one tiny ``arch`` model on ``device`` vs the CPU."""
    cpu_model = make_model(arch)
    dev_model = copy.deepcopy(cpu_model).to(device)
    original = {k: v.clone() for k, v in dev_model.state_dict().items()}
    cpu, dev = ChannelEditor(cpu_model), ChannelEditor(dev_model)
    ids = input_ids()
    out: dict = {}
    s_cpu, s_dev = cpu.svd(1, 1, "ov"), dev.svd(1, 1, "ov")
    out["svd_rel"] = rel(s_dev.S, s_cpu.S)
    for e in (cpu, dev):
        e.scale_component(1, 1, "ov", [0, 1], 0.0)
        e.scale_component(1, 2, "ov", 0, 2.0)
        e.scale_component(2, 0, "qk", 0, 1.5)
    out["edit_logits_rel"] = rel(_logits(dev_model, ids), _logits(cpu_model, ids))
    plan = dev.export_plan()
    replayed = ChannelEditor.from_plan(make_model(arch), plan)  # a device plan re-applied on the CPU
    out["plan_on_cpu_equal"] = bool(torch.equal(_logits(replayed.model, ids), _logits(cpu_model, ids)))
    dev.reset()
    cpu.reset()
    out["undo_bit_for_bit"] = all(torch.equal(v, original[k]) for k, v in dev_model.state_dict().items())
    with dev.steer(2, 1, component=[0, 2], alpha=0.25):
        steered = _logits(dev_model, ids)
    dev.scale_component(2, 1, "ov", [0, 2], 0.25)
    out["steer_vs_edit_rel"] = rel(steered, _logits(dev_model, ids))
    dev.reset()
    m_cpu = cpu.channel_map(("q", "v"), progress=False, baseline_samples=4)
    m_dev = dev.channel_map(("q", "v"), progress=False, baseline_samples=4, device=str(device))
    out["channel_map_rel"] = max(rel(m_dev.modes[m].head, m_cpu.modes[m].head) for m in ("q", "v"))
    out["ok"] = (out["svd_rel"] < 1e-4 and out["edit_logits_rel"] < 1e-4 and out["plan_on_cpu_equal"]
                 and out["undo_bit_for_bit"] and out["steer_vs_edit_rel"] < 1e-4 and out["channel_map_rel"] < 1e-3)
    return out


def check_adapter(device: torch.device) -> dict:
    """The peft LoRA adapter of an edit, loaded by peft on ``device``, against the edit on the CPU."""
    try:
        from peft import PeftModel
    except ImportError:
        return {"skipped": "peft is not installed", "ok": True}
    cpu_model = make_model("llama")
    editor = ChannelEditor(copy.deepcopy(cpu_model).to(device))
    editor.scale_component(1, 1, "ov", [0, 1], 0.0)
    edited = ChannelEditor(cpu_model)
    edited.scale_component(1, 1, "ov", [0, 1], 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        editor.save_adapter(Path(tmp) / "adapter")
        peft_model = PeftModel.from_pretrained(make_model("llama").to(device), str(Path(tmp) / "adapter")).eval()
        err = rel(_logits(peft_model, input_ids()), _logits(cpu_model, input_ids()))
    return {"logits_rel": err, "ok": err < 1e-4}


def check_fit(device: torch.device, steps: int) -> dict:
    """A short fit (dense phase, one prune-and-refit) on ``device`` and on the CPU: the dense log-scales
    agree within fp32 tolerance and both choose the same number of components."""
    results = []
    for where in (torch.device("cpu"), device):
        model, tok = laundry_model("llama", seed=2)
        model.to(where)
        data = laundry_list(tok, lengths=[3, 5], n_per_length=16, seed=0)
        editor = ChannelEditor(model, tokenizer=tok)
        results.append(editor.fit_edit(data["train"], data["dev"], heads=[(1, 0), (2, 1), (2, 3)], budget=8,
                                       steps=steps, refit_steps=steps // 2, guard_weights=(1.0,),
                                       l1_weights=(1e-3,), progress=False))
    a, b = results
    err = max(rel(b.dense[k], a.dense[k]) for k in a.dense)
    return {"dense_theta_rel": err, "components": [a.n_components, b.n_components],
            "ok": err < 1e-3 and a.n_components == b.n_components}


def correctness(device: torch.device, steps: int) -> dict:
    out = {arch: check_arch(arch, device) for arch in ARCHS}
    out["adapter"] = check_adapter(device)
    out["fit"] = check_fit(device, steps)
    return out


# ----- throughput --------------------------------------------------------------------------------------
def build(name: str, device: torch.device, dtype: torch.dtype, small: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(GEOMETRIES[name])
    model_type = kwargs.pop("model_type")
    if small:
        shrink = 4 if kwargs["num_attention_heads"] > 8 else 1  # keep the query/kv head ratio
        heads, kv = kwargs["num_attention_heads"] // shrink, max(1, kwargs["num_key_value_heads"] // shrink)
        kwargs.update(SMALL, head_dim=16, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=16 * heads)
        kwargs.pop("query_pre_attn_scalar", None)
    config = AutoConfig.for_model(model_type, **kwargs, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def _timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def throughput(name: str, device: torch.device, dtype: torch.dtype, small: bool, fit_steps: int) -> dict:
    from tiny_models import laundry_tokenizer

    reset_peak(device)
    t0 = time.perf_counter()
    model = build(name, device, dtype, small)
    editor = ChannelEditor(model)
    out: dict = {"geometry": f"L={editor.n_layers} H={editor.n_heads} K={editor.n_kv_heads} d={editor.d_model} "
                             f"d_h={editor.d_head}", "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                 "build_s": time.perf_counter() - t0}
    matmul = "bfloat16" if dtype == torch.bfloat16 else "float32"
    reset_peak(device)
    out["channel_map_s"] = _timed(lambda: editor.channel_map(("q", "k", "v"), progress=False, baseline_samples=16,
                                                             device=str(device), matmul_dtype=matmul), device)
    out["channel_map_peak_mb"] = peak_mb(device)
    tok = laundry_tokenizer()
    data = laundry_list(tok, lengths=[5, 8, 10], n_per_length=32 if not small else 8, seed=0)
    rows = list(data["test"])[:48 if not small else 12]
    reset_peak(device)
    out["eval_prompts"] = len(rows)
    out["eval_batched_s"] = _timed(lambda: evaluate(model, tok, rows, batch_size=32, progress=False), device)
    out["eval_loop_s"] = _timed(lambda: [evaluate(model, tok, [r], batch_size=1, progress=False) for r in rows], device)
    out["eval_speedup"] = out["eval_loop_s"] / out["eval_batched_s"]
    out["eval_prompts_per_s"] = len(rows) / out["eval_batched_s"]
    out["eval_peak_mb"] = peak_mb(device)
    reset_peak(device)
    result = editor.fit_edit(data["train"], data["dev"], heads="upper", budget=256, steps=fit_steps,
                             refit_steps=max(1, fit_steps // 2), guard_weights=(1.0,), l1_weights=(1e-3,),
                             k_fractions=(1.0,), tokenizer=tok, progress=False)
    editor.reset()
    t = result.timings
    out.update(fit_total_s=t["total_fit"], fit_dense_step_s=t["dense_fit"] / fit_steps, fit_steps=fit_steps,
               fit_components=result.n_components, fit_peak_mb=peak_mb(device))
    model = editor = None  # free the model before emptying the CUDA cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: the first GPU)")
    parser.add_argument("--dtype", default="auto", help="throughput dtype: auto (bf16 on GPU), float32, bfloat16")
    parser.add_argument("--small", action="store_true", help="toy geometries (for a CPU run in the test suite)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--fit-steps", type=int, default=20, help="dense fit steps of the throughput fit")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    report: dict = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "small": args.small,
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    torch.manual_seed(0)
    report["correctness"] = correctness(device, steps=8 if args.small else 30)
    report["all_correct"] = all(v["ok"] for v in report["correctness"].values())
    report["correctness_s"] = time.perf_counter() - t0
    print(f"correctness on {device}: {'all ok' if report['all_correct'] else 'FAILED'} "
          f"({report['correctness_s']:.1f} s)", flush=True)
    if not args.skip_throughput:
        report["throughput"] = {}
        for name in (["smollm2-135m", "llama-3-8b"] if args.small else args.geometries):
            report["throughput"][name] = r = throughput(name, device, dtype, args.small, args.fit_steps if not args.small else 4)
            print(f"{name} {r['geometry']}: map {r['channel_map_s']:.2f} s, eval {r['eval_prompts_per_s']:.0f} "
                  f"prompts/s ({r['eval_speedup']:.1f}x a loop), fit step {r['fit_dense_step_s']:.3f} s, "
                  f"fit {r['fit_total_s']:.1f} s", flush=True)
    report["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} ({report['total_s']:.1f} s)")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_correct"] else 1)
