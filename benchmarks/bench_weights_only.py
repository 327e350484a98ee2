"""Weights-only channel map benchmark: a random Llama-3-70B-geometry attention checkpoint read from disk.

Run:  python benchmarks/bench_weights_only.py --small                 # quick dry run (tiny geometry)
      nice python benchmarks/bench_weights_only.py --layers-70b 2 --heads 8 --layers-7b 2
      python benchmarks/bench_weights_only.py --device cuda --layers-70b 80 --heads 64 --layers-7b 32  (GPU)

Part 1 (Llama-3-70B geometry: d 8192, 64 query / 8 kv heads, d_h 128, bf16). Writes the first
``--layers-70b`` layers of a random attention-only checkpoint (q/k/v/o and the input norm; no MLP, no
embeddings: the map never reads them; 302 MB per layer, 24 GB for all 80), then from the files:
* loading + OV and QK SVDs of one layer (all 64 heads), and peak RSS growth;
* the channel map over those layers, senders and receivers restricted to ``--heads`` heads per layer,
  its product throughput (FLOP/s), and peak RSS growth (Linux VmHWM reset before each phase);
* an extrapolation to the whole 80-layer map at the given memory limit: SVD work (one per sender layer
  plus one per receiver layer per sender chunk of the memory plan) + product FLOPs / measured throughput.
Part 2 (Llama-7B geometry: d 4096, 32 heads, d_h 128, bf16, ``--layers-7b`` layers): the whole map from
disk vs the in-memory path (``from_pretrained`` of the same files, then ``channel_map``) in the same run:
time and peak RSS growth of each, their ratios, and a check that the two maps are equal.
Results go to ``benchmarks/results/bench_weights_only.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from th_edit import ChannelEditor
from th_edit.analysis.weights_only import SVD_STACKS, plan_memory

GEOMETRIES = {
    "llama3-70b": dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128, full_layers=80),
    "llama-7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128, full_layers=32),
    "small": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, full_layers=12),
}


def write_checkpoint(folder: Path, geo: dict, n_layers: int, seed: int = 0, shard_layers: int = 2) -> int:
    """Random bf16 attention-only Llama checkpoint (config, index, one shard per ``shard_layers`` layers); bytes written."""
    d, H, K, dh = geo["hidden_size"], geo["num_attention_heads"], geo["num_key_value_heads"], geo["head_dim"]
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=d, num_attention_heads=H,
                  num_key_value_heads=K, head_dim=dh, num_hidden_layers=n_layers, intermediate_size=16, vocab_size=16,
                  max_position_embeddings=64, rms_norm_eps=1e-5, torch_dtype="bfloat16", tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    n_shards = (n_layers + shard_layers - 1) // shard_layers
    weight_map, total = {}, 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for layer in range(s * shard_layers, min(n_layers, (s + 1) * shard_layers)):
            p = f"model.layers.{layer}."
            shapes = {"self_attn.q_proj.weight": (H * dh, d), "self_attn.k_proj.weight": (K * dh, d),
                      "self_attn.v_proj.weight": (K * dh, d), "self_attn.o_proj.weight": (d, H * dh)}
            for key, shape in shapes.items():
                tensors[p + key] = (torch.randn(shape, generator=g) * d ** -0.5).to(torch.bfloat16)
            tensors[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


class Peak:
    """Peak RSS growth of a block (Linux VmHWM reset on entry; falls back to sampling RSS at exit)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base, self.t0 = psutil.Process().memory_info().rss, time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        try:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except OSError:
            hwm = psutil.Process().memory_info().rss
        self.growth_mb = (hwm - self.base) / 2**20
        return False


def _map_flops(senders, receivers, d, r, n_modes):
    valid = sum(1 for sl, _ in senders for rl, _ in receivers if sl < rl)
    return 2.0 * valid * r * r * d * n_modes


