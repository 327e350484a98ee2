"""Issue 13, Medium: corrupt plans, a model directory without config.json, a dead Hub endpoint and a dropped
upload give typed errors with the fix; the CLI exits 2/3/4 as the README says, prints no traceback, and with
``--json`` always prints exactly one JSON object (with ``error`` and ``exit_code`` on failure)."""

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import make_model

from th_edit import ChannelEditor, HubError, ModelFileError, PlanFormatError
from th_edit.app.cli import main
from th_edit.edits.plan import PLAN_JSON, PLAN_TENSORS, EditPlan
from th_edit.sharing.hub import push_folder


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    ChannelEditor(make_model("gpt2")).save_pretrained(folder)
    return folder


@pytest.fixture
def plan_dir(tmp_path):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 2, "ov", 0, 0.0)
    editor.save_plan(tmp_path / "plan")
    return tmp_path / "plan"


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert len(lines) == 1, out.out
    return code, json.loads(lines[0]), out.err


def _truncate(d):
    data = (d / PLAN_TENSORS).read_bytes()
    (d / PLAN_TENSORS).write_bytes(data[: len(data) // 2])


def _wrong_dtype(d):
    tensors = {k: v.half() for k, v in load_file(str(d / PLAN_TENSORS)).items()}
    save_file(tensors, str(d / PLAN_TENSORS))
    data = json.loads((d / PLAN_JSON).read_text())
    data.pop("tensors_sha256")
    (d / PLAN_JSON).write_text(json.dumps(data))


@pytest.mark.parametrize("corrupt, match", [
    (lambda d: (d / PLAN_JSON).write_text("[]"), "JSON list"),
    (lambda d: (d / PLAN_JSON).write_text("null"), "JSON NoneType"),
    (_truncate, "tensors_sha256"),
    (_wrong_dtype, "float16"),
])
def test_corrupt_plans_are_plan_format_errors_and_exit_3(capsys, model_dir, plan_dir, tmp_path, corrupt, match):
    corrupt(plan_dir)
    with pytest.raises(PlanFormatError, match=match):
        EditPlan.load(plan_dir)
    code, payload, err = run_json(capsys, "edit", str(model_dir), "--plan", str(plan_dir), "--out", str(tmp_path / "o"))
    assert code == 3 and payload["exit_code"] == 3 and payload["command"] == "edit"
    assert payload["error_type"] == "PlanFormatError" and "Re-export" in payload["error"]
    assert not (tmp_path / "o").exists()


def test_truncated_tensors_without_a_hash_are_still_a_format_error(plan_dir):
    data = json.loads((plan_dir / PLAN_JSON).read_text())
    data.pop("tensors_sha256")
    (plan_dir / PLAN_JSON).write_text(json.dumps(data))
    _truncate(plan_dir)
    with pytest.raises(PlanFormatError, match="not a readable safetensors"):
        EditPlan.load(plan_dir)


def test_model_directory_without_config_is_exit_4(capsys, model_dir, plan_dir, tmp_path):
    (model_dir / "config.json").unlink()
    from th_edit.models import load_model

    with pytest.raises(ModelFileError, match="config.json"):
        load_model(str(model_dir))
    code, payload, _ = run_json(capsys, "eval", str(model_dir), "--n", "4")
    assert code == 4 and payload["exit_code"] == 4 and "config.json" in payload["error"]


def test_bad_arguments_are_exit_2_with_json(capsys):
    code, payload, err = run_json(capsys, "edit", "x", "--plan", "p")  # --out missing
    assert code == 2 and payload["exit_code"] == 2 and "--out" in payload["error"] and "--help" in payload["error"]
    code, payload, _ = run_json(capsys, "eval", "no-such-model", "--n", "4")
    assert code == 2 and "not a bundled model" in payload["error"]
    code, payload, _ = run_json(capsys, "frobnicate")
    assert code == 2 and payload["command"] is None


def test_dead_hub_endpoint_is_a_hub_error_and_exit_4(hub, model_dir, monkeypatch, capsys):
    from huggingface_hub import constants, hf_api

    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_api.api, "endpoint", dead)
    with pytest.raises(HubError, match="could not be reached"):
        push_folder(model_dir, "alice/dead", token=hub.token)
    code, payload, _ = run_json(capsys, "push", str(model_dir), "alice/dead", "--token", hub.token)
    assert code == 4 and payload["error_type"] == "HubError" and "retry" in payload["error"]


def test_dropped_upload_is_a_hub_error_and_nothing_is_committed(hub, model_dir, capsys):
    hub.faults["drop_commit"] = 10
    code, payload, _ = run_json(capsys, "push", str(model_dir), "alice/dropped", "--token", hub.token)
    assert code == 4 and payload["error_type"] == "HubError", payload
    hub.faults.clear()
    assert len(hub.repos[("model", "alice/dropped")].commits) == 1  # only the empty initial commit


def test_success_prints_one_json_object(capsys, model_dir, plan_dir, tmp_path):
    code, payload, _ = run_json(capsys, "edit", str(model_dir), "--plan", str(plan_dir), "--out", str(tmp_path / "o"))
    assert code == 0 and payload["n_edits"] == 1 and "error" not in payload


def test_h6_dropped_lfs_upload_is_a_hub_error_and_exit_4(hub, tmp_path, monkeypatch, capsys):
    """Issue 23: the client's retries end in an untyped RuntimeError; th_edit turns it into a HubError."""
    from types import SimpleNamespace

    from huggingface_hub.utils import _http

    model_dir = tmp_path / "h6"
    ChannelEditor(make_model("gpt2", seed=77)).save_pretrained(model_dir)  # weights the Hub has not seen

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda s: None))  # skip the client's back-off waits
    hub.faults["drop_lfs"] = 100
    with pytest.raises(HubError, match="(?i)nothing was committed"):
        push_folder(model_dir, "alice/h6", token=hub.token)
    code, payload, _ = run_json(capsys, "push", str(model_dir), "alice/h6", "--token", hub.token)
    hub.faults.clear()
    assert code == 4 and payload["error_type"] == "HubError", payload
    assert len(hub.repos[("model", "alice/h6")].commits) == 1  # only the empty initial commit


