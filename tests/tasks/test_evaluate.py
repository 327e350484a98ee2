"""Evaluation: batched results against a plain one-prompt forward pass, padding sides, intervals, guard
metric, device_map dispatch, and 2-process ``accelerate launch`` equal to one process."""

import json
import math
from pathlib import Path

import pytest
import torch
from launching import launch_two, run_alone
from tiny_models import laundry_model

from th_edit import ChannelEditor, InvalidArgumentError
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate, guard_loss, plan_batches, wilson_interval
from th_edit.tasks.guard_text import GUARD_TEXTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup():
    model, tok = laundry_model("llama", seed=4)
    data = laundry_list(tok, lengths=[2, 3, 6, 9], n_per_length=16, seed=0)
    return model, tok, data["test"]


def _reference(model, tok, rows):
    """One prompt at a time, plain transformers forward pass, no th_edit code."""
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tok(r["prompt"])["input_ids"]])
            logits = model(ids).logits[0, -1]
            cand = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in r["items"]]
            t = r["items"].index(r["target"])
            out.append((int(logits[cand].argmax()) == t, int(logits.argmax()) == cand[t],
                        float(logits.softmax(-1)[cand[t]])))
    return out


@pytest.mark.parametrize("padding_side,batch_size", [("right", 5), ("left", 5), ("right", 1), ("left", 64)])
def test_batched_evaluation_matches_one_prompt_at_a_time(setup, padding_side, batch_size):
    model, tok, test = setup
    result = evaluate(model, tok, test, batch_size=batch_size, padding_side=padding_side, progress=False)
    ref = _reference(model, tok, test.to_list())
    rec = result.records
    assert len(rec) == len(ref) and rec.example_id.tolist() == test["example_id"]
    assert rec.correct.tolist() == [c for c, _, _ in ref]
    assert rec.correct_vocab.tolist() == [v for _, v, _ in ref]
    assert max(abs(a - p) for a, (_, _, p) in zip(rec.p_target, ref)) < 1e-5


def test_summaries_by_length_and_position(setup):
    model, tok, test = setup
    result = evaluate(model, tok, test, progress=False)
    by_len = result.by_length()
    rec = result.records
    for row in by_len.itertuples():
        sub = rec[rec.list_length == row.list_length]
        assert row.n == len(sub) and row.accuracy == pytest.approx(sub.correct.mean())
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(int(sub.correct.sum()), len(sub)))
        assert row.ci_low <= row.accuracy <= row.ci_high
    assert by_len.n.sum() == len(test) and result.by_position().n.sum() == len(test)
    assert result.to_dict()["accuracy"] == pytest.approx(rec.correct.mean())


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(81, 263)  # worked example: 0.2553 .. 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_batches_are_fixed_by_token_length_not_by_process():
    batches = plan_batches([5, 3, 9, 3, 7], 2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_guard_loss_matches_transformers_loss(setup):
    model, tok, _ = setup
    total = count = 0.0
    with torch.no_grad():
        for text in GUARD_TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            n = ids.shape[1] - 1
            total += float(model(ids, labels=ids).loss) * n
            count += n
    assert guard_loss(model, tok) == pytest.approx(total / count, rel=1e-5)


def test_edits_change_the_evaluation_and_undo_restores_it(setup):
    model, tok, test = setup
    before = evaluate(model, tok, test, progress=False).records
    editor = ChannelEditor(model)
    editor.scale_component(2, 1, "ov", 0, 5.0)
    editor.scale_component(2, 3, "qk", 0, 5.0)
    changed = evaluate(model, tok, test, progress=False).records
    editor.reset()
    assert not changed.p_target.equals(before.p_target)
    assert evaluate(model, tok, test, progress=False).records.equals(before)


def test_bad_arguments(setup):
    model, tok, test = setup
    with pytest.raises(InvalidArgumentError, match="padding_side"):
        evaluate(model, tok, test, padding_side="middle")
    with pytest.raises(InvalidArgumentError, match="empty"):
        evaluate(model, tok, [], progress=False)
    with pytest.raises(InvalidArgumentError, match="lack"):
        evaluate(model, tok, [{"prompt": "x"}], progress=False)


def test_device_map_dispatched_model_gives_the_same_result(setup):
    from accelerate import dispatch_model

    model, tok, test = setup
    ref = evaluate(model, tok, test, progress=False).records
    fresh, _ = laundry_model("llama", seed=4)
    dispatched = dispatch_model(fresh, device_map={"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                   "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    assert evaluate(dispatched, tok, test, progress=False).records.equals(ref)


def test_two_accelerate_processes_equal_one_exactly(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the gathered records equal the single-process ones,
    and only the main process writes the saved model."""
    model, tok = laundry_model("gpt2", seed=2)
    ChannelEditor(model).save_pretrained(tmp_path / "m", tokenizer=tok)
    args = ["--model", str(tmp_path / "m"), "--lengths", "2", "5", "--n", "24", "--batch-size", "3"]
    script = ROOT / "examples" / "scripted_eval.py"
    run_alone(script, *args, "--out", str(tmp_path / "one.json"))
    launch_two(script, *args, "--out", str(tmp_path / "two.json"), "--save-to", str(tmp_path / "saved"), timeout=300)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["records"] == one["records"]  # exact: same batches, same numbers
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stray staging dirs
