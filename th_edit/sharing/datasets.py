"""Task datasets on disk and on the Hub: Parquet per split plus a dataset card (no code execution on load)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset, DatasetDict

from ..errors import InvalidArgumentError
from ..tasks.data import FEATURES, describe_fields
from ..utils.files import atomic_directory
from .cards import dataset_card
from .hub import push_folder

__all__ = ["save_task", "load_task", "push_task"]


def _card_for(dataset: DatasetDict, name: str, seed: int | None, recipe: str):
    description = (
        "Laundry List recall prompts (Merullo et al., *Talking Heads*, NeurIPS 2024, task family rebuilt "
        "from the paper's description): a list of items, then a prompt whose answer is one of them."
    )
    return dataset_card(pretty_name=name, description=description, splits={k: len(v) for k, v in dataset.items()},
                        fields=describe_fields(), seed=seed if seed is not None else -1, recipe=recipe)


def save_task(dataset: DatasetDict, directory, *, name: str = "th_edit Laundry List", seed: int | None = None,
              recipe: str = "th_edit.data.laundry_list(tokenizer, ...)", overwrite: bool = False):
    """Write ``dataset`` as one Parquet file per split (``data/<split>.parquet``) plus a dataset card
    ``README.md``, atomically, beside files already in ``directory`` (none of those is deleted; a
    non-empty directory not written by th_edit needs ``overwrite=True``; on failure it is left as it was).
    Reload with ``datasets.load_dataset("parquet", data_dir=directory + "/data")`` or
    :func:`load_task`."""
    with atomic_directory(directory, overwrite=overwrite) as staging:
        (staging / "data").mkdir()
        for split, ds in dataset.items():
            ds.to_parquet(str(staging / "data" / f"{split}.parquet"))
        _card_for(dataset, name, seed, recipe).save(staging / "README.md")
    return Path(directory)


def load_task(directory) -> DatasetDict:
    """Read a directory written by :func:`save_task` (Parquet, no code execution)."""
    files = {p.stem: str(p) for p in sorted((Path(directory) / "data").glob("*.parquet"))}
    if not files:
        raise InvalidArgumentError(f"{directory} holds no data/*.parquet files; write it with save_task().")
    return DatasetDict({k: Dataset.from_parquet(v, features=FEATURES) for k, v in files.items()})


def push_task(dataset: DatasetDict, repo_id: str, *, token: str | None = None, private: bool | None = None,
              name: str = "th_edit Laundry List", seed: int | None = None,
              recipe: str = "th_edit.data.laundry_list(tokenizer, ...)"):
    """Push ``dataset`` (Parquet per split + dataset card) to the Hub dataset repo ``repo_id`` in one commit."""
    with tempfile.TemporaryDirectory(prefix="th_edit_data_") as tmp:
        save_task(dataset, Path(tmp) / "ds", name=name, seed=seed, recipe=recipe)
        return push_folder(Path(tmp) / "ds", repo_id, repo_type="dataset", token=token, private=private,
                           commit_message="Upload th_edit task dataset")