def test_h12_a_failed_push_of_a_plan_leaves_no_card_behind(hub, plan_dir, capsys):
    before = sorted(p.name for p in plan_dir.iterdir())
    code, payload, _ = run_json(capsys, "push", str(plan_dir), "alice/h12", "--token", "hf_wrong")
    assert code == 4 and payload["error_type"] == "HubError"
    assert sorted(p.name for p in plan_dir.iterdir()) == before


@pytest.mark.parametrize("top", ["0", "-1"])
def test_c10_analyze_top_below_one_is_exit_2(capsys, model_dir, tmp_path, top):
    code, payload, _ = run_json(capsys, "analyze", str(model_dir), "--out", str(tmp_path / "o"), "--top", top)
    assert code == 2 and payload["error_type"] == "InvalidArgumentError" and "positive" in payload["error"]
    assert not (tmp_path / "o").exists()


def test_e2_a_numpy_layer_is_named_as_such():
    import numpy as np

    from th_edit import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="Python int"):
        ChannelEditor(make_model("gpt2")).scale_component(np.int64(1), 2, "ov", 0, 0.5)


def test_n_a3_edit_refuses_a_foreign_out_before_loading_or_fitting(capsys, tmp_path, monkeypatch):
    import th_edit.app.cli as cli

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("x")
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded the model before checking --out"))
    code, payload, _ = run_json(capsys, "edit", "smollm2", "--auto", "--out", str(tmp_path / "o"))
    assert code == 2 and payload["error_type"] == "OutputDirectoryError"


@pytest.mark.parametrize("repo_id", ["alice/x\n", "alice/x.git", "alice/" + "n" * 200, "alice/x.", "alice/x-"])
def test_h3_malformed_repo_ids_are_hub_errors(model_dir, repo_id):
    with pytest.raises(HubError, match="not a Hub repository id"):
        push_folder(model_dir, repo_id, token="unused")


def test_c3_a_missing_path_is_a_model_file_error_and_exit_4(capsys, tmp_path):
    code, payload, _ = run_json(capsys, "eval", str(tmp_path / "nosuch" / "dir"))
    assert code == 4 and payload["error_type"] == "ModelFileError" and "does not exist" in payload["error"]


@pytest.mark.parametrize("thing", [None, "gpt2", "nn.Linear"])
def test_e15_not_a_model_is_an_unsupported_model_error(thing):
    import torch

    from th_edit import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="causal LM"):
        ChannelEditor(torch.nn.Linear(2, 2) if thing == "nn.Linear" else thing)
