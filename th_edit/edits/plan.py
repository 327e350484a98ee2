"""Edits and edit plans: what was changed, as exact low-rank factors, and where it can be re-applied.

An :class:`Edit` records one rescaling of singular components of one head's circuit together with the
factors of the weight change it wrote (``Delta = left @ right.T`` in the target's row form:
``W_O[h]`` for OV, ``W_Q[h]`` for QK). Re-applying those factors reproduces the edited weights bit for
bit, independent of SVD numerics on another machine.

An :class:`EditPlan` is the ordered list of edits plus the identity of the base model they were made
on (name, revision and a SHA-256 fingerprint of each touched head's weights), and optionally how they were
made (``provenance``, e.g. the fit's settings). On disk it is
``edit_plan.json`` (schema-versioned, human-readable) plus ``edit_plan.safetensors`` (the factors).
Loading never executes code or unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import PlanFormatError
from ..utils.files import replace_files
from . import plan_checks

__all__ = ["Edit", "BaseModelIdentity", "EditPlan", "PLAN_JSON", "PLAN_TENSORS", "SCHEMA_VERSION", "check_edit_factors", "coupling_problem"]

PLAN_JSON = "edit_plan.json"
PLAN_TENSORS = "edit_plan.safetensors"
PLAN_FILES = (PLAN_JSON, PLAN_TENSORS)
SCHEMA_VERSION = 2
#: the schema version of a plan with couplings (:attr:`Edit.couplings`); plans without them stay version 2
COUPLED_SCHEMA_VERSION = 3
#: schema versions :meth:`EditPlan.load` reads (v1: uniform ``alpha`` only; v2 adds per-component ``alphas``;
#: v3 adds ``couplings``)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)


def _int(value: Any) -> int:
    """A JSON integer as is; ``1.9``, ``true`` or ``"1"`` raise (a plan is never silently coerced)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


@dataclass
class Edit:
    """One rescaling of singular components of one head's circuit.

    Attributes:
        layer, head: the edited head.
        circuit: ``"ov"`` (written into ``W_O[h]``) or ``"qk"`` (written into ``W_Q[h]``).
        components: indices of the scaled singular components (descending singular value order).
        alpha: the scale factor (1.0 = no change, 0.0 = remove the components) of a uniform rescaling.
            For a per-component edit (``alphas`` set) it is 1.0 and carries no meaning.
        folded: whether components are of the folded circuit (input norm folded in) or the raw one.
        singular_values: the components' singular values before the edit.
        left, right: float32 factors of the weight change, ``Delta = left @ right.T``; for OV
            ``left [d_h, k]``, ``right [d, k]``; for QK ``left [d, k]``, ``right [d_h, k]``.
        partial: set when the edit was applied but the model's dtype could not represent the change
            (more than 10% of it lost to rounding, e.g. ``alpha=1.0001`` in bfloat16); see ``EditLog.apply``.
        alphas: per-component scale factors, aligned with ``components`` (None: every component is
            scaled by ``alpha``). Written by :func:`th_edit.edits.fit.fit_edit`; plan schema version 2.
        couplings: ``(a, b, g)`` triples, each adding ``g * s_a * u_a v_b^T`` to the circuit: component
            ``a`` of the head's own singular basis also writes along ``v_b`` (``a != b``, both in
            ``components``). The change stays inside the span of the edited components (rank <= k).
            Written by :func:`th_edit.edits.fit.fit_edit` with ``FitConfig.coupling_band``; schema version 3.
    """

    layer: int
    head: int
    circuit: str
    components: tuple[int, ...]
    alpha: float
    folded: bool
    singular_values: tuple[float, ...]
    left: torch.Tensor = field(repr=False)
    right: torch.Tensor = field(repr=False)
    partial: bool = False
    alphas: tuple[float, ...] | None = None
    couplings: tuple[tuple[int, int, float], ...] | None = None

    @property
    def scales(self) -> tuple[float, ...]:
        """The scale factor of each component in :attr:`components` (``alphas``, or ``alpha`` repeated)."""
        return tuple(self.alphas) if self.alphas is not None else (self.alpha,) * len(self.components)

    @property
    def target(self) -> str:
        """Name of the per-head weight this edit writes: ``"W_O"`` or ``"W_Q"``."""
        return "W_O" if self.circuit == "ov" else "W_Q"

    def delta(self) -> torch.Tensor:
        """The float32 weight change, in the target's row form."""
        return self.left @ self.right.T

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("left", "right")}
        d["components"] = list(self.components)
        d["singular_values"] = list(self.singular_values)
        if self.alphas is None:
            d.pop("alphas", None)
        else:
            d["alphas"] = list(self.alphas)
        if self.couplings is None:
            d.pop("couplings", None)
        else:
            d["couplings"] = [[int(a), int(b), float(g)] for a, b, g in self.couplings]
        d["target"] = self.target
        return d


