"""Bundled models publish their Hub id and license, never the local cache path (issue 28); cards carry
machine-readable (model-index) results."""

import json

import pytest
from huggingface_hub import ModelCard
from tiny_models import laundry_model

from th_edit import ChannelEditor, OutputDirectoryError
from th_edit.sharing.bundled_models import BUNDLED, load_model, published_license, published_name
from th_edit.sharing.cards import plan_card

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def bundled_cache(tmp_path):
    """A cache root whose smollm2 entry is a tiny model (the converted copy load_model finds and uses)."""
    model, tok = laundry_model("llama", seed=1)
    model.save_pretrained(tmp_path / "cache" / BUNDLED["smollm2"].name)
    tok.save_pretrained(tmp_path / "cache" / BUNDLED["smollm2"].name)
    return tmp_path / "cache"


def test_names_and_licenses():
    assert published_name("smollm2") == SMOL and published_name("gemma3-270m") == "google/gemma-3-270m"
    assert published_license(SMOL) == "apache-2.0" and published_license("google/gemma-3-270m") == "gemma"
    assert published_name("openai-community/gpt2") == "openai-community/gpt2" and published_license("gpt2") is None
    assert published_name("/home/me/models/SmolLM2-135M-Instruct") == "" and published_name("./mine") == ""


def test_nothing_written_for_publishing_names_the_cache_path(bundled_cache, tmp_path):
    model, tok = load_model("smollm2", cache_dir=bundled_cache)
    assert model.config._name_or_path == SMOL
    editor = ChannelEditor(model, tokenizer=tok)
    editor.scale_component(2, 1, "ov", [0, 1], 2.0)
    editor.evaluation = {"before": {3: 0.25, 5: 0.125}, "after": {3: 0.5, 5: 0.375},
                         "note": "Accuracy on the test split by list length."}
    out = tmp_path / "out"
    editor.save_pretrained(out / "model")
    editor.save_adapter(out / "adapter")
    editor.save_plan(out / "plan")
    plan_card(editor.export_plan(), repo_id="me/plan").save(out / "plan" / "README.md")
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert str(bundled_cache).encode() not in data and str(tmp_path).encode() not in data, path
    for card_path in (out / "model" / "README.md", out / "adapter" / "README.md", out / "plan" / "README.md"):
        card = ModelCard.load(card_path)
        assert card.data.base_model == SMOL and card.data.license == "apache-2.0", card_path
        assert f'from_pretrained("{SMOL}")' in card.text, card_path
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOL
    assert json.loads((out / "plan" / "edit_plan.json").read_text())["base_model"]["name_or_path"] == SMOL
    # model-index: accuracy by length before and after, machine-readable
    results = ModelCard.load(out / "model" / "README.md").data.eval_results
    got = {(r.metric_config, r.metric_value) for r in results}
    assert got == {("length=3,before", 0.25), ("length=5,before", 0.125), ("length=3,after", 0.5),
                   ("length=5,after", 0.375)}
    assert all(r.metric_type == "accuracy" and r.dataset_split == "test" for r in results)
    assert "model-index" in (out / "adapter" / "README.md").read_text()


def test_the_cache_copy_is_still_protected(bundled_cache):
    model, tok = load_model("smollm2", cache_dir=bundled_cache)
    with pytest.raises(OutputDirectoryError):
        ChannelEditor(model).save_pretrained(bundled_cache / BUNDLED["smollm2"].name, overwrite=True)


def test_local_paths_are_not_published(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    editor = ChannelEditor(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    editor.scale_component(1, 0, "ov", 0, 0.5)
    editor.save_adapter(tmp_path / "a")
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "a").iterdir() if p.is_file())
    assert str(tiny_model_dir) not in written and "<base model>" in written
