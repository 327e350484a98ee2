"""Laundry List and IOI task datasets (``datasets.Dataset`` splits; plain lists of rows without ``datasets``).

Every example has the same :data:`FEATURES`: ``prompt`` (ends where the answer's first token must come),
``items`` (the candidates, in list order), ``target`` (the answer item), ``target_index`` (its 0-based
position in the list), ``list_length``, ``template`` and ``example_id``. The answer is scored by the
first token of ``" " + item`` (see :func:`first_token`).

Templates:
- ``omitted`` (default; IOI generalised to N items): N items, then all but one mentioned again; the
  prompt ends where the left-over item must come.
- ``omitted_packed``, ``omitted_shopping``, ``omitted_lent``: paraphrases of ``omitted`` (same task, other
  wording), so that an edit can be fitted on one wording and tested on another.
- ``recall``: N ``name has item`` pairs, then a question about one name; the answer is its item.
- ``ioi``: the classic IOI sentences (two names, the indirect object is the answer).

Generation is deterministic for a seed. A prompt's split (train, dev or test) is a hash of the prompt, its
answer and the seed (:func:`th_edit.tasks.provenance.split_of`), not its place in a stream: datasets of
any size, made by any command, agree on which prompts are train, dev and test, and the splits share no
prompt. Each split carries its recipe (template, item pool, lengths, seed, sizes) in
``dataset.info.description``; :func:`th_edit.tasks.provenance.recipe_of` reads it back.

>>> from th_edit.data import laundry_list
>>> ds = laundry_list(None, lengths=[3], n_per_length=4, seed=0)   # tokenizer=None: no filtering
>>> ds["test"][0]["list_length"], len(ds["test"][0]["items"])
(3, 3)
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from ..errors import InvalidArgumentError
from .provenance import prompt_key, recipe_info, split_of

if TYPE_CHECKING:  # pragma: no cover - datasets is imported only where a dataset is built
    from datasets import Dataset, DatasetDict

__all__ = [
    "ITEMS", "TOY_ITEMS", "HARDWARE_ITEMS", "ITEM_POOLS", "OMITTED_TEMPLATES", "NAMES", "FEATURES", "TEMPLATES",  # noqa: F822 - FEATURES is built on first use by __getattr__
    "first_token", "usable_words", "laundry_list", "ioi", "split_sizes",
    "describe_fields", "Rows",
]

logger = logging.getLogger(__name__)

#: what every function taking task data accepts: a ``datasets.Dataset`` or a sequence of row dicts with the
#: :data:`FEATURES` (at least ``prompt``, ``items``, ``target``)
Rows = Union["Dataset", Sequence[Mapping[str, Any]]]

ITEMS = (
    "apples bananas bread butter cheese eggs flour grapes honey jam juice lemons milk onions oranges pasta "
    "peppers potatoes rice salt sugar tea coffee carrots cookies yogurt beans nuts soap shampoo towels "
    "socks shirts gloves scarves hats shoes boots candles batteries pencils pens paper envelopes stamps "
    "tape glue scissors nails screws hammers brushes sponges buckets plates cups bowls spoons forks knives "
    "napkins blankets pillows sheets curtains lamps bulbs keys wallets umbrellas books magazines maps "
    "tickets flowers seeds plants tomatoes cucumbers lettuce spinach garlic ginger melons peaches pears "
    "plums cherries chocolate biscuits crackers noodles soup cereal oats vinegar mustard ketchup"
).split()

#: a second item pool, disjoint from :data:`ITEMS` (toys and games)
TOY_ITEMS = (
    "balloons marbles kites puzzles dolls robots trains blocks crayons stickers rattles yoyos drums whistles "
    "trumpets puppets dice cards chess tops balls bats rackets skates frisbees bubbles wagons trucks cars "
    "planes boats rockets dinosaurs teddies masks costumes wands slimes globes magnets"
).split()

#: a third item pool, disjoint from :data:`ITEMS` and :data:`TOY_ITEMS` (hardware and garden tools)
HARDWARE_ITEMS = (
    "rakes shovels hoses ladders drills wrenches saws ropes chains bolts hinges pliers clamps chisels files "
    "levels rulers wires cables pipes valves springs washers rivets staples hooks locks handles knobs "
    "bricks tiles planks boards sacks barrels crates pots trowels shears funnels axes"
).split()

#: named item pools for ``laundry_list(items=<name>)``
ITEM_POOLS: dict[str, list[str]] = {"household": ITEMS, "toys": TOY_ITEMS, "hardware": HARDWARE_ITEMS}

NAMES = (
    "Mary John Alice Bob Sarah James Emma David Laura Paul Anna Mark Kate Peter Lucy Tom Rachel Daniel "
    "Sophie Michael Clare Steven Julia Robert Helen Simon Grace Henry Emily George Rose Frank Alan Ruth"
).split()

def _features():
    """The ``datasets.Features`` of every task split (imported lazily: th_edit runs without ``datasets``)."""
    from datasets import Features, Value
    from datasets import Sequence as DSequence

    return Features({
        "example_id": Value("int32"),
        "prompt": Value("string"),
        "items": DSequence(Value("string")),
        "target": Value("string"),
        "target_index": Value("int32"),
        "list_length": Value("int32"),
        "template": Value("string"),
    })


def __getattr__(name: str):
    if name == "FEATURES":  # module attribute built on first use, so importing th_edit never needs datasets
        return _features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: omitted-item wordings: ``{name}``, ``{friend}`` (another name), ``{items}`` (the list) and ``{others}``
#: (the list without the answer, shuffled, with articles); every prompt ends where the answer must come
OMITTED_TEMPLATES: dict[str, str] = {
    "omitted": "{name} bought {items}. At home {name} put away {others}, but could not find the",
    "omitted_packed": "{name} packed {items} for the trip. At the hotel {name} unpacked {others}, but the bag no longer held the",
    "omitted_shopping": "The shopping list said {items}. In the shop {name} found {others}, but the shop had run out of the",
    "omitted_lent": "{name} lent {friend} {items}. Later {friend} gave back {others}, but still kept the",
}

TEMPLATES = (*OMITTED_TEMPLATES, "recall", "ioi")

_IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {B} gave a drink to",
    "When {A} and {B} went to the park, {B} gave a ball to",
    "After {A} and {B} went to the market, {B} handed a bag to",
    "While {A} and {B} were working at the office, {B} gave a file to",
    "Then, {A} and {B} had a long argument, and afterwards {B} said to",
    "Friends {A} and {B} found a book at the library. {B} gave it to",
)


def first_token(tokenizer, word: str) -> int:
    """Id of the first token of ``" " + word`` (how an answer continues a prompt)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidArgumentError(
            f"the tokenizer turns {word!r} into no tokens; th_edit needs a tokenizer that encodes the task's "
            "words (save the model with its tokenizer)."
        )
    return int(ids[0])


