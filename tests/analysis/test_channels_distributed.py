"""The channel map split over processes equals the single-process map: sender blocks, exact top-k merge,
an in-process simulation of 2 and 3 ranks, and a real 2-process ``accelerate launch`` (gloo on CPU) that
also runs ``th-edit analyze``."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from launching import launch_two, simulated_ranks
from tiny_models import make_model

import th_edit.analysis.channel_stream as channels
from th_edit import ChannelEditor
from th_edit.analysis.channel_shards import canonical_top, merge_parts, sender_blocks
from th_edit.app.cli import main as cli_main
from th_edit.utils.sharding import balanced_blocks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _channel_map_launch import SETTINGS, dump  # noqa: E402


def test_balanced_contiguous_blocks():
    assert balanced_blocks([3, 3, 1, 1, 1, 1], 2) == [(0, 2), (2, 6)]
    assert balanced_blocks([1, 1], 3) == [(0, 1), (1, 1), (1, 2)]
    assert balanced_blocks([0, 0, 0, 0], 2) == [(0, 2), (2, 4)]
    # senders of layers 0, 0, 1, 1, 2 against receivers of layers 1, 2: work 2, 2, 1, 1, 0
    assert sender_blocks([0, 0, 1, 1, 2], [1, 2], 2) == [(0, 2), (2, 5)]
    for parts in (1, 2, 5, 9):
        blocks = balanced_blocks(list(range(7)), parts)
        assert blocks[0][0] == 0 and blocks[-1][1] == 7 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_canonical_top_breaks_ties_by_row_then_col_whatever_the_input_order():
    share = torch.tensor([0.5, 0.75, 0.5, 0.5, 0.125])
    row, col = torch.tensor([3, 0, 1, 1, 2]), torch.tensor([0, 0, 7, 2, 0])
    v, r, c = canonical_top(share, row, col, 3)
    assert v.tolist() == [0.75, 0.5, 0.5] and r.tolist() == [0, 1, 1] and c.tolist() == [0, 2, 7]
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert all(torch.equal(a, b) for a, b in zip(canonical_top(share[perm], row[perm], col[perm], 3), (v, r, c)))
    head = torch.ones(1, 2)
    merged = merge_parts([(head, torch.ones(1, 1, 2), v[:1], r[:1], c[:1]),
                          (2 * head, torch.ones(1, 1, 2), v[1:], r[1:], c[1:])], 2)
    assert merged[0].tolist() == [[1, 1], [2, 2]] and merged[3].tolist() == [0, 1]


def _simulated(editor, world, monkeypatch, **settings):
    """Every rank of a ``world``-process channel map, computed in this process (see
    :func:`launching.simulated_ranks`); each rerun must gather the same work it recorded."""
    def same_work(part, recorded):
        assert torch.equal(part[1], recorded[1])

    return simulated_ranks(channels, world, monkeypatch, lambda: editor.channel_map(progress=False, **settings),
                           same_work=same_work)


def assert_same_map(a: dict, b: dict, exact_scores: bool = False):
    """Head and component scores allclose (fp32) or equal, the kept pair lists identical."""
    for mode in "qkv":
        for key in ("head", "component", "share", "cos"):
            if exact_scores:
                assert torch.equal(a[mode][key], b[mode][key]), (mode, key)
            else:
                torch.testing.assert_close(a[mode][key], b[mode][key], rtol=1e-5, atol=1e-7)
        assert a[mode]["row"].tolist() == b[mode]["row"].tolist() and a[mode]["col"].tolist() == b[mode]["col"].tolist()
    assert a["baselines"] == b["baselines"]


@pytest.mark.parametrize("arch,world,settings", [
    ("llama", 2, dict(keep_top=25)),
    ("gpt2", 3, dict(keep_top=200, memory_limit_mb=0.002)),
    ("llama", 5, dict(keep_top=7, memory_limit_mb=0.001)),  # more ranks than sender layers: empty blocks
])
def test_simulated_ranks_each_return_the_single_process_map(arch, world, settings, monkeypatch):
    editor = ChannelEditor(make_model(arch))
    settings = dict(baseline_samples=2, **settings)
    single = editor.channel_map(progress=False, **settings)
    assert single.meta["processes"] == 1 and single.meta["sender_blocks"] == [(0, len(single.senders))]
    for cmap in _simulated(editor, world, monkeypatch, **settings):
        assert cmap.meta["processes"] == world and len(cmap.meta["sender_blocks"]) == world
        assert cmap.meta["config"] == single.meta["config"]
        assert_same_map(dump(cmap), dump(single))
        pd.testing.assert_frame_equal(cmap.to_table("head"), single.to_table("head"), rtol=1e-5)


def test_two_accelerate_processes_return_the_single_process_map(tiny_model_dir, tmp_path, capsys):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): both processes hold the full map,
    equal to this process's; `th-edit analyze` under the launch writes the same tables, once."""
    from transformers import AutoModelForCausalLM

    model_dir = str(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    single = dump(ChannelEditor(model).channel_map(progress=False, **SETTINGS))
    assert cli_main(["analyze", model_dir, "--out", str(tmp_path / "one"), "--quiet", "--top", "5",
                     "--memory-limit-mb", "0.002"]) == 0
    launch_two(HERE / "_channel_map_launch.py", model_dir, str(tmp_path), timeout=400)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for got in ranks:
        assert got["meta"]["processes"] == 2
        assert_same_map(got, single)
    assert_same_map(ranks[0], ranks[1], exact_scores=True)  # every process returns the same map
    for name in ("channels_pairs.csv", "channels_heads.csv", "head_roles.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "analyze" / name), pd.read_csv(tmp_path / "one" / name),
                                      rtol=1e-5)
    assert (tmp_path / "analyze" / "heatmap.png").is_file()
    # weights only (th_edit.analysis.weights_only): the same split, the same map, bit for bit
    for r in (0, 1):
        got = torch.load(tmp_path / f"weights_only_rank{r}.pt")
        assert got["meta"]["processes"] == 2 and got["meta"]["sender_blocks"] == ranks[r]["meta"]["sender_blocks"]
        assert_same_map(got, ranks[r], exact_scores=True)
    for name in ("channels_pairs.csv", "channels_heads.csv"):
        assert (tmp_path / "analyze_weights_only" / name).read_bytes() == (tmp_path / "analyze" / name).read_bytes()


def test_bfloat16_gemms_stay_close_to_float32_and_bad_dtypes_are_refused():
    from th_edit import InvalidArgumentError

    editor = ChannelEditor(make_model("llama"))
    full = editor.channel_map(progress=False, baseline_samples=0, keep_top=20)
    half = editor.channel_map(progress=False, baseline_samples=0, keep_top=20, matmul_dtype="bfloat16")
    assert half.meta["config"]["matmul_dtype"] == "bfloat16" and half.modes["q"].head.dtype == torch.float32
    for mode in "qkv":
        torch.testing.assert_close(half.head_scores(mode), full.head_scores(mode), rtol=3e-2, atol=1e-3)
    with pytest.raises(InvalidArgumentError, match="matmul_dtype"):
        editor.channel_map(progress=False, matmul_dtype="float16")
