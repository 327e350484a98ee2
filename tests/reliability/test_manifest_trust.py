"""Issue 23, High: the manifest is not trusted. A save removes or replaces only plain files strictly inside
its directory whose bytes th_edit provably wrote (a SHA-256 recorded at write time, in a manifest bound to
that directory); it never writes or deletes through a symbolic link; a manifest is never uploaded, so a
download cannot plant one; ``push`` uploads only files whose hash matches, never dotfiles, links or keys."""

import hashlib
import json
import os

import pytest
from datasets import DatasetDict
from huggingface_hub import snapshot_download
from tiny_models import make_model

from th_edit import ChannelEditor, OutputDirectoryError
from th_edit.app.cli import main
from th_edit.data import laundry_list
from th_edit.sharing.datasets import save_task
from th_edit.sharing.hub import files_to_push, push_folder
from th_edit.utils.files import MANIFEST


def sha256_file(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder):
    from th_edit.utils.manifest import read_manifest

    return read_manifest(folder)


def _save(out, seed=0, **kw):
    editor = ChannelEditor(make_model("gpt2", seed=seed))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.save_pretrained(out, **kw)
    return editor


def _list_in_manifest(out, *names):
    """What an attacker (or a careless edit) does: add names to the manifest, old or new format."""
    data = json.loads((out / MANIFEST).read_text())
    if isinstance(data["files"], list):
        data["files"] += list(names)
    else:
        data["files"].update({n: {"sha256": "0" * 64, "size": 0} for n in names})
        data["files"].update({n: {"sha256": sha256_file(out / n), "size": (out / n).stat().st_size}
                              for n in names if (out / n).is_file()})  # even with correct hashes
    (out / MANIFEST).write_text(json.dumps(data))


