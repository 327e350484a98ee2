"""Launched by tests/reliability/test_multiprocess_push.py under ``accelerate launch --num_processes 2``.

Every process builds the same edited tiny model and calls each push; every process records the commit it
got back (or the error it raised) in ``OUT/rank{R}.json``. ``HF_ENDPOINT`` points at the test's Hub.
"""

import json
import sys
from pathlib import Path

from tiny_models import make_model

from th_edit import ChannelEditor
from th_edit.utils.distributed import process_rank_and_count


def run(out: str, token: str) -> None:
    editor = ChannelEditor(make_model("gpt2", seed=5))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    got = {}
    for name, push in (("model", editor.push_to_hub), ("adapter", editor.push_adapter_to_hub),
                       ("plan", editor.push_plan_to_hub)):
        got[name] = getattr(push(f"alice/mp-{name}", token=token), "oid", None)
    try:
        editor.push_plan_to_hub("alice/mp-denied", token="hf_wrong_token")
        got["denied"] = "no error"
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        got["denied"] = type(exc).__name__
    try:  # MP2: a save the main process refuses (a foreign directory) fails on every process, none hangs
        editor.save_pretrained(Path(out) / "foreign")
        got["foreign"] = "no error"
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        got["foreign"] = type(exc).__name__
    rank, world = process_rank_and_count()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"world": world, **got}))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
