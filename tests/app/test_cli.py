"""The th-edit command line on a tiny saved model: every command, --json output, exit codes."""

import json

import pytest
import torch
from tiny_models import laundry_model
from transformers import AutoModelForCausalLM

from th_edit import ChannelEditor
from th_edit.app.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def plan_dir(model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    editor = ChannelEditor(model)
    editor.scale_component(2, 1, "ov", 0, 3.0)
    folder = tmp_path_factory.mktemp("plan") / "plan"
    editor.save_plan(folder)
    return folder


def run(capsys, *argv):
    code = main([*argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("analyze", "find", "edit", "eval", "push", "demo", "Exit codes"):
        assert cmd in text


def test_analyze_writes_tables_and_plots(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "analyze", str(model_dir), "--out", str(tmp_path / "a"), "--json", "--top", "5")
    assert code == 0
    payload = json.loads(out)
    assert payload["command"] == "analyze" and len(payload["top"]) == 5
    for name in ("channels_pairs.csv", "channels_components.parquet", "channels_heads.csv", "head_roles.csv",
                 "heatmap.png", "component_profile.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name


def test_find_traces_the_circuit_and_draws_it(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "find", str(model_dir), "--lengths", "3", "5", "--n", "16", "--n-prompts", "4",
                       "--json", "--out", str(tmp_path / "c"))
    assert code == 0
    payload = json.loads(out)
    from th_edit.analysis.circuit_discovery import Circuit

    saved = Circuit.load(tmp_path / "c" / "circuit.json")
    assert [list(h) for h in saved.head_list()] == [list(h) for h in payload["heads"]]
    assert saved.meta["reason"] or saved.heads
    for suffix in ("png", "svg"):
        assert (tmp_path / "c" / f"circuit.{suffix}").stat().st_size > 0


def test_find_passes_the_circuit_settings(capsys, model_dir):
    code, out, _ = run(capsys, "find", str(model_dir), "--lengths", "3", "5", "--n", "16", "--n-prompts", "4",
                       "--min-effect", "0.7", "--max-depth", "1", "--json")
    assert code == 0
    config = json.loads(out)["circuit"]["meta"]["config"]
    assert (config["min_effect"], config["max_depth"]) == (0.7, 1)


def test_find_roles_reports_channels_as_json(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "find", str(model_dir), "--roles", "--lengths", "3", "5", "--n", "16", "--n-prompts", "4",
                       "--json", "--out", str(tmp_path / "f"))
    assert code == 0
    payload = json.loads(out)
    assert payload["movers"] and payload["inhibition"] and "inhibition" in payload["rank_correlation"]
    assert (tmp_path / "f" / "channels.csv").is_file()


def test_edit_with_a_plan_saves_a_reloadable_model_and_plan(capsys, model_dir, plan_dir, tmp_path):
    code, out, _ = run(capsys, "edit", str(model_dir), "--plan", str(plan_dir), "--out", str(tmp_path / "e"), "--json")
    assert code == 0 and json.loads(out)["n_edits"] == 1
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "e", attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    again = ChannelEditor.from_plan(base, tmp_path / "e")  # the saved directory carries its plan
    assert all(torch.equal(a, b) for a, b in zip(edited.state_dict().values(), again.model.state_dict().values()))


@pytest.mark.parametrize("search", ["fit", "grid"])
def test_edit_auto_searches_and_saves(capsys, model_dir, tmp_path, search):
    extra = ["--heads", "all", "--budget", "8", "--adapter"] if search == "fit" else []
    code, out, _ = run(capsys, "edit", str(model_dir), "--auto", "--search", search, "--lengths", "3", "5", "--n", "16",
                       "--search-lengths", "3", "5", "--out", str(tmp_path / "auto"), "--json", *extra)
    assert code == 0
    payload = json.loads(out)
    assert payload["search"] == search
    assert {str(k) for k in payload["test_before"]} >= {"3", "5"}
    assert (tmp_path / "auto" / "model.safetensors").is_file() and (tmp_path / "auto" / "edit_plan.json").is_file()
    if search == "fit":
        assert 0 < payload["n_components"] <= 8
        assert (tmp_path / "auto" / "adapter" / "adapter_config.json").is_file()
        assert len(ChannelEditor.from_plan(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "auto").edits) == payload["n_edits"]


def test_eval_with_plan_writes_a_report(capsys, model_dir, plan_dir, tmp_path):
    code, out, _ = run(capsys, "eval", str(model_dir), "--plan", str(plan_dir), "--lengths", "3", "6", "--n", "16",
                       "--report", str(tmp_path / "r"), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["before"]["by_length"] and payload["after"]["by_length"] and len(payload["guard"]) == 2
    report = (tmp_path / "r" / "report.md").read_text()
    assert "(accuracy_by_length.png)" in report and "Guard metric" in report
    assert (tmp_path / "r" / "accuracy_by_length.png").stat().st_size > 5000
    # the plan (scale_component only) records no data: the overlap is unknown, and the report says so
    assert payload["overlap"]["checked"] is False and "records no training data" in report
    assert "data:image/png;base64," in (tmp_path / "r" / "report.html").read_text()


def test_push_model_and_plan_directories(capsys, hub, plan_dir, model_dir, tmp_path):
    code, out, _ = run(capsys, "push", str(model_dir), "alice/cli-model", "--token", hub.token, "--json")
    assert code == 0 and json.loads(out)["commit"]
    assert "model.safetensors" in hub.repos[("model", "alice/cli-model")].commits[-1][1]
    import shutil

    shutil.copytree(plan_dir, tmp_path / "p")
    code, _, _ = run(capsys, "push", str(tmp_path / "p"), "alice/cli-plan", "--token", hub.token, "--quiet")
    assert code == 0 and "README.md" in hub.repos[("model", "alice/cli-plan")].commits[-1][1]


def test_exit_codes_mean_something(capsys, hub, model_dir, plan_dir, tmp_path):
    other, tok = laundry_model("llama", seed=99)
    ChannelEditor(other).save_pretrained(tmp_path / "other", tokenizer=tok)
    code, _, err = run(capsys, "edit", str(tmp_path / "other"), "--plan", str(plan_dir), "--out", str(tmp_path / "x"))
    assert code == 3 and "differs from the plan's base model" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "eval", "no-such-model", "--n", "4")
    assert code == 2 and "not a bundled model" in err
    code, _, err = run(capsys, "push", str(model_dir), "alice/no-token")
    assert code == 4 and "token" in err
    code, _, err = run(capsys, "push", str(tmp_path / "missing"), "alice/x", "--token", hub.token)
    assert code == 4 and "not a directory" in err


def test_demo_runs_end_to_end_and_is_deterministic(capsys, model_dir, tmp_path):
    summaries = []
    for run_dir in ("d1", "d2"):
        code, out, _ = run(capsys, "demo", "--model", str(model_dir), "--n", "8", "--lengths", "3", "5",
                           "--search-lengths", "5", "--n-prompts", "6", "--out", str(tmp_path / run_dir), "--json",
                           "--compare-heads", "--budget", "16", "--control-budget", "4")
        assert code == 0
        payload = json.loads(out)
        for volatile in ("timings", "report", "command"):
            payload.pop(volatile)
        summaries.append(payload)
    assert summaries[0] == summaries[1]
    report = (tmp_path / "d1" / "report.md").read_text()
    for section in ("## Accuracy", "## Guard metric", "## Channels found", "## Fitted edit",
                    "## Discovered vs random heads", "## Run"):
        assert section in report
    carried = summaries[0]["edit_carried_by"]  # the fitted edit restricted to discovered / random heads
    assert set(carried) == {"discovered", "random", "random_components"}
    assert "## Which heads carry the fitted edit" in report and "heads holding most of it are" in report
    for sub in carried.values():
        assert 0 < sub["n_components"] <= summaries[0]["n_components"]
    mine = carried["discovered"]["n_components"]  # as many random components as exist outside the discovered heads
    assert carried["random_components"]["n_components"] == min(mine, summaries[0]["n_components"] - mine)
    for fig in ("accuracy_by_length.png", "accuracy_by_position.png", "heatmap_top_mover.png", "learned_scales.png"):
        assert (tmp_path / "d1" / fig).is_file()
    assert (tmp_path / "d1" / "edit_plan" / "edit_plan.json").is_file()
    # the circuit traced back from the answer: saved, drawn, in the report, and what "discovered" now names
    from th_edit.analysis.circuit_discovery import Circuit

    circuit = Circuit.load(tmp_path / "d1" / "circuit.json")
    assert [list(h) for h in circuit.head_list()] == [list(h) for h in summaries[0]["discovered_heads"]]
    assert summaries[0]["circuit"]["heads"] == summaries[0]["discovered_heads"] and "roles_heads" in summaries[0]
    assert "## The circuit" in report and (tmp_path / "d1" / "circuit.png").is_file()
    assert (tmp_path / "d1" / "circuit.svg").is_file()


def test_templates_and_item_pools_are_selectable(capsys, tmp_path):
    model, tok = laundry_model("llama", seed=3, every_pool=True)
    model_dir = tmp_path / "m"
    ChannelEditor(model).save_pretrained(model_dir, tokenizer=tok)
    code, out, _ = run(capsys, "eval", str(model_dir), "--template", "omitted_packed", "--items", "toys",
                       "--lengths", "3", "--n", "8", "--report", str(tmp_path / "r"), "--json")
    assert code == 0 and json.loads(out)["before"]["by_length"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "template: omitted_packed" in report and "items: toys" in report
    code, _, err = run(capsys, "eval", str(model_dir), "--items", "garden", "--n", "4")
    assert code == 2 and "not a pool name" in err and "toys" in err
    code, _, err = run(capsys, "eval", str(model_dir), "--template", "omited", "--n", "4")
    assert code == 2 and "omitted_packed" in err
