"""The layer cache (th_edit.core.layer_cache) reproduces a plain forward pass on every supported layout."""

import pytest
import torch
from tiny_models import ARCHS, input_ids, make_model

from th_edit import ChannelEditor
from th_edit.core.layer_cache import LayerCache, hidden_entering, run_from
from th_edit.errors import InvalidArgumentError


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
        assert cache.cached_bytes == 0  # computed on first use
        with torch.no_grad():
            got = cache.forward(i, logits_to_keep=1).logits
        assert (cache.cached_bytes > 0) == (max_bytes > 0)
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


# ----- reuse_lower_layers -----------------------------------------------------------------------
import inspect  # noqa: E402

from th_edit.core.layer_cache import reuse_lower_layers  # noqa: E402
from th_edit.tasks.batching import accepts_logits_to_keep, eager_attention  # noqa: E402


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_lower_layers_matches_full_forward_under_edits(arch):
    """Edits in layers >= first: every pass inside the block equals a plain forward pass of the edited model."""
    model = make_model(arch, seed=6)
    editor = ChannelEditor(model)
    inputs = _inputs()
    first = editor.n_layers - 1
    with reuse_lower_layers(model, editor.layout, first) as reuse, torch.no_grad():
        got = [model(**inputs).logits]
        editor.scale_component(first, 0, "ov", 0, 3.0)
        got.append(model(**inputs).logits)
        editor.scale_component(first, 1 % editor.n_heads, "qk", 1, 0.0)
        got.append(model(**inputs, output_attentions=False).logits)
        with eager_attention(model):
            model(**inputs, output_attentions=True)  # a miss: lower attentions not yet kept
            atts_again = model(**inputs, output_attentions=True).attentions
    assert (reuse.misses, reuse.hits) == (2, 3)
    with torch.no_grad(), eager_attention(model):
        want_atts = model(**inputs, output_attentions=True).attentions
    assert len(atts_again) == len(want_atts) == editor.n_layers
    for got_a, want_a in zip(atts_again, want_atts):
        torch.testing.assert_close(got_a, want_a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want_last = model(**inputs).logits
        editor.reset()
        want_first = model(**inputs).logits
    torch.testing.assert_close(got[0], want_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want_last, rtol=1e-5, atol=1e-5)
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in editor.layout.blocks)
    with reuse_lower_layers(model, editor.layout, first):  # the wrapper keeps the signature callers probe
        assert accepts_logits_to_keep(model) == ("logits_to_keep" in inspect.signature(type(model).forward).parameters)


def test_reuse_forgets_states_when_a_lower_layer_changes():
    model = make_model("llama", seed=7)
    editor = ChannelEditor(model)
    inputs = _inputs()
    with reuse_lower_layers(model, editor.layout, 1) as reuse, torch.no_grad():
        model(**inputs)
        editor.scale_component(0, 0, "ov", 0, 4.0)  # below the first reused layer: an in-place write
        got = model(**inputs).logits
        handle = editor.layout.out_module(0).register_forward_pre_hook(lambda m, a: (a[0] * 0,))
        hooked = model(**inputs).logits  # a hook below: the remembered state is forgotten again
        handle.remove()
    assert reuse.misses == 3 and reuse.hits == 0
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, got)
    with reuse_lower_layers(model, editor.layout, 1) as reuse, torch.no_grad():
        model(**inputs)
        with reuse.paused():  # a pause runs in full and does not hide a lower change from what follows
            editor.scale_component(0, 1, "ov", 0, 0.0)
            paused = model(**inputs).logits
        after = model(**inputs).logits
    assert (reuse.misses, reuse.hits) == (2, 0)
    torch.testing.assert_close(after, paused, rtol=1e-5, atol=1e-5)


def test_reuse_bypasses_what_it_cannot_key_and_respects_the_bound():
    model = make_model("gpt2", seed=8)
    layout = ChannelEditor(model).layout
    inputs = _inputs()
    with torch.no_grad():
        full = model(**inputs).logits
    with reuse_lower_layers(model, layout, 1, max_bytes=0) as reuse, torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(**inputs).logits, full, rtol=1e-5, atol=1e-5)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert (reuse.misses, reuse.hits, reuse.bypassed, reuse.cached_bytes) == (2, 0, 1, 0)
    # gradients needed below the first layer: run in full, so they reach layer 0
    w = layout.blocks[0].get_submodule(layout.spec.o).weight
    w.requires_grad_(True)
    try:
        with reuse_lower_layers(model, layout, 1) as reuse:
            model(**inputs).logits.sum().backward()
        assert reuse.bypassed == 1 and w.grad is not None
    finally:
        w.requires_grad_(False)
        w.grad = None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_advance_walks_up_and_matches_fresh_states(arch):
    model = make_model(arch, seed=9)
    layout = ChannelEditor(model).layout
    inputs = _inputs()
    cache = LayerCache(model, layout, first_layer=0)
    i = cache.add(**inputs)
    with torch.no_grad():
        full = model(**inputs).logits
        for layer in range(1, layout.n_layers):
            cache.advance(layer)
            torch.testing.assert_close(cache.state(i), hidden_entering(model, layout, layer, **inputs), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.forward(i).logits, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="below"):
        cache.advance(0)
