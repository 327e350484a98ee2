"""Issue 23, Medium/Low: task inputs that make accuracy meaningless are refused with a typed error (D12: a
tokenizer that gives every item the same first token; D11: a target that is not an item, an empty
prompt; N-C1: a tokenizer that encodes a word as nothing)."""

import pytest
from tiny_models import laundry_model, make_model, make_tokenizer

from th_edit import InvalidArgumentError
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate
from th_edit.tasks.data import first_token


def test_d12_items_sharing_a_first_token_are_refused():
    _, tok = laundry_model("llama")
    small = make_tokenizer(["the", "list", ":", ",", "."])  # every item becomes the unknown token
    model = make_model("llama", vocab_size=len(tok))
    rows = laundry_list(None, lengths=[4], n_per_length=40)["test"]
    with pytest.raises(InvalidArgumentError, match="same first token"):
        evaluate(model, small, rows, progress=False)


def test_d11_a_target_outside_the_items_and_an_empty_prompt_are_refused():
    model, tok = laundry_model("llama")
    rows = list(laundry_list(tok, lengths=[3], n_per_length=8)["test"])
    with pytest.raises(InvalidArgumentError, match="not one of its items"):
        evaluate(model, tok, [{**rows[0], "target": "no-such-item"}], progress=False)
    with pytest.raises(InvalidArgumentError, match="empty prompt"):
        evaluate(model, tok, [{**rows[0], "prompt": ""}], progress=False)
    assert evaluate(model, tok, rows, progress=False).accuracy >= 0  # genuine rows still evaluate


def test_n_c1_a_word_encoded_as_nothing_is_a_typed_error():
    class Empty:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": []}

    with pytest.raises(InvalidArgumentError, match="no tokens"):
        first_token(Empty(), "milk")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lengths=[], n_per_length=8), "lengths is empty"),  # D7
    (dict(lengths=[3], n_per_length=8, items=[]), "only 0"),  # D6: not the default pool
    (dict(lengths=[3], n_per_length=4, fractions=(0.9, 0.9, 0.9)), "sum to 1"),  # D8
    (dict(lengths=[3], n_per_length=4, fractions=(0.5, 0.5)), "three shares"),
])
def test_d6_d7_d8_bad_dataset_settings_are_typed_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        laundry_list(None, **kwargs)


def test_d5_repeated_items_never_make_a_row_list_one_item_twice():
    ds = laundry_list(None, lengths=[3], n_per_length=20, items=["milk", "eggs", "milk", "eggs", "milk", "salt"])
    assert all(len(set(r["items"])) == len(r["items"]) for split in ds.values() for r in split)
