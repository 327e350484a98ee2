"""The old import paths of moved modules and renamed names keep working, with a DeprecationWarning."""

import importlib

import pytest

MOVED = [
    ("th_edit.analysis.circuit", "th_edit.analysis.circuit_discovery", "find_circuit"),
    ("th_edit.core.checkpoint", "th_edit.core.checkpoint_layout", "CheckpointLayout"),
    ("th_edit.edits.reparam", "th_edit.edits.fit_hooks", "ChannelFit"),
    ("th_edit.edits.fit_data", "th_edit.edits.fit_problem", "FitProblem"),
    ("th_edit.analysis.composition", "th_edit.analysis.channel_map", "ChannelMapConfig"),
    ("th_edit.analysis.channels", "th_edit.analysis.channel_stream", "ChannelMap"),
    ("th_edit.analysis.channels_shard", "th_edit.analysis.channel_shards", "merge_parts"),
    ("th_edit.sharing.models", "th_edit.sharing.bundled_models", "load_model"),
    ("th_edit.app.demo_controls", "th_edit.app.demo_checks", "heads_carrying_edit"),
    ("th_edit.edits.fit_config", "th_edit.edits.fit_result", "FitResult"),
]
RENAMED = [
    ("th_edit.tasks.batching", "rows", "dataset_rows"),
    ("th_edit.sharing.lora", "plan_of", "plan_to_export"),
    ("th_edit.sharing.lora", "state_of", "adapter_parts"),
]


@pytest.mark.parametrize("old, new, name", MOVED)
def test_old_module_path_forwards_with_a_warning(old, new, name):
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old, new, name", MOVED[:3])
def test_from_import_of_an_old_path_works(old, new, name):
    with pytest.warns(DeprecationWarning):
        namespace: dict = {}
        exec(f"from {old} import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("module, old, new", RENAMED)
def test_renamed_function_answers_under_its_old_name(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(mod, old) is getattr(mod, new)


def test_an_unknown_name_on_an_old_path_is_an_attribute_error():
    mod = importlib.import_module("th_edit.analysis.circuit")
    with pytest.raises(AttributeError, match="circuit_discovery"):
        mod.no_such_name  # noqa: B018