@dataclass
class BaseModelIdentity:
    """What an edit plan was made on.

    Attributes:
        model_type: ``config.model_type``.
        name_or_path: ``config._name_or_path`` (a Hub id or a local path; informational).
        revision: the Hub commit hash the weights came from, when known.
        dtype: the model's parameter dtype when the plan was made.
        fingerprints: ``"layer.head" -> sha256`` of that head's attention weights before any edit.
    """

    model_type: str
    name_or_path: str = ""
    revision: str | None = None
    dtype: str = "float32"
    fingerprints: dict[str, str] = field(default_factory=dict)


@dataclass
class EditPlan:
    """An ordered list of :class:`Edit` plus the :class:`BaseModelIdentity` they apply to.

    >>> plan = EditPlan(base=BaseModelIdentity(model_type="gpt2"), edits=[])
    >>> import tempfile; d = tempfile.mkdtemp()
    >>> _ = plan.save(d)
    >>> EditPlan.load(d).base.model_type
    'gpt2'
    """

    base: BaseModelIdentity
    edits: list[Edit]
    th_edit_version: str = ""
    #: how the edits were made, JSON-serialisable: ``"fit_config"`` (``FitConfig.to_dict()``) and ``"data"``
    #: (the fit's data recipe and the keys of its train and dev prompts, see
    #: :func:`th_edit.tasks.provenance.data_provenance`); written as the JSON's ``"provenance"`` when not
    #: empty, outside ``tensors_sha256``; ``{}`` for plans written before it existed
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from .._version import __version__

        return {
            "schema_version": COUPLED_SCHEMA_VERSION if any(e.couplings for e in self.edits) else SCHEMA_VERSION,
            "th_edit_version": self.th_edit_version or __version__,
            "base_model": asdict(self.base),
            "tensors_file": PLAN_TENSORS,
            "edits": [
                {**e.describe(), "left": f"edit{i}.left", "right": f"edit{i}.right"}
                for i, e in enumerate(self.edits)
            ],
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``edit_plan.json`` and ``edit_plan.safetensors`` into ``directory`` atomically.

        Files are written to a temporary directory beside it and moved into place; on any failure the
        previous contents of ``directory`` are left as they were.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, e in enumerate(self.edits):
            tensors[f"edit{i}.left"] = e.left.detach().to("cpu", torch.float32).contiguous()
            tensors[f"edit{i}.right"] = e.right.detach().to("cpu", torch.float32).contiguous()
        staging = Path(tempfile.mkdtemp(prefix=".th_edit-staging-plan-", dir=directory))
        try:
            # one metadata key only: safetensors writes several in hash order, and the bytes must be
            # reproducible (an unchanged plan re-pushed to the Hub must not make a new commit)
            save_file(tensors, str(staging / PLAN_TENSORS), metadata={"format": "pt"})
            data = {**self.to_json(), "tensors_sha256": plan_checks.file_sha256(staging / PLAN_TENSORS)}
            (staging / PLAN_JSON).write_text(json.dumps(data, indent=2) + "\n")
            replace_files(staging, directory, (PLAN_JSON, PLAN_TENSORS))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "EditPlan":
        """Read a plan written by :meth:`save`. Raises :class:`PlanFormatError` if it is malformed."""
        directory = Path(directory)
        json_path, tensor_path = directory / PLAN_JSON, directory / PLAN_TENSORS
        if not json_path.is_file() or not tensor_path.is_file():
            raise PlanFormatError(
                f"{directory} does not hold an edit plan: expected {PLAN_JSON} and {PLAN_TENSORS}. "
                "Create one with ChannelEditor.save_plan(directory)."
            )
        data = plan_checks.read_plan_json(json_path)
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise PlanFormatError(
                f"{json_path} has schema_version {version!r}; this th_edit reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}. "
                "Upgrade th_edit or re-export the plan."
            )
        plan_checks.check_plan_json(data, json_path)
        tensors = plan_checks.read_plan_tensors(tensor_path, data)
        try:
            base = BaseModelIdentity(**data["base_model"])
            edits = [
                Edit(
                    layer=_int(e["layer"]), head=_int(e["head"]), circuit=str(e["circuit"]),
                    components=tuple(_int(c) for c in e["components"]), alpha=float(e["alpha"]),
                    folded=bool(e["folded"]), singular_values=tuple(float(s) for s in e["singular_values"]),
                    left=tensors[e["left"]], right=tensors[e["right"]], partial=bool(e.get("partial", False)),
                    alphas=None if e.get("alphas") is None else tuple(float(a) for a in e["alphas"]),
                    couplings=None if e.get("couplings") is None else tuple(
                        (_int(a), _int(b), float(g)) for a, b, g in e["couplings"]),
                )
                for e in data["edits"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFormatError(f"{json_path} is incomplete or malformed: {exc!r}") from exc
        for edit in edits:
            check_edit_factors(edit, str(json_path))
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise PlanFormatError(f"{json_path}: 'provenance' must be a JSON object. {plan_checks.REMAKE_HINT}")
        return cls(base=base, edits=edits, th_edit_version=str(data.get("th_edit_version", "")), provenance=provenance)


def coupling_problem(components, couplings) -> str | None:
    """Why ``couplings`` (``(a, b, g)`` triples) are not valid over ``components``, or None: each must join two
    different edited components with a finite ``g``."""
    for a, b, g in couplings:
        if a == b or a not in components or b not in components or not math.isfinite(float(g)):
            return (f"coupling {(a, b, g)!r} must join two different components of {list(components)} "
                    "with a finite g")
    return None


def check_edit_factors(edit: Edit, where: str) -> None:
    """Shapes, dtypes, rank and finiteness of one edit's factors, and its components and singular values."""
    k = len(edit.components)
    problem = None
    if edit.circuit not in ("ov", "qk"):
        problem = f"circuit {edit.circuit!r} is not 'ov' or 'qk'"
    elif k == 0 or len(set(edit.components)) != k or min(edit.components) < 0:
        problem = f"components {list(edit.components)} must be distinct non-negative indices"
    elif len(edit.singular_values) != k:
        problem = f"{len(edit.singular_values)} singular values for {k} components"
    elif edit.couplings and coupling_problem(edit.components, edit.couplings):
        problem = coupling_problem(edit.components, edit.couplings)
    else:
        for name in ("left", "right"):
            t = getattr(edit, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim != 2 or t.shape[1] != k:
                desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                problem = f"factor {name} is {desc}; expected float32 [n, {k}] (one column per component)"
                break
            if not torch.isfinite(t).all():
                problem = f"factor {name} holds non-finite values"
                break
    if problem:
        raise PlanFormatError(f"{where}: edit of layer {edit.layer} head {edit.head}: {problem}. {plan_checks.REMAKE_HINT}")
