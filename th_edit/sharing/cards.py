"""Model, plan and dataset cards rendered from the Jinja templates shipped in ``th_edit/sharing/templates/``
(package data, read with ``importlib.resources``, so any install layout works) with
``huggingface_hub.ModelCard`` / ``DatasetCard``.

Evidence rows are mappings with keys ``sender``, ``receiver`` (strings like ``"16.6[1]"``), ``mode``,
``score`` and optionally ``baseline`` and ``cosine``. Evaluation is a mapping
``{"before": {list_length: accuracy}, "after": {list_length: accuracy}}`` (optionally ``"note"``).

>>> from th_edit.edits.plan import BaseModelIdentity, EditPlan
>>> card = model_card(EditPlan(BaseModelIdentity("gpt2", "gpt2"), []), repo_id="me/gpt2-edited")
>>> card.data.base_model, card.data.library_name, "th_edit" in card.data.tags
('gpt2', 'transformers', True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from .._version import __version__
from ..edits.plan import EditPlan
from ..errors import InvalidArgumentError
from .bundled_models import published_license, published_name

__all__ = ["CardData", "TEMPLATES", "card_fields", "base_model_meta", "eval_results", "card_license", "template_text",
           "model_card", "plan_card", "dataset_card"]

TEMPLATES = ("edited_model", "edit_plan", "adapter", "dataset")


def template_text(name: str) -> str:
    """The Jinja text of the card template ``name`` (one of :data:`TEMPLATES`), read from the package."""
    if name not in TEMPLATES:
        raise InvalidArgumentError(f"card template {name!r} is not one of {TEMPLATES}.")
    return resources.files("th_edit.sharing").joinpath("templates", f"{name}.md").read_text(encoding="utf-8")


def _version() -> str:
    return __version__


def card_fields(plan: EditPlan, repo_id: str | None) -> dict[str, Any]:
    edits = [e.describe() for e in plan.edits]
    circuits = {e["circuit"] for e in edits}
    base = published_name(plan.base.name_or_path) or None
    return dict(
        edits=edits, n_edits=len(edits), base_model=base, repo_id=repo_id or "<this repo>",
        model_name=(repo_id or "").split("/")[-1] or "th_edit edited model", th_edit_version=_version(),
        mixed=len(circuits) > 1, only_ov=circuits <= {"ov"}, data=_data_fields(plan.provenance),
    )


def _data_fields(provenance: Mapping[str, Any]) -> dict[str, Any] | None:
    """The card's "Training data" facts from ``plan.provenance["data"]`` (None when not recorded)."""
    data = (provenance or {}).get("data")
    if not isinstance(data, Mapping):
        return None
    recipe = data.get("recipe") or {}
    return {"n_train": data.get("n_train"), "n_dev": data.get("n_dev"), "lengths": data.get("train_lengths"),
            "sha256": data.get("prompts_sha256"), "template": recipe.get("template", "unknown"),
            "items": recipe.get("items", "unknown"), "seed": recipe.get("seed", "unknown"),
            "n_per_length": recipe.get("n_per_length", "unknown")}


def base_model_meta(plan: EditPlan) -> dict[str, Any]:
    """``base_model`` metadata only for Hub-style ids (a local path is no valid base_model and is never
    published; a bundled model's converted copy is named by its Hub id)."""
    name = published_name(plan.base.name_or_path)
    if name and name.count("/") <= 1:
        return {"base_model": name, "base_model_relation": "finetune"}
    return {}


def card_license(plan: EditPlan, license: str | None) -> str | None:
    """``license`` if given, else the base model's when th_edit knows it (bundled models)."""
    return license or published_license(plan.base.name_or_path)


def eval_results(evaluation: Mapping[str, Any] | None) -> list[EvalResult]:
    """The card's machine-readable ``model-index`` results: Laundry List accuracy per list length before and
    after the edit (the split is ``evaluation["split"]``, else read from its note, else ``test``)."""
    if not evaluation:
        return []
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    note = str(evaluation.get("note", ""))
    split = evaluation.get("split") or ("dev" if "dev split" in note else "test")
    out = []
    for which, acc in (("before", before), ("after", after)):
        for n in sorted(acc, key=int):
            out.append(EvalResult(
                task_type="text-generation", task_name="Laundry List (list recall)", dataset_type="laundry_list",
                dataset_name="th_edit Laundry List", dataset_split=split, metric_type="accuracy",
                metric_value=round(float(acc[n]), 4), metric_name=f"accuracy, lists of {int(n)}, {which} the edit",
                metric_config=f"length={int(n)},{which}"))
    return out


@dataclass
class CardData:
    """What a model card says beyond the plan: the channel evidence rows and the before/after evaluation
    (see the module docstring for their shapes); the editor fills it from searches and fits."""

    evidence: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def model_card(
    plan: EditPlan,
    *,
    repo_id: str | None = None,
    evidence: Sequence[Mapping[str, Any]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    license: str | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card of a full edited checkpoint (``README.md``); ``runtime`` (device, dtype, versions: see
    :func:`th_edit.utils.devices.runtime_record`) goes into the metadata as ``th_edit_runtime``."""
    results = eval_results(evaluation)
    fields = card_fields(plan, repo_id)
    extra = {"th_edit_runtime": dict(runtime)} if runtime else {}
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=card_license(plan, license),
        tags=["th_edit", "model-editing", "talking-heads"], **base_model_meta(plan), **extra,
        **({"eval_results": results, "model_name": fields["model_name"]} if results else {}),
    )
    rows = []
    if evaluation:
        before, after = evaluation.get("before", {}), evaluation.get("after", {})
        rows = [{"length": n, "before": float(before[n]), "after": float(after[n])} for n in sorted(before, key=int) if n in after]
    return ModelCard.from_template(
        data, template_str=template_text("edited_model"), evidence=list(evidence or []),
        evaluation=rows, evaluation_note=(evaluation or {}).get("note", "Accuracy by list length, before and after the edit."),
        **fields,
    )


def plan_card(plan: EditPlan, *, repo_id: str | None = None) -> ModelCard:
    """The card of an edit-plan repository."""
    data = ModelCardData(library_name="th_edit", tags=["th_edit", "edit-plan", "talking-heads"],
                         license=card_license(plan, None), **base_model_meta(plan))
    return ModelCard.from_template(data, template_str=template_text("edit_plan"), **card_fields(plan, repo_id))


def dataset_card(
    *,
    pretty_name: str,
    description: str,
    splits: Mapping[str, int],
    fields: Sequence[tuple[str, str, str]],
    seed: int,
    recipe: str,
) -> DatasetCard:
    """The card of a pushed task dataset; ``fields`` are ``(name, dtype, meaning)`` rows."""
    data = DatasetCardData(pretty_name=pretty_name, language="en", license="apache-2.0", tags=["th_edit", "laundry-list"])
    return DatasetCard.from_template(
        data, template_str=template_text("dataset"), pretty_name=pretty_name, description=description,
        splits=list(splits.items()), fields=list(fields), seed=seed, recipe=recipe, th_edit_version=_version(),
    )
