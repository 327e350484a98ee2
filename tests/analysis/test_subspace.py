"""Positional subspace, traversal and steering search on a tiny model."""

import pytest
import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor, InvalidArgumentError
from th_edit.analysis.subspace import (
    _nearest_centroid_accuracy,
    fit_positional_subspace,
    head_final_outputs,
    search_steering,
    traverse,
)
from th_edit.app.plots import plot_subspace, plot_traversal
from th_edit.data import laundry_list


@pytest.fixture(scope="module")
def setup():
    model, tok = laundry_model("llama", seed=8)
    editor = ChannelEditor(model, tokenizer=tok)
    data = laundry_list(tok, lengths=[3, 5], n_per_length=24, seed=1)
    return editor, tok, data


def test_head_outputs_match_the_output_projection_run_on_that_head_alone(setup):
    editor, tok, data = setup
    outs, rows = head_final_outputs(editor, tok, data["train"], 2, 1, batch_size=5, limit=6)
    module = editor.layout.module(2, editor.layout.spec.o)
    dh = editor.d_head
    for i, row in enumerate(rows):
        ids = torch.tensor([tok(row["prompt"])["input_ids"]])
        seen = {}
        h = module.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("z", a[0][0, -1].detach().clone()))
        with torch.no_grad():
            editor.model(ids)
        h.remove()
        keep = torch.zeros_like(seen["z"])
        keep[dh:2 * dh] = seen["z"][dh:2 * dh]
        with torch.no_grad():  # the module's own forward, head 1 only, minus its bias
            expected = module(keep[None])[0] - module(torch.zeros_like(keep)[None])[0]
        assert torch.allclose(outs[i], expected, atol=1e-5)


def test_subspace_geometry_and_decodability_table(setup, tmp_path):
    editor, tok, data = setup
    sub = fit_positional_subspace(editor, tok, data["train"], 2, 1, [0, 1, 2, 3], n_dims=3)
    outs, _ = head_final_outputs(editor, tok, data["train"], 2, 1)
    c = outs @ sub.V
    assert torch.allclose(sub.coords, (c - sub.mean) @ sub.axes, atol=1e-5)
    assert torch.allclose(sub.axes.T @ sub.axes, torch.eye(3), atol=1e-5)
    assert 0 < float(sub.explained.sum()) <= 1 + 1e-6
    assert list(sub.decodability.list_length) == [3, 5] and list(sub.decodability.chance) == [1 / 3, 1 / 5]
    assert plot_subspace(sub, tmp_path / "scatter.png") and (tmp_path / "scatter.png").stat().st_size > 5000
    with pytest.raises(InvalidArgumentError, match="n_dims"):
        fit_positional_subspace(editor, tok, data["train"], 2, 1, [0, 1], n_dims=3)


def test_nearest_centroid_on_separable_and_random_data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    x = y[:, None].float() * 10 + torch.randn(40, 2, generator=g)
    assert _nearest_centroid_accuracy(x, y) == 1.0
    assert _nearest_centroid_accuracy(torch.randn(400, 2, generator=g), torch.arange(400) % 4) < 0.4


def test_steering_to_a_prompts_own_point_changes_nothing(setup):
    editor, tok, data = setup
    sub = fit_positional_subspace(editor, tok, data["train"], 2, 1, [0, 1], n_dims=2)
    row = data["train"][0]
    ids = torch.tensor([tok(row["prompt"])["input_ids"]])
    with torch.no_grad():
        base = editor.model(ids).logits
        with editor.steer(2, 1, component=[0, 1], alpha=0.0, add=sub.coefficients(sub.coords[0]).tolist(), positions="last"):
            same = editor.model(ids).logits
    assert torch.allclose(base, same, atol=1e-4)


def test_traversal_records_every_point_and_leaves_no_hook(setup, tmp_path):
    editor, tok, data = setup
    sub = fit_positional_subspace(editor, tok, data["train"], 1, 2, [0, 1, 2], n_dims=2)
    rows = data["dev"].filter(lambda r: r["list_length"] == 5).to_list()[:4]
    # transformers installs its own output-capturing hooks on blocks; ours live on the output projections
    hooks = lambda: sum(len(editor.layout.module(l, editor.layout.spec.o)._forward_hooks) for l in range(3))  # noqa: E731
    before = hooks()
    frame = traverse(editor, tok, rows, sub, mover=(2, 0), grid=3, batch_size=2)
    assert len(frame) == 9 * 4 and frame.predicted_index.between(0, 4).all() and frame.attended_index.between(0, 4).all()
    assert hooks() == before  # every steering hook removed
    assert plot_traversal(frame, tmp_path / "t.png", title="t")


def test_steering_search_picks_on_dev(setup):
    editor, tok, data = setup
    res = search_steering(editor, tok, data["dev"], data["test"], 2, 1, [0], alphas=(0.0, 4.0), batch_size=8)
    assert res.alpha in (0.0, 1.0, 4.0) and len(res.trials) == 3
    best = res.trials.sort_values(["dev_accuracy", "dev_logit_diff"]).iloc[-1]
    assert best.alpha == res.alpha
    assert len(res.test_base.records) == len(data["test"])
