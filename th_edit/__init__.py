"""th_edit: find and rescale inter-layer communication channels in transformers language models.

Implements the weight-based analysis and edits of Merullo, Eickhoff & Pavlick, "Talking Heads:
Understanding Inter-layer Communication in Transformer Language Models" (NeurIPS 2024).
See :class:`ChannelEditor` for a runnable example.
"""

import logging

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, ArchSpec, supported_model_types
from .editor import CIRCUITS, ChannelEditor, HeadWeights, SVDResult
from .errors import (
    HubError,
    InvalidArgumentError,
    NothingToUndoError,
    OffloadedWeightsError,
    PlanFormatError,
    PlanMismatchError,
    ThEditError,
    UnsupportedModelError,
)
from .plan import BaseModelIdentity, Edit, EditPlan

logging.getLogger("th_edit").addHandler(logging.NullHandler())

__all__ = [
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
    "InvalidArgumentError",
    "NothingToUndoError",
    "OffloadedWeightsError",
    "PlanFormatError",
    "PlanMismatchError",
    "SVDResult",
    "ThEditError",
    "UnsupportedModelError",
    "supported_model_types",
]