def usable_words(tokenizer, words: Sequence[str]) -> list[tuple[str, int]]:
    """``(word, first_token_id)`` for each word, keeping one word per first token (the first listed), so
    that any sample of them has unique first tokens. Words the tokenizer maps to its unknown token are
    dropped. With ``tokenizer=None`` every word gets a distinct fake id."""
    if tokenizer is None:  # one entry per distinct word
        return [(w, i) for i, w in enumerate(dict.fromkeys(words))]
    seen: set[int] = set()
    out = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for w in words:
        t = first_token(tokenizer, w)
        if t not in seen and t != unk:
            seen.add(t)
            out.append((w, t))
    return out


def _join(words: Sequence[str], article: str = "") -> str:
    words = [f"{article}{w}" for w in words]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _omitted(rng: random.Random, items: list[str], names: list[str], template: str = "omitted") -> tuple[str, int]:
    n = len(items)
    target_index = rng.randrange(n)
    others = [w for i, w in enumerate(items) if i != target_index]
    rng.shuffle(others)
    name = rng.choice(names)
    fmt = OMITTED_TEMPLATES[template]
    friend = rng.choice([m for m in names if m != name]) if "{friend}" in fmt else ""
    return fmt.format(name=name, friend=friend, items=_join(items), others=_join(others, "the ")), target_index


def _recall(rng: random.Random, items: list[str], names: list[str]) -> tuple[str, int]:
    n = len(items)
    owners = rng.sample(list(names), n)
    target_index = rng.randrange(n)
    pairs = ", ".join(f"{o} has the {w}" for o, w in zip(owners, items))
    who = owners[target_index]
    return f"{pairs}. Question: what does {who} have? Answer: {who} has the", target_index


