"""component_attribution against central differences of plain forward passes, on three architectures."""

import math

import pytest
import torch
from tiny_models import laundry_model

from th_edit import ChannelEditor
from th_edit.analysis.attribution import answer_margins, component_attribution
from th_edit.data import laundry_list
from th_edit.tasks.batching import prompt_batches


def _mean_margin(model, batches) -> float:
    """Mean answer margin with full logits, batch by batch."""
    total, n = 0.0, 0
    with torch.no_grad():
        for pb in batches:
            logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
            total += float(answer_margins(logits, pb, pb.input_ids.shape[1]).sum())
            n += len(pb)
    return total / n


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_attribution_equals_central_differences(arch):
    model, tok = laundry_model(arch, seed=3, num_hidden_layers=3)
    editor = ChannelEditor(model, tokenizer=tok)
    batches = prompt_batches(tok, laundry_list(tok, lengths=[3, 4], n_per_length=8, seed=0)["train"], 4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    grads = component_attribution(editor, batches)
    assert grads.shape == (editor.n_layers, editor.n_heads, editor.d_head)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    eps = 1e-2
    for flat in torch.topk(grads.abs().flatten(), 3).indices.tolist():
        layer, rest = divmod(flat, editor.n_heads * editor.d_head)
        head, comp = divmod(rest, editor.d_head)
        ends = []
        for sign in (1, -1):
            editor.scale_component(layer, head, "ov", comp, math.exp(sign * eps))
            ends.append(_mean_margin(model, batches))
            editor.undo()
        assert float(grads[layer, head, comp]) == pytest.approx((ends[0] - ends[1]) / (2 * eps), rel=2e-2, abs=1e-4)


def test_answer_margins_reads_kept_logits_only():
    """With only the last T' positions' logits kept, the margins equal those from full logits."""
    model, tok = laundry_model("llama", seed=3, num_hidden_layers=2)
    pb = prompt_batches(tok, laundry_list(tok, lengths=[3, 5], n_per_length=4, seed=1)["train"], 4, 4)[0]
    with torch.no_grad():
        logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
    width = pb.input_ids.shape[1]
    keep = width - int(pb.last.min())
    assert torch.allclose(answer_margins(logits[:, -keep:], pb, width), answer_margins(logits, pb, width))
