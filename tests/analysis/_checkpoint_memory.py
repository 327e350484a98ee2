"""Run by tests/analysis/test_checkpoint.py in a fresh process: map a checkpoint with weights-only analysis
and print JSON with the peak RSS growth (Linux VmHWM reset before the map, so transient peaks count) and the memory plan."""

import json
import sys

import psutil

from th_edit import ChannelEditor
from th_edit.analysis.weights_only import plan_memory


def _vm_hwm() -> int:
    """Peak resident set size since the last reset, bytes (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(folder: str, limit_mb: float) -> None:
    editor = ChannelEditor.from_checkpoint(folder)
    editor.channel_map(("q",), progress=False, baseline_samples=0, keep_top=10, memory_limit_mb=limit_mb,
                       layers=[0, 1])  # warm up allocator and kernels on two layers
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = psutil.Process().memory_info().rss
    cmap = editor.channel_map(("q",), progress=False, baseline_samples=0, keep_top=100, memory_limit_mb=limit_mb)
    peak = _vm_hwm()
    plan = plan_memory(editor.layout, limit_mb, "q")
    result = sum(d.head.nbytes + d.component.nbytes for d in cmap.modes.values())
    print(json.dumps({"growth": peak - base, "peak": peak, "base": base,
                      "bound": plan.bound, "result": result, "chunks": cmap.meta["weights_only"]["sender_chunks"],
                      "layer_nbytes": editor.layout.layer_nbytes, "n_layers": editor.n_layers}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
