"""Weights-only analysis: a tiny sharded safetensors checkpoint of every architecture, read from disk without
loading the model, gives exactly the in-memory results (SVDs, svd_all, the channel map at every level and
mode, baselines, top pairs, tables); nothing but attention and norm tensors is read; broken checkpoints fail
with typed errors naming the file; a Hub id downloads only the shards holding attention weights."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from launching import simulated_ranks
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, make_model

import th_edit.analysis.weights_only as weights_only
from th_edit import (
    AnalysisOnlyError,
    ChannelEditor,
    ModelFileError,
    QuantizedModelError,
    UnsupportedModelError,
    channel_map_from_checkpoint,
)
from th_edit.app.cli import main as cli_main
from th_edit.core.checkpoint_layout import INDEX_FILE, CheckpointLayout

SETTINGS = dict(baseline_samples=4, keep_top=60, memory_limit_mb=0.002, progress=False)
#: substrings of tensor names a weights-only analysis must never read
NOT_ATTENTION = ("mlp", "embed", "lm_head", "wte", "wpe", "fc1", "fc2", "fc_in", "fc_out", "final_layer_norm.",
                 "dense_4h", "dense_h_to_4h", "feedforward")


def _save(model, folder: Path, shard="20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    assert (folder / INDEX_FILE).is_file()
    return folder


def assert_maps_equal(a, b):
    """Every stored tensor of two channel maps bit-equal, and their tables equal."""
    assert a.senders == b.senders and a.receivers == b.receivers and a.baselines == b.baselines
    assert torch.equal(a.sender_S, b.sender_S) and list(a.modes) == list(b.modes)
    for mode in a.modes:
        for f in ("head", "component", "top_share", "top_row", "top_col", "top_cos", "receiver_S"):
            assert torch.equal(getattr(a.modes[mode], f), getattr(b.modes[mode], f)), (mode, f)
        for baseline in (None, "subtract", "zscore"):
            assert torch.equal(a.head_scores(mode, baseline=baseline), b.head_scores(mode, baseline=baseline))
    for level in ("pair", "component", "head"):
        pd.testing.assert_frame_equal(a.to_table(level), b.to_table(level), check_exact=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_from_disk_equals_in_memory(arch, tmp_path):
    model = make_model(arch, num_hidden_layers=4)
    editor = ChannelEditor(model)
    disk = ChannelEditor.from_checkpoint(_save(model, tmp_path / "ckpt"))
    assert len(set(json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())["weight_map"].values())) > 4
    for circuit in ("ov", "qk"):
        for folded in (True, False):
            assert all(torch.equal(x, y) for x, y in zip(disk.svd_all(circuit, folded=folded),
                                                         editor.svd_all(circuit, folded=folded)))
        assert all(torch.equal(x, y) for x, y in zip(disk.svd(3, 1, circuit), editor.svd(3, 1, circuit)))
    for mode in "qkv":
        got, want = disk.composition((0, 2), (3, 1), mode), editor.composition((0, 2), (3, 1), mode)
        assert got["head"] == want["head"] and torch.equal(got["share"], want["share"])
    cmap = disk.channel_map(**SETTINGS)
    assert cmap.meta["weights_only"]["sender_chunks"] > 1  # the bound forced several sender chunks
    assert_maps_equal(cmap, editor.channel_map(**SETTINGS))
    read = set(disk.layout.tensors_read)
    assert read and not [n for n in read if any(s in n for s in NOT_ATTENTION)], sorted(read)
    assert {n.rsplit(".", 2)[-2] for n in read} >= {disk.layout.spec.o.rsplit(".", 1)[-1]}


def test_default_limit_and_subsets_equal_in_memory_and_cache_stays_bounded(tmp_path):
    model = make_model("qwen3", num_hidden_layers=5)
    editor = ChannelEditor(model)
    disk = ChannelEditor.from_checkpoint(_save(model, tmp_path / "ckpt"), cache_layers=1)
    kw = dict(progress=False, baseline_samples=2, keep_top=30)
    assert_maps_equal(disk.channel_map(**kw), editor.channel_map(**kw))
    assert len(disk.layout._cache) == 1
    sub = dict(kw, modes=("k",), senders=[(0, 1), (1, 3), (2, 0)], receivers=[(2, 2), (3, 1), (4, 0), (4, 3)])
    assert_maps_equal(disk.channel_map(**sub), editor.channel_map(**sub))
    assert_maps_equal(disk.channel_map(layers=[1, 3], **kw), editor.channel_map(layers=[1, 3], **kw))


def test_dtypes_bf16_checkpoint_as_stored_and_cast(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("llama", dtype=torch.bfloat16)
    folder = _save(model, tmp_path / "bf16", shard="10KB")
    as_stored = ChannelEditor.from_checkpoint(folder)
    assert as_stored.layout.proj_weight(0, 0, "q").dtype == torch.bfloat16
    assert_maps_equal(as_stored.channel_map(**SETTINGS), ChannelEditor(model).channel_map(**SETTINGS))
    cast = ChannelEditor.from_checkpoint(folder, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(cast.svd_all("qk"), ChannelEditor(loaded).svd_all("qk")))


def test_editing_methods_raise_a_typed_error(tmp_path):
    disk = ChannelEditor.from_checkpoint(_save(make_model("gpt2"), tmp_path / "ckpt"))
    for call in (lambda: disk.scale_component(1, 0, "ov", 0, 0.5), disk.undo, lambda: disk.save_pretrained(tmp_path / "x"),
                 lambda: disk.steer(1, 0), disk.export_plan, lambda: disk.layout.target(0, 0, "ov"),
                 lambda: disk.layout.out_module(0)):
        with pytest.raises(AnalysisOnlyError, match="weights-only|checkpoint files|forward pass"):
            call()
    assert not (tmp_path / "x").exists()


# ----- broken checkpoints: typed errors naming the file ---------------------------------------------------------
def _attention_shard(folder: Path, key: str = "model.layers.1.self_attn.q_proj.weight") -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][key]


def test_missing_shard_is_named(tmp_path):
    folder = _save(make_model("llama"), tmp_path / "ckpt")
    shard = _attention_shard(folder)
    shard.unlink()
    with pytest.raises(ModelFileError, match=shard.name):
        ChannelEditor.from_checkpoint(folder)


def test_index_naming_a_file_that_is_not_there_and_a_stale_index(tmp_path):
    folder = _save(make_model("llama"), tmp_path / "ckpt")
    index = json.loads((folder / INDEX_FILE).read_text())
    key = "model.layers.2.self_attn.o_proj.weight"
    index["weight_map"][key] = "model-99999-of-99999.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="model-99999-of-99999.safetensors"):
        CheckpointLayout(folder)
    other = next(f for f in set(index["weight_map"].values()) if f != "model-99999-of-99999.safetensors"
                 and key not in load_file(folder / f))
    index["weight_map"][key] = other  # a file that exists but does not hold the tensor
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match=f"{other}.*does not hold tensor {key}"):
        CheckpointLayout(folder)


def test_wrong_dtype_is_named(tmp_path):
    folder = _save(make_model("llama"), tmp_path / "ckpt")
    key = "model.layers.1.self_attn.k_proj.weight"
    shard = _attention_shard(folder, key)
    tensors = load_file(shard)
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(QuantizedModelError, match=f"{shard.name}.*{key}.*I8"):
        ChannelEditor.from_checkpoint(folder)


def test_unsupported_architecture_and_missing_config_are_named(tmp_path):
    folder = _save(make_model("llama"), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*'mamba' is not supported"):
        ChannelEditor.from_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json does not exist"):
        ChannelEditor.from_checkpoint(folder)
    with pytest.raises(ModelFileError, match="neither"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
        ChannelEditor.from_checkpoint(tmp_path / "empty")


def test_cli_weights_only_writes_the_in_memory_tables_without_head_roles(tiny_model_dir, tmp_path):
    base = ["--quiet", "--top", "5", "--memory-limit-mb", "0.002"]
    assert cli_main(["analyze", str(tiny_model_dir), "--out", str(tmp_path / "mem"), *base]) == 0
    assert cli_main(["analyze", str(tiny_model_dir), "--weights-only", "--out", str(tmp_path / "disk"), *base]) == 0
    assert not (tmp_path / "disk" / "head_roles.csv").exists() and (tmp_path / "mem" / "head_roles.csv").exists()
    for name in ("channels_pairs.csv", "channels_heads.csv", "channels_components.parquet", "heatmap.png"):
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes() or name.endswith(".png")
    assert (tmp_path / "disk" / "heatmap.png").is_file()
    assert cli_main(["analyze", str(tmp_path / "nowhere"), "--weights-only", "--out", str(tmp_path / "x"), "--quiet"]) == 4


# ----- accelerate: the senders split over processes (simulated ranks) ---------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_return_the_single_process_map(world, tmp_path, monkeypatch):
    model = make_model("gpt2", num_hidden_layers=4)
    disk = ChannelEditor.from_checkpoint(_save(model, tmp_path / "ckpt"))
    single = ChannelEditor(model).channel_map(**SETTINGS)
    for cmap in simulated_ranks(weights_only, world, monkeypatch, lambda: disk.channel_map(**SETTINGS)):
        assert cmap.meta["processes"] == world and cmap.meta["sender_blocks"] == _blocks(single, world)
        assert_maps_equal(cmap, single)


def _blocks(cmap, world):
    from th_edit.analysis.channel_shards import sender_blocks

    return sender_blocks([l for l, _ in cmap.senders], [l for l, _ in cmap.receivers], world)


# ----- the Hub: only the shards with attention weights are downloaded ---------------------------------------------
def test_hub_id_downloads_only_attention_shards(hub, tmp_path):
    from huggingface_hub import HfApi

    model = make_model("llama", num_hidden_layers=4)
    folder = _save(model, tmp_path / "ckpt")
    api = HfApi(token=hub.token)
    api.create_repo("alice/ckpt")
    api.upload_folder(repo_id="alice/ckpt", folder_path=str(folder))
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    wanted = {f for k, f in weight_map.items() if not any(s in k for s in NOT_ATTENTION)}
    skipped = set(weight_map.values()) - wanted
    assert skipped  # MLP-only and embedding-only shards exist
    n = len(hub.requests)
    cmap = channel_map_from_checkpoint("alice/ckpt", **SETTINGS)
    fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests[n:] if m == "GET" and "/resolve/" in p}
    assert fetched == wanted | {"config.json", INDEX_FILE}
    assert_maps_equal(cmap, ChannelEditor(model).channel_map(**SETTINGS))


# ----- memory: bounded by design ------------------------------------------------------------------------------------
def test_peak_rss_growth_stays_within_the_bound_on_a_checkpoint_four_times_larger(tmp_path):
    """A fresh process maps a 24-layer checkpoint (96 MB of attention weights) with memory_limit_mb=24: the
    peak RSS growth during the map (VmHWM reset first) stays within the plan's bound plus the result."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, intermediate_size=8, vocab_size=16, max_position_embeddings=8)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt", max_shard_size="16MB")
    attention_bytes = 24 * 4 * 2048 * 128 * 4
    limit_mb = 24
    assert attention_bytes >= 4 * limit_mb * 2**20
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("_checkpoint_memory.py")), str(tmp_path / "ckpt"),
                          str(limit_mb)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["chunks"] > 4 and got["bound"] == limit_mb * 2**20 or got["bound"] < 1.2 * limit_mb * 2**20
    assert got["growth"] <= got["bound"] + got["result"] + 4 * 2**20, got
    assert got["growth"] < attention_bytes / 3, got
