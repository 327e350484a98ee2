"""Typed exceptions raised by th_edit.

Every error names the problem and the fix. All derive from :class:`ThEditError`, and those caused by
bad arguments also derive from :class:`ValueError`, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class ThEditError(Exception):
    """Base class of every th_edit error."""


class UnsupportedModelError(ThEditError, ValueError):
    """The model's ``config.model_type`` (or one of its options) is not in the architecture table."""


class InvalidArgumentError(ThEditError, ValueError):
    """A layer, head, component, circuit name or scale is out of range or malformed."""


class DeviceError(InvalidArgumentError):
    """A device, dtype or device map cannot be used here (no GPU, a GPU index out of range, float16 on CPU,
    layers offloaded to disk); the message names the setting that works."""


class PlanMismatchError(ThEditError, ValueError):
    """An edit plan was made for a different base model (its weight fingerprint does not match)."""


class PlanFormatError(ThEditError, ValueError):
    """An edit plan on disk is malformed, of an unknown schema version, or incomplete."""


class OffloadedWeightsError(ThEditError, RuntimeError):
    """A parameter to edit lives on the ``meta`` device and its real storage cannot be edited in place."""


class NothingToUndoError(ThEditError, RuntimeError):
    """``undo()`` was called with no edit applied."""


class HubError(ThEditError, RuntimeError):
    """A save, push or download failed (HTTP error, bad repository id, bad token); nothing was lost."""


class ModelNotInstalledError(ThEditError, RuntimeError):
    """The package carrying a bundled model's weights is not installed."""


class OutputDirectoryError(ThEditError, ValueError):
    """An output directory was refused: it holds files th_edit did not write, or it overlaps the source model."""


class QuantizedModelError(UnsupportedModelError):
    """The model's attention weights are quantized (bitsandbytes, GPTQ, AWQ, torchao, ...): th_edit edits floats."""


class ModelFileError(ThEditError, RuntimeError):
    """A model directory or file cannot be read as a transformers checkpoint (missing config.json, corrupt)."""


class MissingDependencyError(ThEditError, ImportError):
    """An optional dependency (e.g. ``peft`` for LoRA adapters) is not installed; the message names the extra."""


class AdapterError(ThEditError, ValueError):
    """A LoRA adapter cannot be written exactly for this model, or one on disk is not a th_edit adapter,
    is malformed, or no longer matches the edits recorded beside it."""


class FitError(ThEditError, RuntimeError):
    """Fitting an edit failed (e.g. the loss became non-finite); the model was left exactly as it was."""


class FitInterruptedError(ThEditError, KeyboardInterrupt):
    """Fitting was interrupted (Ctrl-C); the model was left exactly as it was. Still a KeyboardInterrupt."""


class AnalysisOnlyError(ThEditError, RuntimeError):
    """An editing, steering, fitting or saving method was called on an analysis-only editor (one made with
    ``ChannelEditor.from_checkpoint``, which reads weights from files and holds no model to change)."""


class DataOverlapError(InvalidArgumentError):
    """An evaluation set shares prompts with the train or dev data an edit plan was fitted on, so its
    accuracy would overstate the edit (see :func:`th_edit.tasks.provenance.check_overlap`)."""
