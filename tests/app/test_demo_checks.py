"""The demo's restriction control: the fitted edit applied only in some heads, checked against a fresh model
that gets only those heads' edits."""

from types import SimpleNamespace

import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor
from th_edit.app.demo_checks import heads_carrying_edit
from th_edit.data import laundry_list
from th_edit.evaluate import evaluate

EDITS = [(1, 0, [0, 1], 3.0), (1, 1, [2], 0.2), (2, 0, [0], 2.5), (2, 1, [1, 3], 0.5)]


def _edited(heads=None):
    model, tok = laundry_model("llama", seed=2)
    editor = ChannelEditor(model, tokenizer=tok)
    for layer, head, comps, alpha in EDITS:
        if heads is None or (layer, head) in heads:
            editor.scale_component(layer, head, "ov", comps, alpha)
    return editor, tok


def test_restrictions_equal_fresh_partial_edits_and_the_edit_is_restored():
    editor, tok = _edited()
    test = laundry_list(tok, lengths=[3, 5], n_per_length=24, seed=4, fractions=(0.0, 0.0, 1.0))["test"]
    weights = {k: v.clone() for k, v in editor.model.state_dict().items()}
    fit = SimpleNamespace(heads=[(l, h) for l, h, _, _ in EDITS])
    out = heads_carrying_edit(editor, fit, [(1, 1), (2, 1), (0, 0)], test, seed=0)
    assert out["discovered"]["heads"] == [[1, 1], [2, 1]] and out["discovered"]["n_components"] == 3
    assert len(out["random"]["heads"]) == 2 and not {tuple(h) for h in out["random"]["heads"]} & {(1, 1), (2, 1)}
    for name in ("discovered", "random"):
        heads = {tuple(h) for h in out[name]["heads"]}
        fresh, _ = _edited(heads)
        res = evaluate(fresh.model, tok, test, progress=False)
        assert out[name]["test_after"] == res.accuracy_by_length()
        assert abs(out[name]["mean_p_target"] - float(res.records["p_target"].mean())) < 1e-6
    # random components: as many as the discovered heads hold, outside them, each with its fitted scale
    comps = out["random_components"]["components"]
    assert len(comps) == out["random_components"]["n_components"] == 3
    assert not {(l, h) for l, h, _ in comps} & {(1, 1), (2, 1)}
    fresh, _ = _edited(set())
    for layer, head, picked, alpha in EDITS:
        mine = [c for l, h, c in comps if (l, h) == (layer, head)]
        if mine:
            assert set(mine) <= set(picked)
            fresh.scale_component(layer, head, "ov", mine, alpha)
    res = evaluate(fresh.model, tok, test, progress=False)
    assert out["random_components"]["test_after"] == res.accuracy_by_length()
    assert abs(out["random_components"]["mean_p_target"] - float(res.records["p_target"].mean())) < 1e-6
    full = float(evaluate(editor.model, tok, test, progress=False).records["p_target"].mean())
    assert abs(full - out["discovered"]["mean_p_target"]) > 1e-4  # the restriction changes the outputs
    assert all(torch.equal(v, editor.model.state_dict()[k]) for k, v in weights.items())
    assert len(editor.edits) == len(EDITS)


def test_no_discovered_head_among_the_fitted_ones_gives_nothing():
    editor, tok = _edited()
    test = laundry_list(tok, lengths=[3], n_per_length=8, seed=4, fractions=(0.0, 0.0, 1.0))["test"]
    assert heads_carrying_edit(editor, SimpleNamespace(heads=[(1, 0)]), [(0, 0)], test, seed=0) == {}
