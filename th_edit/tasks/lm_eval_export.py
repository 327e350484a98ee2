"""Laundry List and IOI as lm-evaluation-harness tasks: task YAMLs plus local JSON-lines data (no Hub).

:func:`export_tasks` writes, into one directory, a ``<task>.yaml`` and ``data/<task>.jsonl`` per task:
every Laundry List template (:data:`~th_edit.tasks.data.OMITTED_TEMPLATES` and ``recall``) with every item
pool (``th_laundry_list_<template>`` for the household pool, ``th_laundry_list_<template>_<pool>`` for the
others) and ``th_ioi``; all are tagged ``th_laundry_list`` (IOI: ``th_edit``). Run them offline with::

    lm_eval --model hf --model_args pretrained=MODEL[,peft=ADAPTER] --include_path DIR --tasks th_laundry_list_omitted

Scoring equals :func:`th_edit.tasks.evaluate.evaluate`: th_edit counts an example correct when the target's
first token (of ``" " + item``) has the highest logit among the items' first tokens after the prompt. Each
exported row therefore offers as choices, per item, the text whose continuation of the prompt is exactly
that one token (``" app"`` when ``" apples"`` is ``" app"`` + ``"les"``; checked in context, row by row, with
the tokenizer), and ``target_delimiter`` is empty. lm-eval's ``multiple_choice`` ``acc`` (argmax of the
choices' log-likelihoods, i.e. of those first-token logits) then equals th_edit's ``accuracy`` on the same
rows. The data are tokenizer-specific (the item pools are filtered as :func:`~th_edit.tasks.data.laundry_list`
does): export with the tokenizer of the model you evaluate. lm-eval must tokenize as th_edit does: leave
``add_bos_token`` unset (the tokenizer's own default, as in th_edit).

The YAMLs name the data files by absolute path: export again after moving the directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import InvalidArgumentError, MissingDependencyError
from ..utils.files import atomic_directory
from .data import ITEM_POOLS, OMITTED_TEMPLATES, first_token, ioi, laundry_list

__all__ = ["MIN_LM_EVAL", "ExportConfig", "ExportResult", "task_specs", "choice_texts", "export_tasks",
           "lm_eval_version", "require_lm_eval"]

logger = logging.getLogger(__name__)

#: oldest lm-evaluation-harness whose task YAMLs have what these use (``tag``, ``dataset_kwargs.data_files``,
#: ``doc_to_choice`` from a field, ``target_delimiter``)
MIN_LM_EVAL = "0.4.4"
LAUNDRY_TEMPLATES = (*OMITTED_TEMPLATES, "recall")


@dataclass
class ExportConfig:
    """What to export: list ``lengths`` and ``n_per_length`` (all splits; the ``split`` part is written),
    the data ``seed``, ``ioi_n`` IOI prompts (all splits), and optionally a subset of ``templates`` /
    ``pools`` (default: every one) and whether to include IOI."""

    lengths: Sequence[int] = (3, 5, 8, 10, 15, 20)
    n_per_length: int = 100
    seed: int = 0
    split: str = "test"
    ioi_n: int = 200
    templates: Sequence[str] | None = None
    pools: Sequence[str] | None = None
    include_ioi: bool = True


@dataclass
class ExportResult:
    """The directory written and ``{task name: number of rows}``."""

    directory: Path
    tasks: dict[str, int] = field(default_factory=dict)

    def command(self, pretrained: str = "MODEL") -> str:
        """The ``lm_eval`` command line that runs every exported task."""
        return (f"lm_eval --model hf --model_args pretrained={pretrained} --include_path {self.directory} "
                f"--tasks {','.join(self.tasks)}")


def lm_eval_version() -> str | None:
    """The installed lm-evaluation-harness version, or None if it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def _too_old(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(MIN_LM_EVAL)
    except InvalidVersion:
        return False


def require_lm_eval() -> str:
    """The installed lm-eval version; :class:`MissingDependencyError` if it is absent or older than
    :data:`MIN_LM_EVAL`, with the install command."""
    version = lm_eval_version()
    if version is None or _too_old(version):
        found = "is not installed" if version is None else f"is {version}, older than {MIN_LM_EVAL}"
        raise MissingDependencyError(
            f"lm-evaluation-harness {found}; th_edit's exported tasks need lm-eval>={MIN_LM_EVAL} (task tags, "
            f"local data_files, per-row choices). Install it with `pip install -U 'lm-eval>={MIN_LM_EVAL}'` "
            "(or `pip install 'th_edit[lmeval]'`)."
        )
    return version


def task_specs(config: ExportConfig) -> list[tuple[str, str, str | None]]:
    """``(task name, template, pool)`` of every task ``config`` exports (pool None for IOI)."""
    templates = list(config.templates) if config.templates is not None else list(LAUNDRY_TEMPLATES)
    pools = list(config.pools) if config.pools is not None else list(ITEM_POOLS)
    bad = [t for t in templates if t not in LAUNDRY_TEMPLATES] + [p for p in pools if p not in ITEM_POOLS]
    if bad:
        raise InvalidArgumentError(f"unknown template(s) or pool(s) {bad}: templates are {LAUNDRY_TEMPLATES}, "
                                   f"pools {tuple(ITEM_POOLS)}.")
    specs = [(f"th_laundry_list_{t}" + ("" if p == "household" else f"_{p}"), t, p) for t in templates for p in pools]
    return specs + ([("th_ioi", "ioi", None)] if config.include_ioi else [])


def choice_texts(tokenizer, prompt: str, items: Sequence[str], cache: dict[str, str] | None = None) -> list[str]:
    """Per item, the shortest prefix of ``" " + item`` that continues ``prompt`` by exactly one token, the
    item's first token (:func:`~th_edit.tasks.data.first_token`), when encoded with the prompt as lm-eval
    does (``encode(prompt + text)`` split after ``encode(prompt)``). ``cache`` (item -> prefix found for
    an earlier prompt) is tried first and updated.

    Raises:
        InvalidArgumentError: no prefix of some item does (the tokenizer merges across the prompt's end).
    """
    cache = {} if cache is None else cache
    context = tokenizer(prompt)["input_ids"]

    def fits(text: str, token: int) -> bool:
        whole = tokenizer(prompt + text)["input_ids"]
        return whole[:len(context)] == context and whole[len(context):] == [token]

    out = []
    for item in items:
        token, word = first_token(tokenizer, item), " " + item
        known = cache.get(item)
        if known is not None and fits(known, token):
            out.append(known)
            continue
        found = next((word[:end] for end in range(2, len(word) + 1) if fits(word[:end], token)), None)
        if found is None:
            raise InvalidArgumentError(
                f"no prefix of {word!r} continues the prompt {prompt[-40:]!r} by exactly its first token with this "
                "tokenizer, so lm-eval could not score it as th_edit does; this tokenizer is not supported for export."
            )
        cache[item] = found
        out.append(found)
    return out


def _rows(tokenizer, template: str, pool: str | None, config: ExportConfig) -> list[dict[str, Any]]:
    if template == "ioi":
        data = ioi(tokenizer, n=config.ioi_n, seed=config.seed)
    else:
        data = laundry_list(tokenizer, lengths=config.lengths, n_per_length=config.n_per_length, seed=config.seed,
                            template=template, items=pool)
    if config.split not in data:
        raise InvalidArgumentError(f"split {config.split!r} is empty or unknown (have {sorted(data)}); "
                                   "raise n_per_length / ioi_n.")
    rows, cache = [], {}
    for row in data[config.split]:
        row = dict(row)
        row["choices"] = choice_texts(tokenizer, row["prompt"], row["items"], cache)
        row["gold"] = row["items"].index(row["target"])
        row["pool"] = pool or "names"
        rows.append(row)
    return rows


def _yaml(task: str, data_file: Path, tags: Sequence[str], meta: dict[str, Any]) -> str:
    """The task YAML (strings JSON-quoted, which YAML reads as they are)."""
    q = json.dumps
    lines = [f"task: {task}", "tag:", *[f"  - {t}" for t in tags], "dataset_path: json", "dataset_kwargs:",
             "  data_files:", f"    test: {q(str(data_file))}", "test_split: test", "output_type: multiple_choice",
             "doc_to_text: prompt", "doc_to_choice: choices", "doc_to_target: gold", 'target_delimiter: ""',
             "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
             "metadata:", "  version: 1.0", *[f"  {k}: {q(v)}" for k, v in meta.items()]]
    return "\n".join(lines) + "\n"


def export_tasks(
    directory: str | os.PathLike,
    tokenizer,
    *,
    config: ExportConfig | None = None,
    tokenizer_name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the lm-eval tasks of ``config`` (default: every template and pool, and IOI) into ``directory``.

    Args:
        tokenizer: the tokenizer of the model to evaluate (the rows and choices depend on it).
        tokenizer_name: recorded in each YAML's ``metadata`` (default: ``tokenizer.name_or_path``).
        overwrite: write beside files th_edit did not write (only th_edit's files are replaced).

    Raises:
        OutputDirectoryError: ``directory`` holds other files (nothing is written or overwritten).
        MissingDependencyError: an installed lm-eval older than :data:`MIN_LM_EVAL` (checked first).
        InvalidArgumentError: an unknown template/pool, or a tokenizer lm-eval cannot score as th_edit does.
    """
    config = config or ExportConfig()
    version = lm_eval_version()
    if version is not None:
        require_lm_eval()
    else:
        logger.info("lm-eval is not installed here; the tasks need lm-eval>=%s where they run", MIN_LM_EVAL)
    directory = Path(directory).absolute()
    specs = task_specs(config)
    meta = {"th_edit_version": __version__, "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
            "seed": config.seed, "split": config.split}
    tables = {task: _rows(tokenizer, template, pool, config) for task, template, pool in specs}  # before writing
    with atomic_directory(directory, overwrite=overwrite) as staging:
        (staging / "data").mkdir()
        for task, template, _ in specs:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in tables[task])
            (staging / "data" / f"{task}.jsonl").write_text(text)
            tags = ["th_edit"] + ([] if template == "ioi" else ["th_laundry_list"])
            (staging / f"{task}.yaml").write_text(_yaml(task, directory / "data" / f"{task}.jsonl", tags, meta))
    result = ExportResult(directory, {task: len(rows) for task, rows in tables.items()})
    logger.info("wrote %d lm-eval task(s) to %s", len(specs), directory)
    return result