def _draw(rng: random.Random, template: str, words: Sequence[str], names: Sequence[str], n: int):
    """One random example: ``(prompt, items, target_index, template label)``."""
    if template == "ioi":
        a, b = rng.sample(list(names), 2)
        t = rng.randrange(len(_IOI_TEMPLATES))
        return _IOI_TEMPLATES[t].format(A=a, B=b), [a, b], 0, f"ioi{t}"
    items = rng.sample(list(words), n)
    if template in OMITTED_TEMPLATES:
        prompt, target_index = _omitted(rng, items, names, template)
    else:
        prompt, target_index = _recall(rng, items, names)
    return prompt, items, target_index, template


def _generate(template: str, words: Sequence[str], names: Sequence[str], lengths: Sequence[int],
              quotas: dict[str, int], seed: int, fractions: Sequence[float], max_tries: int = 50
              ) -> dict[str, list[dict[str, Any]]]:
    """The rows of every split. Per length, one seeded, de-duplicated stream of prompts is drawn; each
    prompt goes to the split :func:`~th_edit.tasks.provenance.split_of` assigns it (a hash of the prompt,
    its answer and the seed), until every split holds its quota for that length. A prompt's split thus
    never depends on the quotas, so datasets of any size agree on it."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in quotas}
    for n in lengths:
        rng = random.Random(f"{template}-{seed}-{n}")
        seen: set[str] = set()
        need = {s: q for s, q in quotas.items() if q > 0}
        wasted = 0
        while need:
            prompt, items, target_index, label = _draw(rng, template, words, names, n)
            split = split_of(prompt_key(prompt, items[target_index]), seed, fractions)
            if prompt in seen or split not in need:
                wasted += 1
                if wasted > max_tries * sum(quotas.values()):
                    raise InvalidArgumentError(
                        f"only {len(seen)} distinct {template} prompts of length {n} were found for these pools "
                        f"({', '.join(f'{s}: {quotas[s] - need.get(s, 0)} of {quotas[s]}' for s in quotas)}); "
                        "ask for fewer examples or use a larger item pool.")
                seen.add(prompt)
                continue
            seen.add(prompt)
            rows = out[split]
            rows.append({"example_id": len(rows), "prompt": prompt, "items": items, "target": items[target_index],
                         "target_index": target_index, "list_length": len(items), "template": label})
            need[split] -= 1
            if not need[split]:
                del need[split]
    return out


def _words_key(words: Sequence[str]) -> str:
    """A short, stable name for a custom word list (recipes record it, not the list)."""
    return hashlib.sha256("\x1f".join(words).encode()).hexdigest()[:12]


def split_sizes(n_per_length: int, fractions: Sequence[float] = (0.5, 0.25, 0.25)) -> dict[str, int]:
    """Examples per length in the train, dev and test splits (``fractions``: three shares >= 0 summing to 1;
    a prompt's split itself is :func:`~th_edit.tasks.provenance.split_of`, a function of the prompt and the seed)."""
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or not all(math.isfinite(f) and f >= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise InvalidArgumentError(f"fractions={tuple(fractions)} must be three shares >= 0 (train, dev, test) "
                                   "that sum to 1, e.g. (0.5, 0.25, 0.25).")
    n_train = int(round(n_per_length * fractions[0]))
    n_dev = int(round(n_per_length * fractions[1]))
    return {"train": n_train, "dev": n_dev, "test": n_per_length - n_train - n_dev}


def _build(template: str, tokenizer, lengths: Sequence[int], n_per_length: int, seed: int,
           items: Sequence[str] | None, names: Sequence[str] | None, fractions: Sequence[float]) -> "DatasetDict":
    splits = split_sizes(n_per_length, fractions)
    pool_name = items if isinstance(items, str) else ("household" if items is None else "custom:" + _words_key(items))
    if template not in TEMPLATES:
        raise InvalidArgumentError(f"template={template!r} is not one of {TEMPLATES}.")
    if isinstance(items, str):
        if items not in ITEM_POOLS:
            raise InvalidArgumentError(f"items={items!r} is not a pool name ({', '.join(ITEM_POOLS)}) or a list of words.")
        items = ITEM_POOLS[items]
    if n_per_length < 1:
        raise InvalidArgumentError(f"n_per_length={n_per_length} must be at least 1.")
    if template == "ioi":
        words = []
        name_pool = [w for w, _ in usable_words(tokenizer, names or NAMES)]
    else:
        words = [w for w, _ in usable_words(tokenizer, ITEMS if items is None else items)]
        name_pool = list(names or NAMES)
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise InvalidArgumentError("lengths is empty: give at least one list length, e.g. lengths=[3, 5].")
    pool = name_pool if template == "ioi" else words
    if len(pool) < 2:
        what = "names" if template == "ioi" else "items"
        raise InvalidArgumentError(
            f"only {len(pool)} of the {what} have a known, distinct first token for this tokenizer; a list needs "
            f"at least 2: pass another pool or your own {what}.")
    for n in lengths:
        if n < 2 or n > len(pool):
            raise InvalidArgumentError(
                f"list length {n} is out of range: between 2 and {len(pool)} (the usable {'names' if template == 'ioi' else 'items'} "
                "for this tokenizer)."
            )
        if template == "recall" and n > len(name_pool):
            raise InvalidArgumentError(f"recall lists need a distinct name per item: at most {len(name_pool)}.")
    generated = _generate(template, words, name_pool, lengths, splits, int(seed), fractions)
    generated = {split: rows for split, rows in generated.items() if splits[split] > 0}
    recipe = {"task": "ioi" if template == "ioi" else "laundry_list", "template": template,
              "items": pool_name, "pool_size": len(pool), "lengths": lengths, "n_per_length": n_per_length,
              "seed": int(seed), "fractions": [float(f) for f in fractions], "split_sizes": dict(splits),
              "split_rule": "th_edit.tasks.provenance.split_of(prompt_key(prompt, target), seed, fractions)"}
    try:
        from datasets import Dataset, DatasetDict
    except ImportError:  # without datasets: plain lists of row dicts (evaluate and fit_edit take them)
        logger.info("datasets is not installed: the splits are plain lists of rows (no recipe attached)")
        return generated
    features = _features()
    return DatasetDict({split: Dataset.from_list(rows, features=features, info=recipe_info(recipe, features))
                        for split, rows in generated.items()})


def laundry_list(
    tokenizer,
    *,
    lengths: Sequence[int] = (2, 3, 5, 8, 10, 15, 20),
    n_per_length: int = 100,
    seed: int = 0,
    template: str = "omitted",
    items: Sequence[str] | str | None = None,
    names: Sequence[str] | None = None,
    fractions: Sequence[float] = (0.5, 0.25, 0.25),
) -> "DatasetDict":
    """The Laundry List task as a ``DatasetDict`` with ``train``/``dev``/``test`` splits.

    Args:
        tokenizer: filters the item pool so that every candidate's first token is unique (``None``: no
            filtering, for tokenizer-free inspection).
        lengths: list lengths N (2 up to the usable pool size).
        n_per_length: examples per length over all splits, divided by ``fractions``.
        template: ``"omitted"`` (default), a paraphrase from :data:`OMITTED_TEMPLATES`, or ``"recall"``.
        items: candidate words, or the name of a pool in :data:`ITEM_POOLS` (default: ``"household"``).
    """
    if template == "ioi":
        raise InvalidArgumentError("use th_edit.data.ioi() for the IOI dataset.")
    return _build(template, tokenizer, lengths, n_per_length, seed, items, names, fractions)


def ioi(tokenizer, *, n: int = 200, seed: int = 0, names: Sequence[str] | None = None,
        fractions: Sequence[float] = (0.5, 0.25, 0.25)) -> "DatasetDict":
    """IOI prompts ("When Mary and John went to the store, John gave a drink to" -> " Mary"): ``items``
    is ``[indirect object, subject]`` and the target is the indirect object."""
    return _build("ioi", tokenizer, [2], n, seed, None, names, fractions)


def describe_fields() -> list[tuple[str, str, str]]:
    """``(name, dtype, meaning)`` rows for dataset cards."""
    meaning: dict[str, Any] = {
        "example_id": "index within the split",
        "prompt": "text that ends where the answer's first token must come",
        "items": "the candidate answers, in list order",
        "target": "the correct item",
        "target_index": "0-based position of the target in the list",
        "list_length": "number of items in the list",
        "template": "omitted, recall or ioi<k>",
    }
    return [(k, str(v.dtype if hasattr(v, "dtype") else "list[string]"), meaning[k]) for k, v in _features().items()]
