"""Head roles: scores on hand-built attention patterns and a hand-built GPT-2 whose heads are a known
previous-token and duplicate-token head; mover/inhibition plumbing against plain transformers outputs."""

import pytest
import torch
from tiny_models import laundry_model
from transformers import GPT2Config, GPT2LMHeadModel

from th_edit import ChannelEditor
from th_edit.analysis.roles import (
    _norm_linear,
    inhibition_score,
    mover_scores,
    receiver_gap,
    repeated_tokens,
    sequence_roles,
    sequence_scores,
)
from th_edit.data import laundry_list
from th_edit.tasks.batching import PromptBatch, eager_attention, item_positions


def _pattern(T, pairs):
    A = torch.zeros(1, 1, T, T)
    for i, j in pairs:
        A[0, 0, i, j] = 1.0
    return A


def test_sequence_scores_on_hand_built_patterns():
    length, offset = 4, 1
    T = offset + 2 * length
    prev = _pattern(T, [(i, i - 1) for i in range(1, T)])
    dup = _pattern(T, [(i, i - length) for i in range(offset + length, T)])
    ind = _pattern(T, [(i, i - length + 1) for i in range(offset + length, T)])
    s = sequence_scores([torch.cat([prev, dup, ind], 1)], length=length, offset=offset)
    assert s["previous_token"].tolist() == [[1.0, 0.0, 0.0]]
    assert s["duplicate_token"].tolist() == [[0.0, 1.0, 0.0]]
    assert s["induction"].tolist() == [[0.0, 0.0, 1.0]]


