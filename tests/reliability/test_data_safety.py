"""Issue 13, Critical: saves never delete what th_edit did not write, never overwrite the source model, the
cache owns only its own subdirectory; modes follow the umask; mount points and read-only parents work."""

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny_models import make_model
from transformers import AutoModelForCausalLM

from th_edit import ChannelEditor, OutputDirectoryError
from th_edit.app.cli import main
from th_edit.data import save_task
from th_edit.utils.files import MANIFEST, atomic_directory


def _edited(seed=0):
    editor = ChannelEditor(make_model("gpt2", seed=seed))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    return editor


def _user_files(folder: Path) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "data" / "mine.csv").write_text("a,b\n1,2\n")


def test_save_pretrained_refuses_a_foreign_directory_and_keeps_its_files(tmp_path):
    out = tmp_path / "out"
    _user_files(out)
    with pytest.raises(OutputDirectoryError, match="overwrite=True"):
        _edited().save_pretrained(out)
    assert sorted(os.listdir(out)) == ["data", "notes.txt"]
    _edited().save_pretrained(out, overwrite=True)  # beside the user's files, which survive
    assert (out / "notes.txt").read_text() == "my notes" and (out / "data" / "mine.csv").is_file()
    assert (out / "model.safetensors").is_file() and (out / MANIFEST).is_file()
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_resave_replaces_only_th_edit_files_and_removes_its_stale_shards(tmp_path):
    out = tmp_path / "out"
    _edited().save_pretrained(out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    (out / "notes.txt").write_text("added later")
    editor = _edited(seed=1)
    editor.save_pretrained(out)  # a th_edit output: no overwrite needed; old shards are th_edit's own
    assert not list(out.glob("model-*.safetensors")) and (out / "notes.txt").read_text() == "added later"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), editor.model.state_dict().values()))
    assert "notes.txt" not in json.loads((out / MANIFEST).read_text())["files"]


def test_save_task_keeps_unrelated_files(tmp_path):
    out = tmp_path / "ds"
    _user_files(out)
    ds = DatasetDict({"train": Dataset.from_dict({"x": [1, 2]})})
    with pytest.raises(OutputDirectoryError):
        save_task(ds, out)
    assert (out / "data" / "mine.csv").is_file()
    save_task(ds, out, overwrite=True)
    assert (out / "notes.txt").is_file() and (out / "data" / "mine.csv").is_file()
    assert (out / "data" / "train.parquet").is_file()


def test_save_into_the_source_model_directory_is_refused(tmp_path):
    src = tmp_path / "base"
    ChannelEditor(make_model("gpt2")).save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    model = AutoModelForCausalLM.from_pretrained(src)
    editor = ChannelEditor(model)
    editor.scale_component(0, 0, "ov", 0, 0.0)
    for target in (src, src / "sub", tmp_path):
        with pytest.raises(OutputDirectoryError, match="source model"):
            editor.save_pretrained(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before


def test_cli_edit_out_equal_to_the_model_is_refused(tmp_path, capsys):
    src = tmp_path / "base"
    ChannelEditor(make_model("gpt2")).save_pretrained(src)
    editor = ChannelEditor(AutoModelForCausalLM.from_pretrained(src))
    editor.scale_component(0, 0, "ov", 0, 0.0)
    editor.save_plan(tmp_path / "plan")
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    (src / "notes.txt").write_text("keep me")
    code = main(["edit", str(src), "--plan", str(tmp_path / "plan"), "--out", str(src), "--overwrite", "--json"])
    assert code == 2 and "source model" in json.loads(capsys.readouterr().out)["error"]
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.name != "notes.txt"} == before
    assert (src / "notes.txt").read_text() == "keep me"


