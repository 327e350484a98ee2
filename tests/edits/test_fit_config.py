"""FitConfig refuses nonsensical settings when it is built (InvalidArgumentError naming the field and the fix),
round-trips through JSON, and is saved beside the plan the facade records."""

import json
import math

import pytest
from tiny_models import laundry_model, make_model

from th_edit import ChannelEditor, EditPlan
from th_edit.data import laundry_list
from th_edit.edits.fit import FitConfig
from th_edit.edits.plan import PLAN_JSON
from th_edit.errors import InvalidArgumentError


@pytest.mark.parametrize("bad, field", [
    (dict(max_log_scale=0.0), "max_log_scale"),
    (dict(max_log_scale=-1.0), "max_log_scale"),
    (dict(max_log_scale=math.nan), "max_log_scale"),
    (dict(max_log_scale=math.inf), "max_log_scale"),
    (dict(l1_weights=(-1e-4,)), "l1_weights"),
    (dict(l1_weights=(math.nan,)), "l1_weights"),
    (dict(guard_weights=(1.0, -2.0)), "guard_weights"),
    (dict(guard_weights=(math.inf,)), "guard_weights"),
    (dict(max_guard_change=math.nan), "max_guard_change"),
    (dict(max_guard_change=math.inf), "max_guard_change"),
    (dict(max_guard_change=-0.5), "max_guard_change"),
    (dict(lr=math.nan), "lr"),
    (dict(refit_lr=0.0), "refit_lr"),
    (dict(k_fractions=(0.0,)), "k_fractions"),
    (dict(k_fractions=(1.5,)), "k_fractions"),
    (dict(k_fractions=()), "k_fractions"),
    (dict(guard_shrink=(1.0,)), "guard_shrink"),
    (dict(steps=0), "steps"),
    (dict(batch_size=True), "batch_size"),
    (dict(cache_bytes=-1), "cache_bytes"),
    (dict(seed=1.5), "seed"),
    (dict(heads="some"), "heads"),
    (dict(heads=[(1, "a")]), "heads"),
    (dict(circuits=()), "circuits"),
    (dict(folded="yes"), "folded"),
    (dict(rank_by="size"), "rank_by"),
])
def test_nonsense_is_refused_at_construction(bad, field):
    with pytest.raises(InvalidArgumentError, match=field):
        FitConfig(**bad)
    with pytest.raises(InvalidArgumentError, match=field):  # and through an override
        FitConfig().with_overrides(**bad)


def test_sensible_edges_are_accepted():
    FitConfig(l1_weights=(0.0,), guard_weights=(0.0,), max_guard_change=0.0, k_fractions=(1.0,), guard_shrink=(),
              refit_steps=0, seed=-3, folded=False)


def test_round_trip_and_unknown_fields():
    cfg = FitConfig(heads=[(1, 2), (3, 4)], circuits=("ov", "qk"), budget=32, guard_weights=(0.5, 2.0))
    assert FitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.with_overrides() is cfg and cfg.with_overrides(budget=8).budget == 8
    with pytest.raises(InvalidArgumentError, match="unknown FitConfig fields"):
        cfg.with_overrides(budgett=8)


def test_facade_refuses_bad_settings_before_touching_anything():
    model, tok = laundry_model("llama", seed=1)
    editor = ChannelEditor(model, tokenizer=tok)
    ds = laundry_list(tok, lengths=[3], n_per_length=8, seed=0)
    with pytest.raises(InvalidArgumentError, match="max_log_scale"):
        editor.fit_edit(ds["train"], ds["dev"], max_log_scale=0.0)
    assert not editor.edits


def test_the_plan_carries_the_fit_config(tmp_path):
    model, tok = laundry_model("llama", seed=2)
    editor = ChannelEditor(model, tokenizer=tok)
    ds = laundry_list(tok, lengths=[3, 5], n_per_length=12, seed=3)
    cfg = FitConfig(budget=4, steps=2, refit_steps=1, k_fractions=(1.0,), batch_size=4, progress=False,
                    heads=[(2, 0), (2, 1)])
    result = editor.fit_edit(ds["train"], ds["dev"], config=cfg)
    assert result.plan.provenance["fit_config"] == cfg.to_dict()
    editor.save_plan(tmp_path / "plan")
    data = json.loads((tmp_path / "plan" / PLAN_JSON).read_text())
    assert data["provenance"]["fit_config"] == cfg.to_dict()
    loaded = EditPlan.load(tmp_path / "plan")
    assert FitConfig.from_dict(loaded.provenance["fit_config"]) == cfg
    editor.reset()
    assert ChannelEditor.from_plan(model, tmp_path / "plan").edits  # the plan still verifies and applies


def test_a_plan_without_provenance_still_loads(tmp_path):
    editor = ChannelEditor(make_model("gpt2"))
    editor.scale_component(1, 0, "ov", 2, 0.5)
    editor.save_plan(tmp_path)
    data = json.loads((tmp_path / PLAN_JSON).read_text())
    data.pop("provenance", None)
    (tmp_path / PLAN_JSON).write_text(json.dumps(data))
    assert EditPlan.load(tmp_path).provenance == {}
