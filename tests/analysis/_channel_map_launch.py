"""Launched by tests/analysis/test_channels_distributed.py under ``accelerate launch --num_processes 2``.

Every process computes the channel map of a saved model and saves it as ``OUT/rank{R}.pt``; then every
process runs ``th-edit analyze`` (only the main process writes its tables, in ``OUT/analyze``); the same again
from the checkpoint files alone (``weights_only_rank{R}.pt``, ``th-edit analyze --weights-only`` into
``OUT/analyze_weights_only``).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from th_edit import ChannelEditor
from th_edit.app.cli import main as cli_main
from th_edit.utils.distributed import process_rank_and_count

SETTINGS = dict(baseline_samples=4, keep_top=40, memory_limit_mb=0.002)


def dump(cmap) -> dict:
    """Plain tensors of a channel map (what the test compares)."""
    return {"meta": {k: v for k, v in cmap.meta.items() if k != "config"}, "baselines": cmap.baselines,
            **{m: {"head": d.head, "component": d.component, "share": d.top_share, "row": d.top_row,
                   "col": d.top_col, "cos": d.top_cos} for m, d in cmap.modes.items()}}


def run(model_dir: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    cmap = ChannelEditor(model).channel_map(progress=False, **SETTINGS)
    rank, _ = process_rank_and_count()
    torch.save(dump(cmap), Path(out) / f"rank{rank}.pt")
    weights_only = ChannelEditor.from_checkpoint(model_dir).channel_map(progress=False, **SETTINGS)
    torch.save(dump(weights_only), Path(out) / f"weights_only_rank{rank}.pt")
    cli_main(["analyze", model_dir, "--weights-only", "--out", str(Path(out) / "analyze_weights_only"), "--quiet",
              "--top", "5", "--memory-limit-mb", "0.002"])
    code = cli_main(["analyze", model_dir, "--out", str(Path(out) / "analyze"), "--quiet", "--top", "5",
                     "--memory-limit-mb", "0.002"])
    (Path(out) / f"cli{rank}.json").write_text(json.dumps({"code": code}))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
