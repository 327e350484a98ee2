"""th_edit: find and rescale inter-layer communication channels in transformers language models.

Implements the weight-based analysis and edits of Merullo, Eickhoff & Pavlick, "Talking Heads:
Understanding Inter-layer Communication in Transformer Language Models" (NeurIPS 2024).
See :class:`ChannelEditor` for a runnable example.
"""

import logging

from ._version import __version__
from .core.architectures import ARCHITECTURES, ArchSpec, supported_model_types
from .core.circuits import CIRCUITS, HeadWeights, SVDResult
from .editor import ChannelEditor, WeightsOnlyEditor, channel_map_from_checkpoint
from .edits.fit import FitConfig, FitResult
from .edits.plan import BaseModelIdentity, Edit, EditPlan
from .errors import (
    AdapterError,
    AnalysisOnlyError,
    DataOverlapError,
    DeviceError,
    FitError,
    FitInterruptedError,
    HubError,
    InvalidArgumentError,
    MissingDependencyError,
    ModelFileError,
    ModelNotInstalledError,
    NothingToUndoError,
    OffloadedWeightsError,
    OutputDirectoryError,
    PlanFormatError,
    PlanMismatchError,
    QuantizedModelError,
    ThEditError,
    UnsupportedModelError,
)

logging.getLogger("th_edit").addHandler(logging.NullHandler())

__all__ = [
    "AnalysisOnlyError",
    "WeightsOnlyEditor",
    "channel_map_from_checkpoint",
    "DeviceError",
    "FitConfig",
    "FitError",
    "FitInterruptedError",
    "FitResult",
    "AdapterError",
    "DataOverlapError",
    "MissingDependencyError",
    "__version__",
    "ARCHITECTURES",
    "ArchSpec",
    "BaseModelIdentity",
    "CIRCUITS",
    "ChannelEditor",
    "Edit",
    "EditPlan",
    "HeadWeights",
    "HubError",
    "ModelFileError",
    "OutputDirectoryError",
    "QuantizedModelError",
    "InvalidArgumentError",
    "NothingToUndoError",
    "OffloadedWeightsError",
    "PlanFormatError",
    "PlanMismatchError",
    "SVDResult",
    "ThEditError",
    "UnsupportedModelError",
    "ModelNotInstalledError",
    "supported_model_types",
]
