"""Issue 13, High: ``th-edit push DIR`` uploads only the files th_edit wrote (never ``.env``, ``secrets/``,
notes), says what it left out, and creates private repositories unless ``--public``."""

import json

from tiny_models import make_model

from th_edit import ChannelEditor
from th_edit.app.cli import main
from th_edit.sharing.hub import files_to_push, push_folder
from th_edit.utils.files import MANIFEST


def _secrets(folder):
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----")
    (folder / "notes.txt").write_text("private notes")


def _saved_model(folder):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.save_pretrained(folder)
    return editor


def test_cli_push_uploads_only_th_edit_files_privately(hub, tmp_path, capsys):
    out = tmp_path / "model"
    _saved_model(out)
    _secrets(out)
    code = main(["push", str(out), "alice/sel-private", "--token", hub.token, "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    repo = hub.repos[("model", "alice/sel-private")]
    pushed = set(repo.commits[-1][1])
    assert {"model.safetensors", "config.json", "edit_plan.json", "edit_plan.safetensors", "README.md"} <= pushed
    assert not {".env", "secrets/key.pem", "notes.txt"} & pushed
    assert sorted(payload["left_out"]) == [".env", "notes.txt", "secrets/key.pem"]
    assert repo.private and payload["private"] is True


def test_cli_push_public_only_when_asked(hub, tmp_path, capsys):
    out = tmp_path / "model"
    _saved_model(out)
    assert main(["push", str(out), "alice/sel-public", "--token", hub.token, "--public", "--quiet"]) == 0
    assert not hub.repos[("model", "alice/sel-public")].private


def test_directory_without_manifest_uploads_only_known_files(hub, tmp_path, capsys):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(0, 1, "ov", 0, 2.0)
    editor.save_plan(tmp_path / "plan")  # plans carry no manifest
    _secrets(tmp_path / "plan")
    upload, left_out = files_to_push(tmp_path / "plan")
    assert upload == ["edit_plan.json", "edit_plan.safetensors"] and ".env" in left_out
    assert main(["push", str(tmp_path / "plan"), "alice/sel-plan", "--token", hub.token, "--quiet"]) == 0
    assert set(hub.repos[("model", "alice/sel-plan")].commits[-1][1]) == {"edit_plan.json", "edit_plan.safetensors",
                                                                           "README.md"}


def test_library_push_folder_filters_too(hub, tmp_path, caplog):
    out = tmp_path / "model"
    _saved_model(out)
    _secrets(out)
    with caplog.at_level("WARNING"):
        push_folder(out, "alice/sel-lib", token=hub.token)
    pushed = set(hub.repos[("model", "alice/sel-lib")].commits[-1][1])
    assert ".env" not in pushed and "secrets/key.pem" not in pushed and MANIFEST not in pushed  # issue 23
    assert ".env" in caplog.text
