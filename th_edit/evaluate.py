"""Public face of :mod:`th_edit.tasks.evaluate`, the overlap checks of :mod:`th_edit.tasks.provenance` (and the batching helpers of :mod:`th_edit.tasks.batching`)."""

from .tasks.batching import input_device, pad_sequences, pad_token_id, plan_batches
from .tasks.evaluate import EvalResult, evaluate, guard_loss, wilson_interval
from .tasks.provenance import Overlap, check_overlap, data_provenance, overlap, prompt_key, recipe_of, split_of

__all__ = ["EvalResult", "evaluate", "guard_loss", "wilson_interval", "check_overlap", "overlap", "Overlap",
           "data_provenance", "prompt_key", "split_of", "recipe_of", "input_device", "plan_batches", "pad_sequences",
           "pad_token_id"]
