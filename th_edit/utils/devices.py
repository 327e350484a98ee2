"""Where a model runs and in what precision: device and dtype choices, checked, and the batch size that fits.

- :func:`resolve_device`: ``"auto"``/None -> the first GPU when there is one (``cuda:LOCAL_RANK`` under
  ``accelerate launch``), else the CPU; ``"cuda"`` without a GPU or ``"cuda:7"`` on a one-GPU machine
  raise :class:`~th_edit.errors.DeviceError` naming what exists.
- :func:`resolve_dtype`: ``"auto"``/None -> float32 on the CPU, bfloat16 on a GPU that has it (else
  float16); float16 on the CPU is refused (slow, and half of torch's CPU kernels lack it).
- :func:`auto_batch_size`: the largest batch (halving from a start) whose probe runs without running out
  of GPU memory, found once per key and remembered in the process and in a small JSON file; on the CPU it
  returns the default without probing (memory is rarely the limit there).
- :func:`runtime_record`: what a model actually runs on, for results, reports and model cards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DeviceError, InvalidArgumentError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "is_out_of_memory", "auto_batch_size", "runtime_record",
           "model_device"]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BATCH_SIZES: dict[str, int] = {}  # in-process memory of auto_batch_size


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device for ``spec`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto`` or None), checked to exist."""
    text = "auto" if spec is None else str(spec).strip().lower()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if text == "auto":
        return torch.device(f"cuda:{local % n_gpus}") if n_gpus else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise DeviceError(f"device {spec!r} is not a device: use cpu, cuda, cuda:N or auto.") from exc
    if device.type == "cuda":
        if n_gpus == 0:
            raise DeviceError(f"device {spec!r} asked for a GPU, but torch sees no CUDA GPU here (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}). Use --device cpu (or "
                              "device='cpu'), or install a CUDA build of torch on a machine with a GPU.")
        index = local % n_gpus if device.index is None else device.index
        if index >= n_gpus:
            raise DeviceError(f"device {spec!r}: this machine has {n_gpus} GPU(s), cuda:0 to cuda:{n_gpus - 1}. "
                              "Pick one of those, or check CUDA_VISIBLE_DEVICES.")
        return torch.device("cuda", index)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {spec!r}: MPS is not available here. Use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {spec!r} is not supported: use cpu, cuda, cuda:N or auto.")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The parameter dtype for ``spec`` (``float32``, ``bfloat16``, ``float16``, a torch dtype, ``auto``/None)
    on ``device``: auto is float32 on the CPU and bfloat16 on a GPU (float16 where bf16 is unsupported)."""
    device = torch.device(device)
    if spec is None or spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif str(spec) in DTYPES:
        dtype = DTYPES[str(spec)]
    else:
        raise InvalidArgumentError(f"dtype {spec!r} is not one of {', '.join(DTYPES)} or auto.")
    if dtype not in DTYPES.values():
        raise InvalidArgumentError(f"dtype {dtype} is not one of {', '.join(DTYPES)}: th_edit edits float weights.")
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("float16 on the CPU is refused: many CPU kernels lack it and its range overflows in "
                          "attention. Use --dtype bfloat16 (half the memory, CPU kernels exist) or float32 on the "
                          "CPU, or --device cuda for float16.")
    return dtype


def model_device(model) -> torch.device:
    """The device of the model's first parameter that is not on ``meta`` (the CPU if all are)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def runtime_record(model, *, batch_size: int | str | None = None) -> dict[str, Any]:
    """What ``model`` runs on: device(s), parameter dtype, device map, library versions (JSON-ready)."""
    import transformers

    devices = sorted({str(p.device) for p in model.parameters()})
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    out: dict[str, Any] = {"device": devices[0] if len(devices) == 1 else devices,
                           "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                           "torch": str(torch.__version__), "transformers": str(transformers.__version__)}
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        out["device_map"] = {str(k): str(v) for k, v in device_map.items()}
    if torch.cuda.is_available() and any(d.startswith("cuda") for d in devices):
        out["gpu"] = torch.cuda.get_device_name(torch.device(next(d for d in devices if d.startswith("cuda"))))
    if batch_size is not None:
        out["batch_size"] = batch_size
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (CUDA, MPS or a host allocation)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _cache_file() -> Path:
    root = os.environ.get("TH_EDIT_CACHE") or Path.home() / ".cache" / "th_edit"
    return Path(root) / "batch_sizes.json"


def auto_batch_size(probe: Callable[[int], Any], key: str, device: torch.device | str, *, start: int = 256,
                    default: int = 16, remember: bool = True) -> int:
    """The largest batch size ``b <= start`` (halving) for which ``probe(b)`` runs without running out of
    memory; remembered under ``key`` (e.g. model, device and dtype) in this process and in
    ``$TH_EDIT_CACHE/batch_sizes.json``. On the CPU returns ``default`` without probing.

    Raises:
        DeviceError: even batch size 1 runs out of memory (the message names the fixes).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return default
    full_key = f"{key}|{device}"
    if full_key in _BATCH_SIZES:
        return _BATCH_SIZES[full_key]
    path = _cache_file()
    stored = _read_json(path) if remember else {}
    if full_key in stored:
        _BATCH_SIZES[full_key] = int(stored[full_key])
        return _BATCH_SIZES[full_key]
    size = start
    while size >= 1:
        try:
            probe(size)
            break
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_out_of_memory(exc):
                raise
            logger.info("batch size %d ran out of memory on %s; trying %d", size, device, size // 2)
            size //= 2
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if size < 1:
        raise DeviceError(f"even one prompt runs out of memory on {device}: use --dtype bfloat16, "
                          "--device-map auto (spread the model over GPUs and CPU), or a bigger GPU.")
    _BATCH_SIZES[full_key] = size
    if remember:
        stored[full_key] = size
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored, indent=1, sort_keys=True))
        except OSError as exc:  # the cache is a convenience
            logger.warning("could not remember the batch size in %s: %s", path, exc)
    return size


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
