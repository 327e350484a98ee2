"""What a th_edit adapter's ``adapter_config.json`` may say: only settings under which peft applies exactly
``W + B @ A`` to exactly the target modules.

:func:`check_adapter_config` accepts the keys th_edit writes with the values it writes them with, plus
metadata that does not change the loaded weights; every other key (``exclude_modules``,
``modules_to_save``, ``layers_to_transform``, ``target_parameters``, ``trainable_token_indices``, keys of a
future peft, ...) must be unset (``None``, ``False``, empty). The ranks, scalings, target modules and the
LoRA tensors themselves are checked against the plan by ``adapters._check_matches``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_adapter_config"]

#: checked against the plan elsewhere (target modules, ranks, scalings, LoRA type)
_CHECKED_ELSEWHERE = {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                      "use_dora", "use_rslora"}
#: metadata: names, versions, the loading mode; no effect on the weights peft builds
_METADATA = {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "auto_mapping"}


def _fixed_values(conv1d: bool) -> dict[str, tuple[Any, ...]]:
    """Keys th_edit writes with one meaning, and the values that keep it (old peft versions wrote some as None)."""
    return {
        "task_type": ("CAUSAL_LM", None),
        "bias": ("none",),
        "lora_dropout": (0, 0.0),
        "fan_in_fan_out": (conv1d,) if conv1d else (False, None),
        "init_lora_weights": (True,),
        "megatron_core": ("megatron.core", None),  # only read with a megatron_config, which must be unset
        "loftq_config": ({}, None),
        "ensure_weight_tying": (False, None),
    }


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and len(value) == 0)


def check_adapter_config(config: Mapping[str, Any], *, conv1d: bool, fail: Callable[[str], None]) -> None:
    """Call ``fail(why)`` unless every key of ``config`` is one peft applies exactly as th_edit wrote it.

    Args:
        config: the parsed ``adapter_config.json``.
        conv1d: whether the model's projections are transformers ``Conv1D`` (GPT-2: ``fan_in_fan_out``).
        fail: raises (an :class:`~th_edit.errors.AdapterError` naming the source).
    """
    fixed = _fixed_values(conv1d)
    odd = []
    for key, value in sorted(config.items()):
        if key in _CHECKED_ELSEWHERE or key in _METADATA:
            continue
        if key in fixed:
            if not any(value == ok and type(value) is type(ok) or (ok is None and value is None) for ok in fixed[key]):
                odd.append(f"{key}={value!r}")
        elif key == "qalora_group_size":  # only read with use_qalora, which must be unset
            continue
        elif not _unset(value):
            odd.append(f"{key}={value!r}")
    if odd:
        fail(f"its adapter_config.json sets {', '.join(odd)}, which peft would apply differently from the "
             "recorded edits (or which th_edit does not know)")
