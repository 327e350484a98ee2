"""Settings of :func:`th_edit.edits.fit.fit_edit` (its result: :mod:`th_edit.edits.fit_result`).

The :class:`FitConfig` round-trips through JSON and is saved beside the plan (``provenance["fit_config"]``
of the plan that :meth:`th_edit.ChannelEditor.fit_edit` records); the card gets the fit's evaluation record.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..utils.settings import Settings

__all__ = ["FitConfig", "HEAD_SPECS"]

def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})

#: the named head specs ``FitConfig.heads`` (and ``th-edit edit --heads``) accept besides (layer, head) pairs
HEAD_SPECS = ("all", "upper", "discovered", "circuit", "roles")

@dataclass
class FitConfig(Settings):
    """Settings of :func:`fit_edit`: every field has a default and a ``help`` text (the defaults of ``steps``,
    ``refit_steps``, ``lr_schedule``, ``k_fractions`` and ``guard_weights`` are the variant that scored best at
    budget 256 on SmolLM2's held-in selection split, ``benchmarks/fit_options.py``); validated when built
    (:class:`~th_edit.errors.InvalidArgumentError` naming the field); JSON round trip with :meth:`to_dict` /
    :meth:`from_dict`; saved in the plan's ``provenance["fit_config"]`` by :meth:`th_edit.ChannelEditor.fit_edit`.

    >>> FitConfig(budget=0)
    Traceback (most recent call last):
    ...
    th_edit.errors.InvalidArgumentError: budget=0 must be an integer >= 1 (components to keep).
    """

    heads: Any = _help("all", "'all', 'upper' (every head of layers >= n_layers // 2), 'discovered' or 'circuit' "
                              "(the heads of find_circuit, traced back from the answer), 'roles' (the paper's "
                              "three-role reading: mover, inhibition and duplicate heads of find_channels) or a list "
                              "of (layer, head) pairs")
    circuits: tuple[str, ...] = _help(("ov",), "circuits whose components get a scale: ('ov',), ('qk',) or both")
    budget: int = _help(256, "most components the final edit may change")
    k_fractions: tuple[float, ...] = _help((1.0,), "numbers of kept components tried on dev, as fractions of "
                                                   "budget (each in (0, 1])")
    guard_weights: tuple[float, ...] = _help((2.0,), "weights of the guard KL term tried on dev (>= 0)")
    l1_weights: tuple[float, ...] = _help((1e-4,), "weights of the L1 penalty on the log-scales (summed over "
                                                   "components) tried on dev (>= 0)")
    steps: int = _help(12, "Adam steps of the dense fit (every component of the chosen heads)")
    refit_steps: int = _help(30, "Adam steps of each refit of the kept components (0: none)")
    rounds: int = _help(1, "prune-and-refit rounds: each keeps 4x fewer components than the last, ending at k")
    lr: float = _help(0.05, "Adam learning rate of the dense fit (Adam moves every log-scale by about lr per "
                            "step, so keep it small when thousands of components are fitted at once)")
    refit_lr: float = _help(0.1, "Adam learning rate of the refits of the kept components")
    lr_schedule: str = _help("cosine", "learning-rate schedule of every fit phase: 'cosine' (from lr down to "
                                       "lr / 20 over the phase's steps) or 'constant'")
    batch_size: int = _help(8, "training prompts per step (cycled through train in a seeded order)")
    guard_tokens: int = _help(32, "tokens of each guard paragraph used in the KL term while fitting")
    guard_texts_per_step: int = _help(4, "guard paragraphs per step (rotating through all of them)")
    rank_by: str = _help("attribution", "how the kept components are chosen from the dense fit: 'attribution' "
                         "(|theta * dCE/dtheta| at the dense solution over the training set: the first-order "
                         "task-loss increase of resetting the component), 'effect' (|alpha - 1| * s, the size of "
                         "the change) or 'log_scale' (|theta|; Adam moves every log-scale by about the same "
                         "amount, so this ranks poorly after a short fit)")
    attribution_prompts: int = _help(64, "training prompts (whole batches, in a seeded order) over which the "
                                         "attribution ranking is summed")
    coupling_band: int = _help(0, "couplings between a head's own kept components, fitted with the final refit: "
                                  "component a may also write along v_b for |a - b| <= coupling_band (0: none). "
                                  "Still an exact change of W_O[h] / W_Q[h] of rank <= the kept components: a "
                                  "plan (schema 3), a card and a LoRA adapter")
    memory_limit_mb: float = _help(1024.0, "bound on the couplings' optimiser memory (coupling_band > 0): "
                                           "16 bytes per head, circuit and d_head^2, checked before fitting")
    max_log_scale: float = _help(3.0, "bound on |theta| (> 0; 3 allows scales between exp(-3) and exp(3))")
    max_guard_change: float = _help(0.01, "largest relative guard-loss increase a dev candidate may have to be "
                                          "chosen (finite, >= 0)")
    guard_shrink: tuple[float, ...] = _help((0.75, 0.5), "factors a candidate's log-scales are shrunk by, in turn, "
                                            "while its guard change exceeds max_guard_change (each in (0, 1); () "
                                            "turns this off)")
    folded: bool | None = _help(None, "components of the folded (norm folded in) or raw circuits; None: the "
                                      "editor's default")
    seed: int = _help(0, "seed of the training order (the fit is deterministic for a seed)")
    cache_bytes: int = _help(1 << 30, "memory bound of the layer cache; batches beyond it are recomputed")
    progress: bool = _help(True, "show a progress bar (loss, train and dev accuracy)")

    def __post_init__(self) -> None:
        if isinstance(self.heads, (list, tuple)) and all(isinstance(h, (list, tuple)) for h in self.heads):
            self.heads = [tuple(h) for h in self.heads]
        for name in ("circuits", "k_fractions", "guard_weights", "l1_weights", "guard_shrink"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        """Raise :class:`th_edit.errors.InvalidArgumentError` naming the first bad field and the fix (runs
        when the config is built and on every :meth:`with_overrides`)."""
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise InvalidArgumentError(f"budget={self.budget!r} must be an integer >= 1 (components to keep).")
        self._check_heads()
        if not isinstance(self.circuits, tuple) or not self.circuits:
            raise InvalidArgumentError(f"circuits={self.circuits!r} names no circuit: use ('ov',), ('qk',) or both.")
        for c in self.circuits:
            if c not in ("ov", "qk"):
                raise InvalidArgumentError(f"circuit {c!r} is not one of ('ov', 'qk').")
        for name in ("steps", "refit_steps", "rounds", "batch_size", "guard_tokens", "guard_texts_per_step",
                     "attribution_prompts", "cache_bytes"):
            _check_int(name, getattr(self, name), 0 if name in ("refit_steps", "cache_bytes") else 1)
        _check_int("seed", self.seed, None)
        _check_int("coupling_band", self.coupling_band, 0)
        if self.coupling_band and not self.refit_steps:
            raise InvalidArgumentError("FitConfig.coupling_band > 0 needs refit_steps > 0: the couplings are "
                                       "fitted in the refit of the kept components.")
        for name in ("lr", "refit_lr", "max_log_scale", "memory_limit_mb"):
            _check_number(name, getattr(self, name), "a positive finite number", lambda v: v > 0)
        _check_number("max_guard_change", self.max_guard_change, "a finite number >= 0 (0.01 = 1% worse)",
                      lambda v: v >= 0)
        _check_values("k_fractions", self.k_fractions, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_values("guard_weights", self.guard_weights, "finite and >= 0", lambda v: v >= 0)
        _check_values("l1_weights", self.l1_weights, "finite and >= 0", lambda v: v >= 0)
        _check_values("guard_shrink", self.guard_shrink, "in (0, 1)", lambda v: 0 < v < 1, empty_ok=True)
        if self.lr_schedule not in ("constant", "cosine"):
            raise InvalidArgumentError(f"FitConfig.lr_schedule={self.lr_schedule!r} must be 'constant' or 'cosine'.")
        if self.rank_by not in ("attribution", "effect", "log_scale"):
            raise InvalidArgumentError(
                f"FitConfig.rank_by={self.rank_by!r} must be 'attribution', 'effect' or 'log_scale'.")
        for name in ("folded", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "folded" and value is None):
                raise InvalidArgumentError(f"FitConfig.{name}={value!r} must be True or False"
                                           + (" (or None: the editor's default)." if name == "folded" else "."))

    def check_coupling_memory(self, n_heads: int, d_head: int) -> None:
        """Raise :class:`InvalidArgumentError` before fitting when the couplings of ``n_heads`` heads (each
        circuit a ``d_head x d_head`` core with its gradient and two Adam moments) exceed ``memory_limit_mb``."""
        if not self.coupling_band:
            return
        need_mb = 16 * n_heads * len(self.circuits) * d_head ** 2 / 2 ** 20
        if need_mb > self.memory_limit_mb:
            raise InvalidArgumentError(
                f"coupling_band={self.coupling_band} on {n_heads} heads of head dimension {d_head} needs "
                f"{need_mb:.0f} MB for the couplings, above memory_limit_mb={self.memory_limit_mb:g}: fit fewer "
                "heads, raise memory_limit_mb or set coupling_band=0.")

    def _check_heads(self) -> None:
        if isinstance(self.heads, str):
            if self.heads not in HEAD_SPECS:
                raise InvalidArgumentError(f"heads={self.heads!r} is not a head spec: use 'all', 'upper', "
                                           "'discovered', 'circuit', 'roles' or a list of (layer, head) pairs.")
            return
        if not isinstance(self.heads, (list, tuple)) or not all(
                isinstance(h, tuple) and len(h) == 2 and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in h)
                for h in self.heads):
            raise InvalidArgumentError(f"heads={self.heads!r} is not a head spec: use 'all', 'upper', "
                                       "'discovered', 'circuit', 'roles' or a list of (layer, head) pairs.")

def _check_int(name: str, value: Any, least: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        need = "an integer" if least is None else ("a positive integer" if least == 1 else f"an integer >= {least}")
        raise InvalidArgumentError(f"FitConfig.{name}={value!r} must be {need}.")

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def _check_number(name: str, value: Any, need: str, ok) -> None:
    if not (_is_number(value) and ok(value)):
        raise InvalidArgumentError(f"FitConfig.{name}={value!r} must be {need}.")

def _check_values(name: str, values: Any, need: str, ok, *, empty_ok: bool = False) -> None:
    if not isinstance(values, tuple) or (not values and not empty_ok):
        raise InvalidArgumentError(f"FitConfig.{name}={values!r} needs at least one value, each {need}.")
    for v in values:
        if not (_is_number(v) and ok(v)):
            raise InvalidArgumentError(f"FitConfig.{name}={values!r}: {v!r} is not {need}; each value must be.")

def __getattr__(name: str) -> Any:
    if name == "FitResult":
        from ..utils.deprecation import moved_attribute

        return moved_attribute(__name__, name, "th_edit.edits.fit_result")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