def test_cache_dir_owns_only_its_subdirectory(tmp_path, monkeypatch):
    from th_edit.sharing import bundled_models as models

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    seen = {}

    def fake_convert(folder, gguf_name, target):
        seen["target"] = target
        with atomic_directory(target, overwrite=True) as staging:
            make_model("llama").save_pretrained(staging)

    monkeypatch.setattr(models, "bundled_gguf_path", lambda name, work_dir=None: Path(work_dir) / "x.gguf")
    monkeypatch.setattr(models, "_convert", fake_convert)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    models.load_model("smollm2", cache_dir=cache)
    assert seen["target"] == cache / models.BUNDLED["smollm2"].name
    assert (cache / "notes.txt").read_text() == "mine"


def test_saved_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _edited().save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644


def test_save_onto_a_mount_point_under_a_read_only_parent(tmp_path, monkeypatch):
    """A mount point cannot be renamed and its parent cannot be written: files go in one by one."""
    out = tmp_path / "mnt"
    out.mkdir()
    real_replace, real_rename, real_mkdtemp = os.replace, os.rename, tempfile.mkdtemp

    def guard(fn):
        def wrapped(src, dst, *a, **k):
            if Path(src) == out or Path(dst) == out:
                raise OSError(errno.EBUSY, "Device or resource busy", str(src))
            return fn(src, dst, *a, **k)
        return wrapped

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(*a, dir=dir, **k)

    monkeypatch.setattr(os, "replace", guard(real_replace))
    monkeypatch.setattr(os, "rename", guard(real_rename))
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    editor = _edited()
    editor.save_pretrained(out)
    editor.save_pretrained(out)  # and again over the previous save
    assert (out / "model.safetensors").is_file() and sorted(os.listdir(tmp_path)) == ["mnt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".th_edit-staging")]


def test_failed_save_into_a_foreign_directory_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _user_files(out)
    editor = _edited()
    real_save = editor.model.save_pretrained

    def disk_full(directory, **kw):
        real_save(directory, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(editor.model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        editor.save_pretrained(out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["data", "data/mine.csv", "notes.txt"]


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from th_edit.utils.files import atomic_directory
with atomic_directory(sys.argv[1]) as staging:
    (staging / "model.safetensors").write_bytes(b"half written")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_save_leaves_a_staging_directory_that_the_next_save_removes(tmp_path, caplog):
    import subprocess
    import sys

    from th_edit.utils.files import _STAGING_PREFIX, _owner_tag

    out = tmp_path / "out"
    _edited().save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], cwd=Path(__file__).parents[2])
    assert proc.returncode == -9
    left = [p for p in out.iterdir() if p.name.startswith(_STAGING_PREFIX)]
    assert len(left) == 1 and (left[0] / "model.safetensors").read_bytes() == b"half written"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the killed save changed nothing
    # a set-aside directory of a killed commit (it may hold the only copy of replaced files) and a staging
    # directory of a live save (this process) are kept
    dead_pid = left[0].name[len(_STAGING_PREFIX):].split("-")[1]
    host = _owner_tag().split("-")[0]
    set_aside = out / f"{_STAGING_PREFIX}{host}-{dead_pid}-old-abc"
    set_aside.mkdir()
    (set_aside / "notes.txt").write_text("the only copy")
    live = out / f"{_STAGING_PREFIX}{_owner_tag()}xyz"
    live.mkdir()
    with caplog.at_level("WARNING", logger="th_edit"):
        _edited(seed=1).save_pretrained(out)
    assert not left[0].exists()
    assert (set_aside / "notes.txt").read_text() == "the only copy" and live.is_dir()
    assert any("set aside" in r.getMessage() for r in caplog.records)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.state_dict()["transformer.h.1.attn.c_proj.weight"],
                       _edited(seed=1).model.state_dict()["transformer.h.1.attn.c_proj.weight"])


def test_s2b_saving_into_the_hub_download_cache_is_refused(tmp_path):
    """Issue 23 (S2b): an edited model saved over a downloaded snapshot would load for the base repo id."""
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--alice--base" / "snapshots" / ("0" * 40)
    with pytest.raises(OutputDirectoryError, match="download cache"):
        _edited().save_pretrained(snapshot, overwrite=True)
    assert not snapshot.exists()
