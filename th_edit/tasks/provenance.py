"""Which prompts a result was fitted on, and whether an evaluation reuses them.

A prompt's identity is :func:`prompt_key`: 16 hex digits of SHA-256 over its text and answer. Its split
(train, dev or test) is :func:`split_of`: a second hash of the key and the seed, cut at the split
fractions, so it depends on the prompt and the seed alone, never on how many prompts were asked for. Two
commands with any ``--n`` therefore agree on every prompt's split.

:func:`data_provenance` records what an edit was fitted on (the dataset recipe that
:func:`th_edit.data.laundry_list` attaches to its splits, the sizes, and the keys of every train and dev
prompt); edit plans carry it as ``provenance["data"]``. :func:`check_overlap` counts how many evaluation
prompts are among them and refuses (:class:`~th_edit.errors.DataOverlapError`) unless told to allow it.

>>> key = prompt_key("Mary bought milk and tea. ... could not find the", "tea")
>>> len(key), split_of(key, seed=0) in ("train", "dev", "test")
(16, True)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataOverlapError

__all__ = ["SPLITS", "RECIPE_PREFIX", "prompt_key", "split_of", "recipe_of", "recipe_info", "data_provenance",
           "Overlap", "overlap", "check_overlap"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
#: how a recipe is stored in ``datasets.DatasetInfo.description``
RECIPE_PREFIX = "th_edit recipe: "


def prompt_key(prompt: str, target: str) -> str:
    """16 hex digits (64 bits) of SHA-256 over ``prompt`` and ``target``: a prompt's identity."""
    return hashlib.sha256(f"{prompt}\x1f{target}".encode()).hexdigest()[:16]


def split_of(key: str, seed: int, fractions: Sequence[float] = (0.5, 0.25, 0.25)) -> str:
    """The split of the prompt with :func:`prompt_key` ``key`` for ``seed``: a uniform number in [0, 1)
    from SHA-256 of both, cut at the cumulative ``fractions`` (train, dev, test)."""
    u = int(hashlib.sha256(f"{int(seed)}\x1f{key}".encode()).hexdigest()[:13], 16) / float(1 << 52)
    total = float(sum(fractions))
    edge = 0.0
    for name, f in zip(SPLITS, fractions):
        edge += float(f) / total
        if u < edge:
            return name
    return next(name for name, f in zip(reversed(SPLITS), reversed(tuple(fractions))) if f > 0)


def recipe_info(recipe: Mapping[str, Any], features: Any = None):
    """A ``datasets.DatasetInfo`` (with ``features``) whose description carries ``recipe`` (read back by
    :func:`recipe_of`)."""
    from datasets import DatasetInfo

    return DatasetInfo(description=RECIPE_PREFIX + json.dumps(dict(recipe), sort_keys=True), features=features)


def recipe_of(dataset: Any) -> dict[str, Any] | None:
    """The recipe :func:`th_edit.data.laundry_list` attached to ``dataset`` (a split or a ``DatasetDict``),
    or None (rows from elsewhere; ``to_list`` and Parquet round trips drop it)."""
    if hasattr(dataset, "values") and not hasattr(dataset, "info"):  # a DatasetDict
        dataset = next(iter(dataset.values()), None)
    text = getattr(getattr(dataset, "info", None), "description", None) or ""
    if not text.startswith(RECIPE_PREFIX):
        return None
    try:
        return json.loads(text[len(RECIPE_PREFIX):])
    except json.JSONDecodeError:
        return None


def _rows(dataset: Any) -> list[Mapping[str, Any]]:
    if dataset is None:
        return []
    return dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)


def _keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({prompt_key(r["prompt"], r["target"]) for r in rows})


def data_provenance(train: Any, dev: Any = None) -> dict[str, Any]:
    """JSON-ready record of the data an edit was fitted (``train``) and chosen (``dev``) on: the recipe
    (template, item pool, lengths, seed, sizes, split rule; None for rows of unknown origin), the counts,
    the sorted :func:`prompt_key` s of each split and one SHA-256 over them."""
    keys = {"train": _keys(_rows(train)), "dev": _keys(_rows(dev))}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    recipe = recipe_of(train) if train is not None else None
    recipe = recipe or (recipe_of(dev) if dev is not None else None)
    lengths = sorted({int(r.get("list_length", len(r["items"]))) for r in _rows(train)})
    return {"recipe": recipe, "n_train": len(keys["train"]), "n_dev": len(keys["dev"]), "train_lengths": lengths,
            "prompts_sha256": digest, "prompt_keys": keys}


@dataclass(frozen=True)
class Overlap:
    """How many of ``n_eval`` evaluation prompts are among a plan's train and dev prompts (``checked``:
    whether the plan recorded them at all)."""

    n_eval: int
    in_train: int
    in_dev: int
    checked: bool = True

    @property
    def total(self) -> int:
        return self.in_train + self.in_dev

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        if not self.checked:
            return "the plan records no training data, so its overlap with the evaluation set is unknown"
        return (f"{self.total} of the {self.n_eval} evaluation prompts were used to make the edit "
                f"({self.in_train} in its train split, {self.in_dev} in its dev split)")


def _provenance(plan: Any) -> Mapping[str, Any]:
    prov = plan if isinstance(plan, Mapping) else getattr(plan, "provenance", None) or {}
    return prov.get("data") or {} if isinstance(prov, Mapping) else {}


def overlap(plan: Any, rows: Any) -> Overlap:
    """Count ``rows``' prompts among the train and dev prompts recorded in ``plan`` (an ``EditPlan``, its
    ``provenance`` dict, or that dict's ``"data"`` entry)."""
    data = _provenance(plan)
    if "prompt_keys" not in data and "prompt_keys" in (plan if isinstance(plan, Mapping) else {}):
        data = plan
    rows = _rows(rows)
    keys = data.get("prompt_keys")
    if not isinstance(keys, Mapping):
        return Overlap(n_eval=len(rows), in_train=0, in_dev=0, checked=False)
    mine = [prompt_key(r["prompt"], r["target"]) for r in rows]
    train, dev = set(keys.get("train", ())), set(keys.get("dev", ()))
    return Overlap(n_eval=len(rows), in_train=sum(k in train for k in mine), in_dev=sum(k in dev for k in mine))


def check_overlap(plan: Any, rows: Any, *, allow: bool = False) -> Overlap:
    """:func:`overlap`, refusing a shared prompt: raises :class:`DataOverlapError` naming the counts, or with
    ``allow`` logs a warning and returns. A plan without recorded data gets a warning (nothing to check)."""
    found = overlap(plan, rows)
    if not found.checked:
        logger.warning("%s; its numbers may include training prompts.", found.describe())
    elif found.total and not allow:
        raise DataOverlapError(
            f"{found.describe()}: accuracy on them would overstate the edit. Evaluate on prompts the edit never "
            "saw: the same --seed and --template as the edit (splits are a function of the prompt and the "
            "seed, whatever --n), or pass --allow-overlap / allow_overlap=True to score them anyway.")
    elif found.total:
        logger.warning("WARNING: %s; these numbers are inflated by training data.", found.describe())
    return found