def _hand_built_gpt2():
    """Head 0 attends to the previous position; head 1 to earlier copies of its own token (not itself)."""
    cfg = GPT2Config(n_embd=128, n_head=2, n_layer=1, n_positions=32, vocab_size=30, bos_token_id=1,
                     eos_token_id=2, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        t = model.transformer
        t.wpe.weight[torch.arange(32), torch.arange(32)] = 10.0  # position p -> dim p
        t.wte.weight[torch.arange(30), 64 + torch.arange(30)] = 10.0  # token t -> dim 64 + t
        W = t.h[0].attn.c_attn.weight  # Conv1D [in 128, out 3 * 128]: Q | K | V; head h = columns h*64..
        Q, K = W[:, :128], W[:, 128:256]
        for p in range(32):
            if p + 1 < 32:  # head 0: query at i carries code i, key at j carries code j + 1 -> j = i - 1
                Q[p, p], K[p, p + 1] = 3.0, 3.0
            Q[p, 64 + 30 + p], K[p, 64 + 30 + p] = 3.0, -3.0  # head 1: never attend to yourself
        for tok in range(30):  # head 1: attend to positions holding the same token
            Q[64 + tok, 64 + tok], K[64 + tok, 64 + tok] = 3.0, 3.0
    return model


def test_hand_built_previous_and_duplicate_token_heads_are_found():
    model = _hand_built_gpt2()
    roles = sequence_roles(model, n=8, length=10, seed=3)
    prev, dup = roles["previous_token"][0], roles["duplicate_token"][0]
    assert prev[0] > 0.95 and prev[1] < 0.3
    # head 1 attends to earlier positions holding its token (shared when x repeats a token)
    assert dup[1] > 0.7 and dup[0] < 0.05 and prev[1] < 0.3
    assert roles["induction"][0].max() < 0.3


def test_sequence_roles_match_plain_output_attentions():
    model, _ = laundry_model("llama", seed=1)
    roles = sequence_roles(model, n=4, length=6, seed=2, batch_size=3)
    ids, offset = repeated_tokens(model.config.vocab_size, n=4, length=6, seed=2, bos_token_id=model.config.bos_token_id)
    with torch.no_grad():
        atts = model(ids, output_attentions=True).attentions
    for l, a in enumerate(atts):
        second = torch.arange(offset + 6, ids.shape[1])
        expected = a[:, :, second, second - 6].mean(dim=(0, 2))
        assert torch.allclose(roles["duplicate_token"][l], expected, atol=1e-6)


def test_item_positions_point_at_the_items():
    _, tok = laundry_model("llama")
    row = laundry_list(tok, lengths=[5], n_per_length=4)["test"][0]
    ids = tok(row["prompt"])["input_ids"]
    pos = item_positions(tok, row["prompt"], row["items"])
    assert [tok.decode([ids[p]]) for p in pos] == row["items"]
    assert pos == sorted(pos)  # first mentions are in list order


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_frozen_scale_final_norm_reproduces_the_logits(arch):
    model, tok = laundry_model(arch, seed=2)
    editor = ChannelEditor(model)
    captured = {}
    handle = model.get_submodule(editor.layout.spec.final_norm).register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0].detach()))
    ids = torch.tensor([tok("Mary bought milk and eggs.")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    handle.remove()
    x = captured["x"][0, -1:]
    norm = _norm_linear(editor.layout.final_norm_params(), x)
    bias = getattr(model.get_submodule(editor.layout.spec.final_norm), "bias", None)
    y = norm(x) + (0 if bias is None else bias.detach())
    assert torch.allclose(y @ model.get_output_embeddings().weight.T, logits, atol=1e-4)


def test_mover_scores_match_an_independent_single_prompt_computation():
    model, tok = laundry_model("gpt2", seed=5)
    editor = ChannelEditor(model)
    data = laundry_list(tok, lengths=[4], n_per_length=8, seed=1)["test"]
    frame = mover_scores(editor, tok, data, batch_size=3, progress=False)
    # independent: per prompt, plain forward with output_attentions, items located by decoding tokens
    L, H = editor.n_layers, editor.n_heads
    attn = torch.zeros(L, H)
    for row in data:
        ids = tok(row["prompt"])["input_ids"]
        words = [tok.decode([i]) for i in ids]
        pos = words.index(row["target"])
        with torch.no_grad():
            atts = model(torch.tensor([ids]), output_attentions=True).attentions
        for l in range(L):
            attn[l] += atts[l][0, :, -1, pos]
    attn /= len(data)
    got = frame.set_index(["layer", "head"])["attn_target"]
    for l in range(L):
        for h in range(H):
            assert got[(l, h)] == pytest.approx(float(attn[l, h]), abs=1e-5)
    assert frame.mover_score.is_monotonic_decreasing


def test_split_attention_on_a_hand_built_pattern():
    _, tok = laundry_model("llama")
    rows = laundry_list(tok, lengths=[3], n_per_length=4)["test"].to_list()[:1]
    pb = PromptBatch(tok, rows)
    T = pb.input_ids.shape[1]
    att = torch.zeros(1, 2, T, T)
    pos, t = pb.positions[0], pb.targets[0]
    att[0, 0, T - 1, pos[t]] = 0.6  # head 0 looks at the answer
    others = [p for i, p in enumerate(pos) if i != t]
    att[0, 1, T - 1, others[0]] = 0.8  # head 1 at one item to suppress
    tgt, oth = pb.split_attention(att)
    assert tgt.tolist() == [[pytest.approx(0.6), 0.0]]
    assert oth.tolist() == [[0.0, pytest.approx(0.4)]]


def test_inhibition_score_is_the_gap_change_and_leaves_the_model_bit_identical():
    model, tok = laundry_model("llama", seed=7)
    editor = ChannelEditor(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = laundry_list(tok, lengths=[3, 5], n_per_length=8, seed=0)["test"].to_list()
    batches = [PromptBatch(tok, rows[:3]), PromptBatch(tok, rows[3:])]
    receivers = [(2, 0), (2, 3)]
    score = inhibition_score(editor, batches, (1, 2, 0), receivers)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not editor.edits
    base = receiver_gap(model, batches, receivers)
    editor.scale_component(1, 2, "ov", 0, 0.0)
    removed = receiver_gap(model, batches, receivers)
    editor.undo()
    assert torch.allclose(score, removed - base) and score.abs().max() > 0


def test_eager_attention_is_switched_on_and_restored():
    model, _ = laundry_model("llama")
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "llama", "gemma"])
def test_head_outputs_through_the_post_attention_norm_add_up_to_what_the_block_writes(arch):
    """Gemma2/3 normalise the attention output before the residual add; the frozen-scale linearisation of
    that norm, applied to each head's W_O z and summed, is exactly the norm's output. Llama and Gemma 1
    have no such norm (their ``post_attention_layernorm`` is the pre-MLP norm)."""
    model, tok = laundry_model(arch, seed=4)
    editor = ChannelEditor(model)
    layout, layer = editor.layout, 1
    params = layout.post_attn_norm_params(layer)
    if arch in ("llama", "gemma"):
        assert params is None
        return
    got = {}
    block = layout.blocks[layer]
    hooks = [layout.out_module(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0].detach())),
             layout.out_module(layer).register_forward_hook(lambda m, a, o: got.__setitem__("o", o.detach())),
             block.post_attention_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__("written", o.detach()))]
    with torch.no_grad():
        model(torch.tensor([tok("Mary bought milk and eggs.")["input_ids"]]))
    for h in hooks:
        h.remove()
    z = got["z"][0].view(-1, editor.n_heads, editor.d_head)  # [T, H, dh]
    heads = torch.stack([z[:, h] @ layout.out_weight(layer, h).detach() for h in range(editor.n_heads)], 1)  # [T, H, d]
    lin = _norm_linear(params, got["o"][0])
    assert torch.allclose(lin(heads).sum(1), got["written"][0], atol=1e-5)
