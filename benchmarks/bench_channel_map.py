"""Channel-map benchmark: th_edit's streamed computation vs the naive dense approach vs raw matmul speed.

Run:  python benchmarks/bench_channel_map.py [--geometry gpt2|llama1b|llama7b|both] [--naive-pairs 40]
      python benchmarks/bench_channel_map.py --geometry llama7b --device cuda --matmul-dtype bfloat16
      accelerate launch --multi_gpu --num_processes N benchmarks/bench_channel_map.py --geometry llama7b ...

Under ``accelerate launch`` (N > 1) the map is timed twice: on the main process alone (the others wait)
and sharded over the N processes; the single/multi ratio (the speed-up) is printed, and the two maps are
checked equal. On CUDA each process streams on its own GPU (``cuda:LOCAL_RANK``). ``--layers`` cuts the
layer count of a geometry (the Llama-7B one needs ~9 GB of weights per process at full depth).

For each geometry (random weights), printed side by side in one run:
* the full channel map for Q, K and V composition, all three levels (head, component, top pairs),
  including the batched SVDs;
* the naive approach a user would write from the paper: materialise each sender component
  s_i u_i v_i^T and each receiver circuit as d x d matrices and take Frobenius norms of their product,
  timed on a random subset of (sender component, receiver head) pairs and extrapolated to all of them;
* this machine's own float32 matmul throughput on a product of the map's block shape, and the fraction
  of it the channel map achieves (matmul FLOPs of the map / its wall time);
* peak memory (resident set growth during the map).

The map's time is the fastest of --repeats wall-clock runs (the first run pays one-off start-up costs);
it includes the batched SVDs and the seeded Monte Carlo baselines. Peak memory is from the first run.

The Llama-style geometry keeps the attention of a ~1B model (16 layers, 32 query / 8 kv heads,
d 2048, d_h 64) and shrinks the MLPs and vocabulary, which the channel map never reads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from th_edit import ChannelEditor

GEOMETRIES = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, vocab_size=512, n_positions=64),
    "llama1b": dict(model_type="llama", num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    hidden_size=2048, head_dim=64, intermediate_size=64, vocab_size=512),
    # Llama-2-7B attention geometry (32 layers, 32 heads, d 4096, d_h 128); MLP and vocabulary shrunk
    "llama7b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    hidden_size=4096, head_dim=128, intermediate_size=64, vocab_size=512),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(name: str, layers: int | None = None):
    kwargs = dict(GEOMETRIES[name])
    model_type = kwargs.pop("model_type")
    if layers:
        kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random gains so folding matters
        for n, p in model.named_parameters():
            if p.ndim == 1 and "norm" in n or n.endswith("ln_1.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def map_matmul_flops(L: int, H: int, d: int, r: int, modes: int = 3) -> float:
    return modes * sum((lr * H * r) * d * (H * r) * 2 for lr in range(L))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_gflops(rows: int, d: int, cols: int, repeats: int = 5, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(rows, d, device=device, dtype=dtype), torch.randn(d, cols, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return 2 * rows * d * cols / dt / 1e9


def naive_seconds_per_pair(editor: ChannelEditor, n_pairs: int, seed: int = 0) -> float:
    """Time the paper-style dense computation of one (sender component, receiver head) score."""
    g = torch.Generator().manual_seed(seed)
    L, H = editor.n_layers, editor.n_heads
    times = []
    for _ in range(n_pairs):
        lr = int(torch.randint(1, L, (1,), generator=g))
        ls = int(torch.randint(0, lr, (1,), generator=g))
        hs, hr = (int(x) for x in torch.randint(0, H, (2,), generator=g))
        comp = int(torch.randint(0, editor.d_head, (1,), generator=g))
        mode = ["q", "k", "v"][int(torch.randint(0, 3, (1,), generator=g))]
        t0 = time.perf_counter()
        U, S, V = torch.linalg.svd(editor.circuit_matrix(ls, hs, "ov"))
        A = S[comp] * torch.outer(U[:, comp], V[comp])
        B = editor.circuit_matrix(lr, hr, "ov" if mode == "v" else "qk")
        B = B.T if mode == "k" else B
        score = torch.linalg.matrix_norm(A @ B) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))
        float(score)
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


@contextlib.contextmanager
def one_process():
    """Make th_edit see a single process (the launch's other processes wait at a barrier meanwhile)."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        os.environ["WORLD_SIZE"] = saved


def reset_peak(device: str) -> None:
    """Reset CUDA's peak-memory counter; CUDA is initialised on ``device`` first (resetting before any CUDA
    call raises "Invalid device argument")."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # creates the context
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def time_map(editor: ChannelEditor, repeats: int, device: str, matmul_dtype: str):
    """Fastest of ``repeats`` channel maps (q, k, v) and the memory peak of the first (MB)."""
    rss0, best, cmap, peak = rss_mb(), float("inf"), None, 0.0
    for i in range(repeats):
        reset_peak(device)
        t0 = time.perf_counter()
        cmap = editor.channel_map(("q", "k", "v"), progress=False, baseline_samples=16, device=device,
                                  matmul_dtype=matmul_dtype)
        best = min(best, time.perf_counter() - t0)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda")
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0)
    return best, cmap, peak


def same_map(a, b) -> bool:
    return all(torch.allclose(a.modes[m].head, b.modes[m].head, rtol=1e-4, atol=1e-6)
               and torch.equal(a.modes[m].top_row, b.modes[m].top_row) for m in a.modes)


def run(name: str, args, rank: int, world: int) -> dict:
    from th_edit.utils.distributed import wait_for_everyone

    device = args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model = build(name, args.layers)
    editor = ChannelEditor(model)
    L, H, d, r = editor.n_layers, editor.n_heads, editor.d_model, editor.d_head
    out = dict(name=name, geometry=f"L={L} H={H} K={editor.n_kv_heads} d={d} d_h={r}", world=world)
    if world > 1:  # the main process alone first, then all of them
        if rank == 0:
            with one_process():
                out["t_single"], single, _ = time_map(editor, args.repeats, device, args.matmul_dtype)
        wait_for_everyone()
    t_map, cmap, peak = time_map(editor, args.repeats, device, args.matmul_dtype)
    flops = map_matmul_flops(L, H, d, r)
    dtype = torch.bfloat16 if args.matmul_dtype == "bfloat16" else torch.float32
    peak_gflops = matmul_gflops(L // 2 * H * r, d, H * r, device=device, dtype=dtype)
    out.update(t_map=t_map, peak_gflops=peak_gflops, achieved=flops / t_map / 1e9, peak_mb=peak)
    out["fraction"] = out["achieved"] / peak_gflops / world
    if world > 1 and rank == 0:
        out.update(ratio=out["t_single"] / t_map, equal=same_map(single, cmap))
    per_pair = naive_seconds_per_pair(editor, args.naive_pairs) if args.naive_pairs and world == 1 else float("nan")
    n_units = 3 * sum(lr * H * r * H for lr in range(L))  # (sender component, receiver head) pairs x modes
    top = cmap.top_channels(k=1).iloc[0]
    out.update(t_naive=per_pair * n_units, per_pair=per_pair, n_units=n_units, speedup=per_pair * n_units / t_map,
               top=f"{top['mode']}: {top.sender_layer}.{top.sender_head}[{top.sender_component}] -> "
                   f"{top.receiver_layer}.{top.receiver_head}[{top.receiver_component}] score {top.score:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=["gpt2", "llama1b", "llama7b", "both"], default="both")
    parser.add_argument("--layers", type=int, help="cut the geometry to this many layers")
    parser.add_argument("--naive-pairs", type=int, default=30, help="pairs timed for the naive approach (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="channel-map runs; the fastest is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="GEMM input dtype (bfloat16: float32 accumulation)")
    args = parser.parse_args()
    from th_edit.utils.distributed import process_rank_and_count

    rank, world = process_rank_and_count()
    names = ["gpt2", "llama1b"] if args.geometry == "both" else [args.geometry]
    results = [run(n, args, rank, world) for n in names]
    if rank != 0:
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, "
          f"device {args.device}, matmul {args.matmul_dtype}, processes {world}")
    header = f"{'geometry':<34}{'map q+k+v (s)':>14}{'naive est. (s)':>16}{'speedup':>10}" \
             f"{'matmul GF/s':>13}{'map GF/s':>10}{'of peak':>9}{'peak MB':>9}"
    print(header)
    for r in results:
        print(f"{r['name'] + ' ' + r['geometry']:<34}{r['t_map']:>14.2f}{r['t_naive']:>16.0f}{r['speedup']:>9.0f}x"
              f"{r['peak_gflops']:>13.1f}{r['achieved']:>10.1f}{r['fraction']:>8.0%}{r['peak_mb']:>9.0f}")
    for r in results:
        if world > 1:
            print(f"  {r['name']}: 1 process {r['t_single']:.2f} s, {world} processes {r['t_map']:.2f} s: "
                  f"ratio {r['ratio']:.2f}x; maps equal: {r['equal']}")
        else:
            print(f"  {r['name']}: naive {r['per_pair'] * 1e3:.1f} ms per (sender component, receiver head) pair "
                  f"x {r['n_units']:,} pairs; strongest channel {r['top']}")


if __name__ == "__main__":
    main()
