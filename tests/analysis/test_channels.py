"""The channel map against a dense, independent implementation, and a planted channel."""

import pytest
import torch
from reference import dense_circuit
from tiny_models import make_model

from th_edit import ChannelEditor, InvalidArgumentError


def _dense_scores(model, arch, sender, receiver, mode):
    """Head and per-component scores and the top pair share from materialised d x d matrices."""
    A = dense_circuit(model, arch, *sender, "ov", True)
    if mode == "v":
        B = dense_circuit(model, arch, *receiver, "ov", True)
    else:
        B = dense_circuit(model, arch, *receiver, "qk", True)
        B = B if mode == "q" else B.T
    fro = torch.linalg.matrix_norm
    head = fro(A @ B) / (fro(A) * fro(B))
    Ua, Sa, Vha = torch.linalg.svd(A)
    Ub, Sb, Vhb = torch.linalg.svd(B)
    comps, shares = [], []
    rank = int((Sa > Sa[0] * 1e-9).sum())
    rank_b = int((Sb > Sb[0] * 1e-9).sum())
    for i in range(rank):
        Ai = Sa[i] * torch.outer(Ua[:, i], Vha[i])
        comps.append(fro(Ai @ B) / (fro(Ai) * fro(B)))
        for j in range(rank_b):
            Bj = Sb[j] * torch.outer(Ub[:, j], Vhb[j])
            shares.append(fro(Ai @ Bj) / (fro(A) * fro(B)))
    return head, torch.stack(comps), torch.stack(shares).max()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
def test_channel_map_matches_dense_formula(arch):
    model = make_model(arch)
    editor = ChannelEditor(model)
    cmap = editor.channel_map(progress=False, baseline_samples=4, keep_top=100000)
    for sender, receiver in (((0, 1), (2, 3)), ((1, 0), (2, 1)), ((0, 3), (1, 2))):
        for mode in "qkv":
            head, comps, top_share = _dense_scores(model, arch, sender, receiver, mode)
            assert cmap.head_scores(mode)[(*sender, *receiver)].item() == pytest.approx(head.item(), rel=1e-4)
            mine = cmap.component_scores(mode, sender, receiver)
            torch.testing.assert_close(mine[: len(comps)].double(), comps, rtol=1e-4, atol=1e-6)
            table = cmap.top_channels(mode, k=100000)
            sel = table[(table.sender_layer == sender[0]) & (table.sender_head == sender[1])
                        & (table.receiver_layer == receiver[0]) & (table.receiver_head == receiver[1])]
            assert sel.score.max() == pytest.approx(top_share.item(), rel=1e-4)
            one = editor.composition(sender, receiver, mode)
            assert one["head"] == pytest.approx(head.item(), rel=1e-4)
            assert one["share"].max().item() == pytest.approx(top_share.item(), rel=1e-4)
    hs = cmap.head_scores("q")
    for ls in range(3):
        for lr in range(ls + 1):
            assert (hs[ls, :, lr, :] == 0).all()


def test_streaming_with_a_tiny_memory_bound_gives_the_same_map():
    editor = ChannelEditor(make_model("llama"))
    big = editor.channel_map(progress=False, baseline_samples=0, keep_top=50)
    small = editor.channel_map(progress=False, baseline_samples=0, keep_top=50, memory_limit_mb=0.001)
    for mode in "qkv":
        torch.testing.assert_close(small.head_scores(mode), big.head_scores(mode), rtol=1e-5, atol=1e-7)
        a, b = small.top_channels(mode, 50), big.top_channels(mode, 50)
        assert a.score.tolist() == pytest.approx(b.score.tolist(), rel=1e-5)
        assert (a[["sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head",
                   "receiver_component"]].values == b[["sender_layer", "sender_head", "sender_component",
                   "receiver_layer", "receiver_head", "receiver_component"]].values).all()


def test_restricted_heads_and_layers():
    editor = ChannelEditor(make_model("gpt2"))
    full = editor.channel_map(progress=False, baseline_samples=0)
    part = editor.channel_map(modes=("k",), senders=[(0, 1), (1, 2)], receivers=[(2, 0)], progress=False,
                              baseline_samples=0)
    assert set(part.modes) == {"k"}
    hs = part.head_scores("k")
    assert hs[0, 1, 2, 0] == pytest.approx(full.head_scores("k")[0, 1, 2, 0].item(), rel=1e-5)
    assert hs[1, 2, 2, 0] == pytest.approx(full.head_scores("k")[1, 2, 2, 0].item(), rel=1e-5)
    assert int((hs != 0).sum()) == 2
    with pytest.raises(InvalidArgumentError, match="mode='q' was not computed"):
        part.head_scores("q")
    with pytest.raises(InvalidArgumentError, match="not before receiver"):
        editor.composition((2, 0), (1, 0), "q")


