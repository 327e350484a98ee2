"""Public face of :mod:`th_edit.tasks.evaluate` (and the batching helpers of :mod:`th_edit.tasks.batching`)."""

from .tasks.batching import input_device, pad_sequences, pad_token_id, plan_batches
from .tasks.evaluate import EvalResult, evaluate, guard_loss, wilson_interval

__all__ = ["EvalResult", "evaluate", "guard_loss", "wilson_interval", "input_device", "plan_batches", "pad_sequences",
           "pad_token_id"]