def _gemm_rate(d: int, n: int, device: str) -> float:
    """This machine's float32 GEMM rate (FLOP/s) on an ``[n, d] @ [d, n]`` product (the map's block shape)."""
    a, b = torch.randn(n, d, device=device), torch.randn(d, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n * n * d / best


def part_70b(args, work: Path) -> dict:
    geo = GEOMETRIES["small" if args.small else "llama3-70b"]
    L = 3 if args.small else args.layers_70b
    folder = work / "llama3_70b_attention"
    t = time.perf_counter()
    written = write_checkpoint(folder, geo, L)
    write_s = time.perf_counter() - t
    editor = ChannelEditor.from_checkpoint(folder, device=args.device)
    H, d, r = editor.n_heads, editor.d_model, editor.d_head
    editor.svd_all("ov", layers=[0])  # warm-up (first-call costs)
    with Peak() as svd_peak:
        editor.svd_all("ov", layers=[L - 1])
        editor.svd_all("qk", layers=[L - 1])
    svd_layer_s = svd_peak.seconds
    rate = _gemm_rate(d, min(4096, H * r), args.device)
    heads = list(range(min(args.heads, H)))
    sel = [(l, h) for l in range(L) for h in heads]
    with Peak() as map_peak:
        cmap = editor.channel_map(senders=sel, receivers=sel, memory_limit_mb=args.memory_limit_mb, progress=False,
                                  baseline_samples=0, device=args.device)
    flops = _map_flops(sel, sel, d, r, 3)
    chunks = cmap.meta["weights_only"]["sender_chunks"]
    full_L = geo["full_layers"]
    layout = editor.layout
    layout_full = type("G", (), dict(n_heads=H, d_model=d, d_head=r, layer_nbytes=layout.layer_nbytes,
                                     cache_layers=layout.cache_layers))()
    full_flops = 2.0 * (full_L * (full_L - 1) / 2) * H * H * r * r * d * 3
    extrapolated = []
    for limit in sorted({args.memory_limit_mb, 16384.0, 65536.0}):
        plan = plan_memory(layout_full, limit, "qkv")
        full_chunks = -(-full_L * H // plan.chunk_heads)
        # one OV SVD per sender layer, and per chunk the OV + QK SVDs of the (on average half the) later layers
        svd_runs = full_L * 0.5 + full_chunks * (full_L - 1) / 2
        extrapolated.append({
            "layers": full_L, "heads": full_L * H, "memory_limit_mb": limit, "memory_bound_mb": plan.bound / 2**20,
            "sender_chunks": full_chunks, "result_gb_per_mode": 4 * (full_L * H) ** 2 * (r + 1) / 1e9,
            "svd_layer_runs": svd_runs, "svd_seconds": svd_runs * svd_layer_s, "product_tflop": full_flops / 1e12,
            "product_seconds": full_flops / rate, "total_seconds": svd_runs * svd_layer_s + full_flops / rate,
        })
    return {
        "geometry": {**geo, "layers_written": L}, "device": args.device, "bytes_written": written,
        "full_checkpoint_gb": written / L * full_L / 1e9, "write_seconds": write_s,
        "layer_load_and_svd": {"seconds": svd_peak.seconds, "peak_rss_growth_mb": svd_peak.growth_mb},
        "map": {"layers": L, "heads_per_layer": len(heads), "seconds": map_peak.seconds,
                "peak_rss_growth_mb": map_peak.growth_mb, "gflop": flops / 1e9, "gemm_gflops": rate / 1e9,
                "sender_chunks": chunks, "memory_bound_mb": cmap.meta["weights_only"]["memory_bound_mb"]},
        "extrapolated_full_map": extrapolated,
        "note": f"SVD working set per layer ~{SVD_STACKS} float32 [H, d, d_h] stacks; product rate: measured float32 GEMM",
    }


def part_7b(args, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    geo = GEOMETRIES["small" if args.small else "llama-7b"]
    L = 4 if args.small else args.layers_7b
    folder = work / "llama_7b_attention"
    write_checkpoint(folder, geo, L)
    kw = dict(progress=False, baseline_samples=8, memory_limit_mb=args.memory_limit_mb, device=args.device)
    disk, mem = [], []
    for _ in range(2):  # the second run is timed without first-call costs; peaks from both, the larger kept
        with Peak() as p_disk:
            editor = ChannelEditor.from_checkpoint(folder, device=args.device)
            from_disk = editor.channel_map(**kw)
        del editor
        with Peak() as p_mem:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device)
            in_memory = ChannelEditor(model).channel_map(**kw)
        del model
        disk.append(p_disk)
        mem.append(p_mem)
    disk_s, mem_s = disk[-1].seconds, mem[-1].seconds
    disk_mb, mem_mb = max(p.growth_mb for p in disk), max(p.growth_mb for p in mem)
    equal = all(torch.equal(from_disk.modes[m].head, in_memory.modes[m].head)
                and torch.equal(from_disk.modes[m].top_row, in_memory.modes[m].top_row) for m in "qkv")
    return {"geometry": {**geo, "layers": L}, "device": args.device, "maps_equal": equal,
            "from_disk": {"seconds": disk_s, "peak_rss_growth_mb": disk_mb},
            "in_memory": {"seconds": mem_s, "peak_rss_growth_mb": mem_mb},
            "time_ratio_disk_over_memory": disk_s / mem_s, "memory_ratio_disk_over_memory": disk_mb / max(mem_mb, 1e-9),
            "note": "in memory = from_pretrained of the same files (no MLP weights in them: tiny random MLPs) + channel_map"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny geometries, seconds (a dry run)")
    p.add_argument("--layers-70b", type=int, default=2, help="layers of the 70B checkpoint written (80: ~24 GB)")
    p.add_argument("--heads", type=int, default=8, help="heads per layer mapped in part 1 (64: all)")
    p.add_argument("--layers-7b", type=int, default=2, help="layers of the 7B-geometry map (32: all)")
    p.add_argument("--memory-limit-mb", type=float, default=4096.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", help="where to write the checkpoints (default a temporary directory, removed after)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_weights_only.json"))
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="th_edit_bench_wo_"))
    try:
        result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                              "threads": torch.get_num_threads()}, "args": vars(args),
                  "llama3_70b": part_70b(args, work), "llama_7b": part_7b(args, work)}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if not args.small:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
