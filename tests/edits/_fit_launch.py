"""Run by tests/edits/test_fit_distributed.py, alone or under ``accelerate launch``: a small fit on a tiny
model; the main process writes its dense log-scales, chosen components and dev accuracy to argv[1]."""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tiny_models import laundry_model  # noqa: E402

from th_edit import ChannelEditor  # noqa: E402
from th_edit.tasks.data import laundry_list  # noqa: E402
from th_edit.utils.distributed import is_main_process, process_rank_and_count  # noqa: E402

SETTINGS = dict(heads=[(1, 0), (1, 2), (2, 1), (2, 3)], budget=6, steps=10, refit_steps=6, batch_size=5,
                k_fractions=(1.0, 0.5), guard_weights=(1.0,), l1_weights=(1e-3,), rank_by="attribution",
                progress=False)


def main(out: str) -> None:
    model, tok = laundry_model("llama", seed=2)
    data = laundry_list(tok, lengths=[3, 5], n_per_length=14, seed=0)  # 14 train prompts: a last batch of 4
    editor = ChannelEditor(model, tokenizer=tok)
    result = editor.fit_edit(data["train"], data["dev"], **SETTINGS)
    rank, world = process_rank_and_count()
    if is_main_process():
        Path(out).write_text(json.dumps({
            "world": world, "dense": {f"{k}": v.tolist() for k, v in result.dense.items()},
            "components": result.components.to_dict("records"), "dev_after": result.dev_after,
            "guard_after": result.guard_after,
        }))


if __name__ == "__main__":
    os.environ.setdefault("TH_EDIT_DISABLE_PROGRESS", "1")
    main(sys.argv[1])
