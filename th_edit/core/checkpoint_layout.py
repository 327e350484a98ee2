"""Per-head weight views read straight from a safetensors checkpoint directory, one layer at a time.

:class:`CheckpointLayout` is an :class:`~th_edit.core.layout.AttentionLayout` without a model: it reads
``config.json``, resolves the :class:`~th_edit.core.architectures.ArchSpec` through the same table, and
memory-maps the shards (``safetensors.safe_open``) named by ``model.safetensors.index.json`` (or the one
``model.safetensors``). A layer's attention tensors (q/k/v/o or the fused qkv, their biases, the input
norm, q/k norms, the post-attention norm where the architecture has one) are loaded when a view of that
layer is first asked for and kept in a small LRU cache of ``cache_layers`` layers; MLP, embedding and
unembedding tensors are never read. Views are the same as the in-memory layout's, so every function of
:mod:`th_edit.core.circuits` runs on it unchanged and returns the same values for the same weights.
Views are read-only: asking for a writable one raises :class:`AnalysisOnlyError`.

Every problem with the files (no config, an unsupported ``model_type``, a shard the index names but the
directory lacks, a tensor missing from its shard, a non-float tensor) is a typed error naming the file.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Collection

import torch

from ..errors import AnalysisOnlyError, InvalidArgumentError, ModelFileError, QuantizedModelError, UnsupportedModelError
from .architectures import ARCHITECTURES, ArchSpec, get_spec
from .layout import FLOAT_DTYPES, AttentionLayout

__all__ = ["CheckpointLayout", "read_checkpoint_config", "attention_tensor_names", "layer_prefixes",
           "needed_tensor_names", "CONFIG_FILE", "INDEX_FILE", "SINGLE_FILE"]

logger = logging.getLogger(__name__)

CONFIG_FILE, INDEX_FILE, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
#: safetensors dtype codes th_edit reads (anything else is quantized or not a weight)
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_EPS_ATTRS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon")
_ANALYSIS_ONLY = ("this layout reads weights from checkpoint files and cannot be edited. Load the model "
                  "(ChannelEditor(AutoModelForCausalLM.from_pretrained(...))) to edit it.")


def read_checkpoint_config(directory: str | Path, spec: ArchSpec | None = None) -> tuple[Any, ArchSpec]:
    """``(transformers config, ArchSpec)`` of the checkpoint in ``directory``; typed errors name ``config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist: a weights-only analysis needs the checkpoint's config.json "
                             "beside its safetensors files (the directory written by save_pretrained).")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not readable JSON ({exc}); restore it from the original checkpoint.") from exc
    model_type = raw.get("model_type")
    if spec is None and model_type not in ARCHITECTURES:
        try:
            get_spec(type("Config", (), {"model_type": model_type})())
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{path}: {exc}") from None
    qc = raw.get("quantization_config")
    if qc and (qc.get("quant_method") if isinstance(qc, dict) else None) != "gguf":
        raise QuantizedModelError(f"{path} describes a quantized checkpoint (quantization_config {qc.get('quant_method')!r}); "
                                  "th_edit reads float weights: use the checkpoint's float version.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{path} could not be read as a transformers config ({exc}).") from exc
    try:
        return config, spec if spec is not None else get_spec(config)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from None


def attention_tensor_names(spec: ArchSpec, layer_prefix: str, layer: int, norm_enabled: bool = True) -> list[str]:
    """Names of every tensor the circuits of block ``layer`` may read (``.weight`` and ``.bias`` of the
    projections and folded norms; a checkpoint need not hold every bias)."""
    paths = [spec.q, spec.k, spec.v, spec.o, spec.q_norm, spec.k_norm, spec.post_attn_norm]
    paths.append(spec.attn_norm if norm_enabled else None)
    unique = dict.fromkeys(p for p in paths if p)
    return [f"{layer_prefix}.{layer}.{p}.{n}" for p in unique for n in ("weight", "bias")]


def _norm_on(spec: ArchSpec, config: Any) -> bool:
    return spec.attn_norm is not None and (spec.norm_enabled_flag is None or bool(getattr(config, spec.norm_enabled_flag, True)))


