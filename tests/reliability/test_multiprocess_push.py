"""Issue 23, High: pushes under ``accelerate launch`` (MP3, MP4). ``push_to_hub``, ``push_adapter_to_hub`` and
``push_plan_to_hub`` upload once, from the main process (the only one that wrote the folder); the other
process waits and every process returns the same commit, which is the repository's only upload. A failed
push or save raises the same typed error on every process instead of leaving one at a barrier. Two gloo processes
on CPU against the loopback Hub."""

import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from launching import launch_env, launch_two
from tiny_models import make_model

from th_edit import ChannelEditor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_two_processes_push_once_and_return_the_same_commit(hub, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    env = launch_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    launch_two(HERE / "_push_launch.py", str(tmp_path), hub.token, env=env, timeout=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["world"] == 2
    assert ranks[0]["denied"] == "HubError"  # on both processes, and neither hung at a barrier
    assert ranks[0]["foreign"] == "OutputDirectoryError"  # MP2, the same for a refused save
    assert os.listdir(tmp_path / "foreign") == ["notes.txt"]
    for name in ("model", "adapter", "plan"):
        repo = hub.repos[("model", f"alice/mp-{name}")]
        uploads = [c for c in repo.commits if c[1]]
        assert len(uploads) == 1 and uploads[0][0] == ranks[0][name] == repo.commits[-1][0]
    # what was pushed is what one process saves
    editor = ChannelEditor(make_model("gpt2", seed=5))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.save_pretrained(tmp_path / "local", repo_id="alice/mp-model")
    snap = Path(snapshot_download("alice/mp-model", cache_dir=tmp_path / "cache", token=hub.token))
    for name in ("model.safetensors", "config.json", "edit_plan.json", "edit_plan.safetensors", "README.md"):
        assert (snap / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
