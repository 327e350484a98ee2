"""Laundry List / IOI exported as lm-evaluation-harness tasks: lm-eval's own ``simple_evaluate`` on a tiny
saved model gives th_edit's ``evaluate`` accuracy on the same rows, example by example; bad inputs."""

import json

import pytest
import yaml
from tiny_models import laundry_model, laundry_tokenizer

from th_edit.app.cli import main
from th_edit.errors import MissingDependencyError, OutputDirectoryError
from th_edit.tasks import lm_eval_export
from th_edit.tasks.evaluate import evaluate
from th_edit.tasks.lm_eval_export import ExportConfig, choice_texts, export_tasks, task_specs

SMALL = ExportConfig(lengths=(3, 5), n_per_length=24, ioi_n=40)


def _rows(directory, task):
    return [json.loads(line) for line in (directory / "data" / f"{task}.jsonl").read_text().splitlines()]


def test_export_writes_every_template_and_pool_and_ioi(tmp_path):
    result = export_tasks(tmp_path / "tasks", laundry_tokenizer(every_pool=True), config=SMALL)
    names = [name for name, _, _ in task_specs(ExportConfig())]
    assert list(result.tasks) == names and len(names) == 5 * 3 + 1
    assert "th_laundry_list_omitted" in names and "th_laundry_list_recall_toys" in names and "th_ioi" in names
    for name in names:
        spec = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
        assert spec["task"] == name and spec["output_type"] == "multiple_choice" and spec["target_delimiter"] == ""
        rows = _rows(tmp_path / "tasks", name)
        assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "tasks" / "data" / f"{name}.jsonl")
        assert len(rows) == result.tasks[name] == (10 if name == "th_ioi" else 12)
        for r in rows:
            assert r["items"][r["gold"]] == r["target"] and len(r["choices"]) == len(r["items"])
    assert "--include_path" in result.command() and "th_ioi" in result.command()


def test_choices_are_the_first_token_in_context():
    """A subword tokenizer splits items: the choice is the prefix that is exactly the item's first token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "He", "bought", "the", "app", "##les", "pears"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert tokenizer(" apples", add_special_tokens=False)["input_ids"] == [4, 5]  # app ##les
    assert choice_texts(tokenizer, "He bought the", ["apples", "pears"]) == [" app", " pears"]


def test_lm_eval_accuracy_equals_th_edit_evaluate(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tokenizer = laundry_model("llama", every_pool=True)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tasks = ["th_laundry_list_omitted", "th_laundry_list_recall_toys", "th_laundry_list_omitted_lent_hardware", "th_ioi"]
    export_tasks(tmp_path / "tasks", tokenizer, config=SMALL)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32", tasks=tasks, device="cpu",
        batch_size=4, task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
    )
    for task in tasks:
        rows = _rows(tmp_path / "tasks", task)
        ours = evaluate(model, tokenizer, rows, batch_size=5, progress=False)
        theirs = {s["doc"]["example_id"]: bool(s["acc"]) for s in out["samples"][task]}
        assert theirs == {r["example_id"]: c for r, c in zip(rows, ours.records["correct"])}, task
        assert out["results"][task]["acc,none"] == pytest.approx(ours.accuracy, abs=1e-12), task
        assert 0 < ours.accuracy < 1 or task == "th_ioi"  # the comparison is not trivially all-right/all-wrong


def test_export_into_a_directory_with_other_files_is_refused(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirectoryError, match="not written by th_edit"):
        export_tasks(target, laundry_tokenizer(every_pool=True), config=SMALL)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    # its own earlier export is replaced
    export_tasks(tmp_path / "t", laundry_tokenizer(every_pool=True), config=ExportConfig(lengths=(3,), n_per_length=8,
                                                                                          templates=["recall"]))
    export_tasks(tmp_path / "t", laundry_tokenizer(every_pool=True), config=SMALL)
    assert len(list((tmp_path / "t").glob("*.yaml"))) == 16


def test_old_or_missing_lm_eval_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_eval_export, "lm_eval_version", lambda: "0.3.0")
    with pytest.raises(MissingDependencyError, match=r"0\.3\.0, older than 0\.4\.4.*pip install -U"):
        export_tasks(tmp_path / "t", laundry_tokenizer(every_pool=True), config=SMALL)
    assert not (tmp_path / "t").exists()
    monkeypatch.setattr(lm_eval_export, "lm_eval_version", lambda: None)
    with pytest.raises(MissingDependencyError, match="not installed"):
        lm_eval_export.require_lm_eval()
    export_tasks(tmp_path / "t", laundry_tokenizer(every_pool=True), config=SMALL)  # absent here: exported anyway


def test_cli_export_tasks(tmp_path, capsys):
    _, tokenizer = laundry_model("llama", every_pool=True)
    tokenizer.save_pretrained(tmp_path / "tok")
    code = main(["export-tasks", str(tmp_path / "tasks"), "--model", str(tmp_path / "tok"), "--lengths", "3",
                 "--n", "8", "--templates", "omitted", "recall", "--pools", "household", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["tasks"] == {"th_laundry_list_omitted": 2, "th_laundry_list_recall": 2, "th_ioi": 50}
    assert "lm_eval --model hf" in payload["lm_eval_command"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    assert main(["export-tasks", str(tmp_path / "other"), "--model", str(tmp_path / "tok"), "--quiet"]) == 2