def layer_prefixes(spec: ArchSpec, names: Collection[str], source: Path | str, model_type: str = "") -> tuple[str, str]:
    """The blocks' key prefix as stored (``model.layers``; checkpoints saved from the base model drop the
    first part, e.g. GPT-2's ``h.0...``) and the final norm's prefix to match. ``names``: the tensor names
    the checkpoint holds (``source``: the file listing them, for the error)."""
    layers, final = spec.layers, spec.final_norm
    for drop in (0, 1):
        prefix = ".".join(layers.split(".")[drop:])
        if prefix and f"{prefix}.0.{spec.o}.weight" in names:
            return prefix, ".".join(final.split(".")[drop:]) if drop and "." in final else final
    raise ModelFileError(f"{source} lists no tensor {layers}.0.{spec.o}.weight: it is not a {model_type} checkpoint "
                         "th_edit can read, or it is incomplete.")


def needed_tensor_names(config: Any, spec: ArchSpec, names: Collection[str], source: Path | str) -> list[str]:
    """Every tensor of ``names`` the circuits (and the final norm) of the checkpoint may read: attention
    projections, their biases and the folded norms; never an MLP or embedding tensor."""
    prefix, final = layer_prefixes(spec, names, source, getattr(config, "model_type", ""))
    out = [n for l in range(int(config.num_hidden_layers))
           for n in attention_tensor_names(spec, prefix, l, _norm_on(spec, config)) if n in names]
    return out + [n for n in (f"{final}.weight", f"{final}.bias") if n in names]