def test_planted_channel_is_ranked_first_in_its_mode_only():
    """Rotate the sender's top OV write direction and the receiver's top query read direction onto one
    shared unit vector w, keeping every singular value: a rank-1 Q-channel in otherwise random weights."""
    model = make_model("llama", hidden_size=128, head_dim=32, num_key_value_heads=2)
    editor = ChannelEditor(model)
    L = editor.layout
    sender, receiver = (0, 1), (2, 3)
    _, s, v = editor.svd(*sender, "ov")
    u_r, t, b_r = editor.svd(*receiver, "qk")
    basis, _ = torch.linalg.qr(torch.cat([v[:, 1:], u_r[:, 1:]], dim=1).double())
    w = torch.randn(128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = w - basis @ (basis.T @ w)
    w = (w / w.norm()).float()
    W_V_read, _ = editor.circuit_factors(*sender, "ov")
    _, W_K_read = editor.circuit_factors(*receiver, "qk")
    gain = L.norm_params(receiver[0])[1].float()
    with torch.no_grad():
        u_s = editor.svd(*sender, "ov").U[:, 0]
        L.out_weight(*sender).add_(torch.outer(torch.linalg.pinv(W_V_read) @ u_s * s[0], w - v[:, 0]))
        c = torch.linalg.pinv(W_K_read) @ b_r[:, 0] * t[0]
        L.proj_weight(*receiver, "q").add_(torch.outer((w - u_r[:, 0]) / gain, c))
    torch.testing.assert_close(editor.svd(*sender, "ov").S, s, rtol=1e-4, atol=1e-5)  # spectrum unchanged
    cmap = editor.channel_map(progress=False, baseline_samples=8)
    top = cmap.top_channels("q", k=1).iloc[0]
    assert (top.sender_layer, top.sender_head, top.sender_component) == (0, 1, 0)
    assert (top.receiver_layer, top.receiver_head, top.receiver_component) == (2, 3, 0)
    assert abs(top.cosine) > 0.999 and top.score > 5 * top.baseline_score
    for mode in "kv":
        other = cmap.top_channels(mode, k=1).iloc[0]
        assert (other.sender_layer, other.sender_head, other.receiver_layer, other.receiver_head) != (0, 1, 2, 3)
        pair = editor.composition(sender, receiver, mode)
        assert pair["cosine"][0].abs().max() < 4 / 128 ** 0.5  # chance level in the other modes
    z = cmap.head_scores("q", baseline="zscore")
    assert z[0, 1, 2, 3] == z.max()


def test_tables_and_exports(tmp_path):
    import pandas as pd

    cmap = ChannelEditor(make_model("qwen2")).channel_map(progress=False, baseline_samples=4, keep_top=30)
    table = cmap.top_channels("k", k=20)
    required = ["mode", "sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head",
                "receiver_component", "score", "sender_singular_value", "receiver_singular_value", "baseline_score"]
    assert list(table.columns[: len(required) - 3]) == required[:-3] and set(required) <= set(table.columns)
    assert len(table) == 20 and table.score.is_monotonic_decreasing
    assert (table.sender_layer < table.receiver_layer).all()
    cmap.to_csv(tmp_path / "pairs.csv")
    cmap.to_parquet(tmp_path / "heads.parquet", level="head")
    assert len(pd.read_csv(tmp_path / "pairs.csv")) == 90
    heads = pd.read_parquet(tmp_path / "heads.parquet")
    assert len(heads) == 3 * 16 * 3  # (layer pairs 0->1, 0->2, 1->2) x 4 x 4 heads x 3 modes
    comp = cmap.to_table("component")
    row = comp[(comp["mode"] == "v") & (comp.sender_layer == 0) & (comp.sender_head == 2) & (comp.receiver_layer == 1)
               & (comp.receiver_head == 3) & (comp.sender_component == 5)]
    assert row.score.item() == pytest.approx(cmap.component_scores("v", (0, 2), (1, 3))[5].item())


def test_plots_are_written(tmp_path):
    from th_edit.app.plots import plot_component_profile, plot_receiver_heatmap

    cmap = ChannelEditor(make_model("gpt2")).channel_map(progress=False, baseline_samples=4)
    heat = plot_receiver_heatmap(cmap, "q", (2, 1), tmp_path / "heat.png", baseline="zscore")
    prof = plot_component_profile(cmap, "k", (0, 3), [(1, 0), (2, 2)], tmp_path / "profile.png")
    for path in (heat, prof):
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