def test_m1_listed_user_files_survive_the_next_save(tmp_path):
    out = tmp_path / "out"
    _save(out)
    (out / "notes.txt").write_text("mine")
    data = json.loads((out / MANIFEST).read_text())
    data["files"] = sorted([*data["files"], "notes.txt"])  # the old list form, as the finding did it
    (out / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(OutputDirectoryError, match="cannot prove"):
        _save(out, seed=1)  # no longer a directory th_edit provably wrote: overwrite is needed
    _save(out, seed=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_m1_a_listed_file_whose_hash_does_not_match_is_kept(tmp_path):
    out = tmp_path / "out"
    _save(out)
    (out / "notes.txt").write_text("mine")
    _list_in_manifest(out, "notes.txt")
    data = json.loads((out / MANIFEST).read_text())
    if isinstance(data["files"], dict):
        data["files"]["notes.txt"] = {"sha256": "0" * 64, "size": 4}
        (out / MANIFEST).write_text(json.dumps(data))
    _save(out, seed=1)
    assert (out / "notes.txt").read_text() == "mine"


def test_m2_nothing_outside_the_directory_is_deleted_through_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("years of work")
    out = tmp_path / "out2"
    _save(out)
    os.symlink(elsewhere, out / "docs")
    _list_in_manifest(out, "docs/thesis.tex")
    assert not read_manifest(out).owns("docs/thesis.tex")
    _save(out, seed=1)
    assert (elsewhere / "thesis.tex").read_text() == "years of work"


def test_m3_non_canonical_names_alias_nothing(tmp_path):
    out = tmp_path / "out"
    _save(out)
    for name in ("a.txt", "b.txt", "c.txt"):
        (out / name).write_text(name)
    data = json.loads((out / MANIFEST).read_text())
    for alias, real in (("./a.txt", "a.txt"), ("b.txt/", "b.txt"), ("sub/../c.txt", "c.txt")):
        data["files"][alias] = {"sha256": sha256_file(out / real), "size": (out / real).stat().st_size}
    (out / MANIFEST).write_text(json.dumps(data))
    manifest = read_manifest(out)
    assert set(manifest.refused) == {"./a.txt", "b.txt/", "sub/../c.txt"}
    _save(out, seed=1)
    assert [(out / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == ["a.txt", "b.txt", "c.txt"]


def test_m4_a_downloaded_repository_cannot_make_a_save_delete_project_files(hub, tmp_path):
    evil = tmp_path / "evil"
    _save(evil)
    proj = tmp_path / "proj"
    (proj / "results").mkdir(parents=True)
    (proj / "train.py").write_text("# mine")
    (proj / "results" / "eval.json").write_text("{}")
    for name in ("train.py", "results/eval.json"):  # Mallory lists Alice's files with their exact hashes
        (evil / name).parent.mkdir(exist_ok=True)
        (evil / name).write_text((proj / name).read_text())
    _list_in_manifest(evil, "train.py", "results/eval.json")
    for name in ("train.py", "results/eval.json"):
        (evil / name).unlink()
    push_folder(evil, "alice/nice-model", token=hub.token)
    assert MANIFEST not in hub.repos[("model", "alice/nice-model")].commits[-1][1]  # N-H2: never uploaded
    snapshot_download("alice/nice-model", local_dir=proj, token=hub.token)
    (proj / MANIFEST).write_text((evil / MANIFEST).read_text())  # even if it got there some other way
    assert not read_manifest(proj).trusted  # bound to the directory it was written in
    with pytest.raises(OutputDirectoryError, match="another directory"):
        _save(proj, seed=2)
    _save(proj, seed=2, overwrite=True)
    assert (proj / "train.py").read_text() == "# mine" and (proj / "results" / "eval.json").read_text() == "{}"


def test_n_h1_push_uploads_only_files_with_matching_hashes_and_never_secrets(hub, tmp_path, capsys):
    out = tmp_path / "out3"
    _save(out)
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    (out / "deploy.pem").write_text("-----BEGIN PRIVATE KEY-----")
    (out / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    data = json.loads((out / MANIFEST).read_text())
    for name in (".env", "deploy.pem", "id_rsa"):  # listed with their true hashes
        data["files"][name] = {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
    (out / MANIFEST).write_text(json.dumps(data))
    (out / "README.md").write_text("edited by hand after the save")  # no longer the recorded bytes
    code = main(["push", str(out), "alice/leak", "--token", hub.token, "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    pushed = set(hub.repos[("model", "alice/leak")].commits[-1][1])
    assert not {".env", "deploy.pem", "id_rsa", MANIFEST, "README.md"} & pushed
    assert {"model.safetensors", "config.json", "edit_plan.json"} <= pushed
    assert sorted(payload["left_out"]) == [".env", "README.md", "deploy.pem", "id_rsa"]


def test_n_h3_a_symlinked_readme_is_not_uploaded(hub, tmp_path):
    (tmp_path / "private.txt").write_text("private")
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.save_plan(tmp_path / "plan")
    os.symlink(tmp_path / "private.txt", tmp_path / "plan" / "README.md")
    upload, left_out = files_to_push(tmp_path / "plan")
    assert "README.md" in left_out and "README.md" not in upload
    push_folder(tmp_path / "plan", "alice/nolink", token=hub.token)
    assert "README.md" not in hub.repos[("model", "alice/nolink")].commits[-1][1]


def test_l2_a_save_never_writes_or_deletes_through_a_symlinked_subdirectory(tmp_path):
    ds = laundry_list(None, lengths=[3], n_per_length=12)
    task = tmp_path / "task"
    save_task(ds, task)
    shared = tmp_path / "shared"
    shared.mkdir()
    for s in ("train", "dev", "test"):
        (shared / f"{s}.parquet").write_bytes(b"USER DATA")
    for p in (task / "data").iterdir():
        p.unlink()
    (task / "data").rmdir()
    os.symlink(shared, task / "data")
    with pytest.raises(OutputDirectoryError, match="symbolic link"):
        save_task(DatasetDict({"train": ds["train"]}), task)
    with pytest.raises(OutputDirectoryError, match="symbolic link"):
        save_task(DatasetDict({"train": ds["train"]}), task, overwrite=True)
    assert sorted(os.listdir(shared)) == ["dev.parquet", "test.parquet", "train.parquet"]
    assert all((shared / f"{s}.parquet").read_bytes() == b"USER DATA" for s in ("train", "dev", "test"))


def test_a_hand_edited_file_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    _save(out)
    (out / "README.md").write_text("my own card")
    with pytest.raises(OutputDirectoryError, match="README.md"):
        _save(out, seed=1)
    assert (out / "README.md").read_text() == "my own card"
    _save(out, seed=1, overwrite=True)
    assert (out / "README.md").read_text() != "my own card"


def test_a_manifest_of_an_older_th_edit_proves_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    _save(out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    data = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({"written_by": "th_edit", "files": sorted(data["files"])}))
    with pytest.raises(OutputDirectoryError, match="older th_edit"):
        _save(out, seed=1)
    with caplog.at_level("WARNING"):
        _save(out, seed=1, overwrite=True)
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards  # left, and said so
    assert "cannot prove" in caplog.text and shards[0] in caplog.text
    assert read_manifest(out).trusted