class _Files:
    """Tensor name -> shard path of a checkpoint directory (the index's weight map, or one file's keys)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            self.source = index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelFileError(f"{index} is not a safetensors index (no readable 'weight_map': {exc}).") from exc
            self.map = {k: directory / v for k, v in weight_map.items()}
        elif single.is_file():
            self.source = single
            self.map = dict.fromkeys(self._header(single), single)
        else:
            raise ModelFileError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}: weights-only analysis "
                                 "reads safetensors checkpoints (save the model with save_pretrained).")

    @staticmethod
    def _header(path: Path) -> dict[str, dict]:
        """The safetensors header of ``path`` (names, dtypes, shapes, offsets), read without the data."""
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 1 << 30:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise ModelFileError(f"shard {path} is missing; restore it (or download it again).") from None
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{path} is not a readable safetensors file ({exc}); download it again.") from exc
        header.pop("__metadata__", None)
        return header


class CheckpointLayout(AttentionLayout):
    """Read-only per-head views of a safetensors checkpoint's attention weights, one layer at a time.

    Args:
        directory: a directory holding ``config.json`` and ``model.safetensors`` or a sharded checkpoint
            (``model.safetensors.index.json`` + shards). Only shards holding the needed tensors must exist.
        spec: override the architecture table (as ``AttentionLayout``).
        device: where tensors are loaded (default CPU); circuits are then computed there.
        dtype: a float dtype to cast the loaded tensors to (default: as stored). Loading a model with
            ``from_pretrained(..., dtype=X)`` casts the same way, so results equal that model's.
        cache_layers: how many layers' tensors are kept (least recently used dropped first).

    Attributes:
        tensors_read: names of the tensors whose data was loaded, in order (with repeats after eviction).
        layer_nbytes: bytes of one layer's loaded attention tensors (after the cast).
    """

    def __init__(self, directory: str | Path, *, spec: ArchSpec | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, cache_layers: int = 2) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ModelFileError(f"{self.directory} is not a directory; pass the checkpoint directory (with config.json).")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(f"dtype={dtype!r} is not a float dtype; use one of {list(FLOAT_DTYPES)} or None.")
        if isinstance(cache_layers, bool) or not isinstance(cache_layers, int) or cache_layers < 1:
            raise InvalidArgumentError(f"cache_layers={cache_layers!r} must be an integer >= 1.")
        self.config, self.spec = read_checkpoint_config(self.directory, spec)
        self.model = None
        self.device, self.dtype, self.cache_layers = torch.device(device or "cpu"), dtype, cache_layers
        self.files = _Files(self.directory)
        self._prefix, self._final_prefix = layer_prefixes(self.spec, self.files.map, self.files.source,
                                                          self.config.model_type)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._meta: dict[str, dict] = {}
        self.tensors_read: list[str] = []
        n_layers = int(self.config.num_hidden_layers)
        norm_on = _norm_on(self.spec, self.config)
        self._names = {l: [n for n in attention_tensor_names(self.spec, self._prefix, l, norm_on) if n in self.files.map]
                       for l in range(n_layers)}
        self._check_tensors(n_layers)
        o_shape = self._meta[self._key(0, self.spec.o, "weight")]["shape"]
        self._set_geometry(self.config, n_layers, o_shape[0] if self.spec.conv1d else o_shape[1])
        self.layer_nbytes = max(self._layer_bytes(l) for l in range(n_layers))

    # ----- files --------------------------------------------------------------------------------
    def _key(self, layer: int, path: str, name: str) -> str:
        return f"{self._prefix}.{layer}.{path}.{name}"

    def _check_tensors(self, n_layers: int) -> None:
        """Every needed tensor exists in the shard the map names, as a float tensor (headers only)."""
        required = {self.spec.q, self.spec.k, self.spec.v, self.spec.o}
        headers: dict[Path, dict] = {}
        for layer in range(n_layers):
            for path in required:
                key = self._key(layer, path, "weight")
                if key not in self.files.map:
                    raise ModelFileError(f"{self.files.source} lists no tensor {key}: the checkpoint is incomplete.")
            for key in self._names[layer]:
                file = self.files.map[key]
                if file not in headers:
                    headers[file] = _Files._header(file)
                meta = headers[file].get(key)
                if meta is None:
                    raise ModelFileError(f"{file} does not hold tensor {key}, though {self.files.source.name} "
                                         "says it does: the shard is stale or corrupt; download it again.")
                if meta.get("dtype") not in _FLOAT_CODES:
                    raise QuantizedModelError(f"{file}: tensor {key} has dtype {meta.get('dtype')}, not a float "
                                              f"({', '.join(_FLOAT_CODES)}); th_edit reads float weights, so use the "
                                              "checkpoint's float (unquantized) version.")
                self._meta[key] = meta

    def _layer_bytes(self, layer: int) -> int:
        size = (self.dtype.itemsize if self.dtype is not None else None)
        return sum(math.prod(self._meta[k]["shape"]) * (size or _FLOAT_CODES[self._meta[k]["dtype"]].itemsize)
                   for k in self._names[layer])

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load ``names`` (grouped by shard; each shard memory-mapped once), cast to ``dtype``."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files.map[n], []).append(n)
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device=str(self.device)) as f:
                    for k in keys:
                        t = f.get_tensor(k)
                        out[k] = t if self.dtype is None else t.to(self.dtype)
                        self.tensors_read.append(k)
            except FileNotFoundError:
                raise ModelFileError(f"shard {file} is missing; restore it (or download it again).") from None
            except (OSError, RuntimeError, ValueError) as exc:
                if isinstance(exc, ModelFileError):
                    raise
                raise ModelFileError(f"{file} could not be read ({type(exc).__name__}: {exc}); download it again.") from exc
        return out

    def _layer(self, layer: int) -> dict[str, torch.Tensor]:
        if layer in self._cache:
            self._cache.move_to_end(layer)
            return self._cache[layer]
        while len(self._cache) >= self.cache_layers:
            self._cache.popitem(last=False)
        tensors = self._load(self._names[layer])
        self._cache[layer] = tensors
        logger.debug("loaded layer %d of %s (%d tensors)", layer, self.directory, len(tensors))
        return tensors

    def clear_cache(self) -> None:
        """Drop every cached layer."""
        self._cache.clear()

    # ----- AttentionLayout hooks ----------------------------------------------------------------
    def _tensor(self, layer: int | None, path: str, name: str = "weight", write: bool = False) -> torch.Tensor | None:
        if write:
            raise AnalysisOnlyError(_ANALYSIS_ONLY)
        if layer is None:
            key = f"{self._final_prefix}.{name}"
            if key not in self.files.map:
                return None
            if key not in self._meta:
                self._meta[key] = _Files._header(self.files.map[key])[key]
            return self._load([key])[key]
        self.check(layer, 0)
        return self._layer(layer).get(self._key(layer, path, name))

    def _norm_eps(self, layer: int | None, path: str) -> float:
        return float(next((getattr(self.config, a) for a in _EPS_ATTRS if getattr(self.config, a, None) is not None), 1e-5))

    def module(self, layer: int, path: str):
        raise AnalysisOnlyError(f"{_ANALYSIS_ONLY} (no module {path} of layer {layer} exists here)")

    def out_module(self, layer: int):
        raise AnalysisOnlyError(f"{_ANALYSIS_ONLY} (reading head outputs needs a forward pass)")

    def target(self, layer: int, head: int, circuit: str) -> torch.Tensor:
        raise AnalysisOnlyError(_ANALYSIS_ONLY)

    def __repr__(self) -> str:
        return (f"CheckpointLayout({self.directory}, {self.config.model_type}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_model={self.d_model}, d_head={self.d_head})")
