"""The layer cache (th_edit.core.layer_cache) reproduces a plain forward pass on every supported layout."""

import pytest
import torch

from th_edit import ChannelEditor
from th_edit.errors import InvalidArgumentError
from th_edit.core.layer_cache import LayerCache, hidden_entering, run_from
from tiny_models import ARCHS, input_ids, make_model


def _inputs():
    ids = input_ids(batch=3, seq=12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_run_from_matches_full_forward(arch):
    model = make_model(arch, seed=3)
    layout = ChannelEditor(model).layout
    inputs = _inputs()
    with torch.no_grad():
        full = model(**inputs).logits
        for layer in range(layout.n_layers):
            hidden = hidden_entering(model, layout, layer, **inputs)
            got = run_from(model, layout, layer, hidden, **inputs).logits
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # the no-ops are gone afterwards
    assert all("forward" not in b.__dict__ for b in layout.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, full, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_layer_cache_bound_and_gradients(arch):
    model = make_model(arch, seed=5)
    layout = ChannelEditor(model).layout
    inputs = _inputs()
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=1).logits
    for max_bytes in (1 << 30, 0):  # cached, and recomputed because it does not fit
        cache = LayerCache(model, layout, first_layer=2, max_bytes=max_bytes)
        i = cache.add(**inputs)
        assert (cache.cached_bytes > 0) == (max_bytes > 0)
        with torch.no_grad():
            got = cache.forward(i, logits_to_keep=1).logits
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # gradient reaches a parameter of the first run layer, and no layer below it is part of the graph
    w = layout.blocks[2].get_submodule(layout.spec.o).weight
    w.requires_grad_(True)
    try:
        cache.forward(i, logits_to_keep=1).logits.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()
        assert layout.blocks[0].get_submodule(layout.spec.o).weight.grad is None
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_bad_layer():
    model = make_model("llama")
    layout = ChannelEditor(model).layout
    with pytest.raises(InvalidArgumentError, match="out of range"):
        LayerCache(model, layout, first_layer=99)
