"""The ``th-edit`` argument parser: one ``_add_<command>`` function per sub-command."""

from __future__ import annotations

import argparse

from .._version import __version__
from ..errors import InvalidArgumentError

__all__ = ["build_parser", "CliParser"]


class CliParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors raise :class:`InvalidArgumentError` (so ``--json`` reports them)."""

    def error(self, message: str):
        raise InvalidArgumentError(f"{message}. Run `{self.prog} --help` for the usage.")


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="bundled name (smollm2, gemma3-270m), local directory or Hub id")
    p.add_argument("--gguf-file", help="GGUF file inside MODEL to load (de-quantized to float32)")
    p.add_argument("--revision", help="Hub revision of MODEL")
    p.add_argument("--cache-dir", help="converted-model cache for bundled models")
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: the first GPU when there is one, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype (default auto: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread a model larger than one GPU over the GPUs and CPU memory (accelerate)")


def batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto`` (the largest that fits on the GPU; 16 on the CPU)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'")
    return value


def _data_args(p: argparse.ArgumentParser, lengths=(3, 5, 8, 10, 15, 20), n=60) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=list(lengths), help="list lengths (default %(default)s)")
    p.add_argument("--n", type=int, default=n, help="examples per length, all splits together (default %(default)s)")
    p.add_argument("--template", default="omitted",
                   help="task template: omitted (default), omitted_packed, omitted_shopping, omitted_lent, recall "
                        "or ioi (th_edit.data.TEMPLATES)")
    p.add_argument("--items", default=None,
                   help="item pool: household (default), toys or hardware (th_edit.data.ITEM_POOLS)")
    p.add_argument("--batch-size", type=batch_size_arg, default=16,
                   help="prompts per forward pass, or auto: the largest that fits on the GPU, found once and "
                        "remembered in $TH_EDIT_CACHE/batch_sizes.json (16 on the CPU; default 16)")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``th-edit`` parser: common flags, then one sub-parser per command."""
    parser = CliParser(
        prog="th-edit", description="Find and rescale inter-layer communication channels (Talking Heads) in "
        "transformers language models.", epilog="Exit codes: 0 ok, 2 bad arguments, 3 model/plan mismatch, "
        "4 Hub or file error, 1 unexpected.",
    )
    parser.add_argument("--version", action="version", version=f"th-edit {__version__}")
    common = CliParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    common.add_argument("--json", action="store_true", help="print one JSON object with the results")
    common.add_argument("--seed", type=int, default=0, help="seed for data and baselines (default 0)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CliParser)
    for add in (_add_analyze, _add_find, _add_edit, _add_eval, _add_push, _add_demo, _add_export_tasks):
        add(sub, common)
    return parser


def _add_analyze(sub, common) -> None:
    p = sub.add_parser("analyze", parents=[common], help="channel map and head roles as tables and PNG plots")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--modes", nargs="+", default=["q", "k", "v"], choices=["q", "k", "v"],
                   help="composition modes to map (default: q k v)")
    p.add_argument("--top", type=_positive_int, default=20, help="channels to list (default 20)")
    p.add_argument("--memory-limit-mb", type=float, default=512.0,
                   help="working memory of the channel map's blocks per process (default 512); with --weights-only "
                        "it bounds the layers and blocks held (at least one layer's worth)")
    p.add_argument("--weights-only", action="store_true",
                   help="read the safetensors files (directory or Hub id: only the shards with attention weights are "
                        "downloaded) without loading the model; no data-based head roles")


def _add_find(sub, common) -> None:
    p = sub.add_parser("find", parents=[common], help="the circuit that writes the answer, traced back from it "
                                                        "(--roles: the paper's inhibition and duplicate channels)")
    _model_args(p)
    _data_args(p)
    p.add_argument("--n-prompts", type=int, default=32, help="prompts for the data-based scores (default 32)")
    p.add_argument("--roles", action="store_true",
                   help="ranked inhibition and duplicate-detection channels of the three-role reading (find_channels) "
                        "instead of the circuit")
    p.add_argument("--min-effect", type=float, default=None,
                   help="circuit: the causal effect a sender needs, as a share of the seed heads' summed direct "
                        "effect (default: CircuitConfig's)")
    p.add_argument("--max-depth", type=int, default=None, help="circuit: composition steps back (default: CircuitConfig's)")
    p.add_argument("--out", help="write circuit.json, circuit.png and circuit.svg (with --roles: channels.csv) here")


def _add_edit(sub, common) -> None:
    p = sub.add_parser("edit", parents=[common], help="apply a plan or search one, then save the edited model and plan")
    _model_args(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--plan", help="edit plan: directory or Hub repo id")
    how.add_argument("--auto", action="store_true", help="find channels and search an edit on the dev split")
    _data_args(p, n=120)
    p.add_argument("--search-lengths", type=int, nargs="+", default=[5, 8, 10],
                   help="--auto: list lengths the edit is fitted and chosen on (default %(default)s)")
    p.add_argument("--search", choices=["fit", "grid"], default="fit",
                   help="--auto: learn per-component scales (fit, default) or the greedy single-component grid")
    p.add_argument("--heads", default="all",
                   help="--auto --search fit: 'all' (default, as fit_edit), 'upper' (layers >= L/2), 'discovered' or "
                        "'circuit' (find_circuit's heads, traced back from the answer), 'roles' (movers, inhibition "
                        "and duplicate heads of find_channels: the paper's three roles) or L.H,L.H,...")
    p.add_argument("--budget", type=int, default=256, help="--auto --search fit: most components changed")
    p.add_argument("--adapter", action="store_true", help="also write a PEFT LoRA adapter to OUT/adapter")
    p.add_argument("--adapter-layout", choices=["compact", "uniform"], default="compact",
                   help="--adapter: compact (default: edited modules only, smallest) or uniform (every layer has the "
                        "same modules with one rank: what text-generation-inference, LoRAX and SGLang load)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="--adapter: refuse an adapter whose LoRA rank exceeds this (the server's limit, e.g. vLLM's "
                        "--max-lora-rank)")
    p.add_argument("--out", required=True, help="directory for the edited model, its plan and card (never the "
                   "source model's directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory th_edit did not write (only th_edit's files are replaced)")


def _add_eval(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help="Laundry List accuracy by length and position (before/after a plan)")
    _model_args(p)
    _data_args(p)
    p.add_argument("--plan", help="edit plan to compare against the base model")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"],
                   help="which split of the prompts to score (default test)")
    p.add_argument("--report", help="write report.md, report.html and figures into this directory")
    p.add_argument("--allow-overlap", action="store_true",
                   help="score prompts the plan was fitted or chosen on anyway (with a warning); by default eval "
                        "refuses an evaluation set that shares prompts with the plan's train or dev data")


def _add_push(sub, common) -> None:
    p = sub.add_parser("push", parents=[common], help="push a saved edited model or plan (with its card) to the Hub")
    p.add_argument("directory", help="a directory written by `th-edit edit` or ChannelEditor.save_pretrained/save_plan")
    p.add_argument("repo_id", help="Hub repository id, e.g. me/gpt2-laundry")
    p.add_argument("--token", help="Hub write token (default: the logged-in token)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true", help="create the repository private (the default)")
    vis.add_argument("--public", action="store_true", help="create the repository public")


def _add_demo(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="the whole story on a real model, with a report")
    p.add_argument("--model", default="smollm2", help="bundled model or path (default smollm2)")
    p.add_argument("--cache-dir", help="converted-model cache for bundled models")
    _device_args(p)
    p.add_argument("--out", default="th_edit_demo", help="output directory (default ./th_edit_demo)")
    p.add_argument("--n", type=int, default=100, help="examples per list length, split 50/25/25 (default 100)")
    p.add_argument("--lengths", type=int, nargs="+", default=[3, 5, 8, 10, 15, 20], help="list lengths (default %(default)s)")
    p.add_argument("--search-lengths", type=int, nargs="+", default=[5, 8, 10],
                   help="lengths of the dev prompts the edit is chosen on (default %(default)s)")
    p.add_argument("--n-prompts", type=int, default=16, help="prompts for channel discovery (default 16)")
    p.add_argument("--heads", default="upper",
                   help="heads of the fitted edit: upper (every head of layers >= L/2; default), all, discovered or L.H,...")
    p.add_argument("--budget", type=int, default=256, help="most components the fitted edit changes (default 256)")
    p.add_argument("--control-budget", type=int, default=32,
                   help="components of the discovered-vs-random heads comparison (default 32)")
    p.add_argument("--compare-heads", action="store_true",
                   help="also fit the discovered heads and as many random heads and compare them on test")
    p.add_argument("--save-model", action="store_true", help="also save the edited model (HF format)")


def _add_export_tasks(sub, common) -> None:
    p = sub.add_parser("export-tasks", parents=[common],
                       help="write Laundry List and IOI as lm-evaluation-harness tasks (YAML + local data)")
    p.add_argument("directory", help="output directory (new, empty, or an earlier export)")
    p.add_argument("--model", required=True,
                   help="the model whose tokenizer the rows are built for (bundled name, local directory or Hub id)")
    p.add_argument("--revision", help="Hub revision of MODEL")
    p.add_argument("--cache-dir", help="converted-model cache for bundled models")
    p.add_argument("--lengths", type=int, nargs="+", default=[3, 5, 8, 10, 15, 20], help="list lengths (default %(default)s)")
    p.add_argument("--n", type=int, default=100, help="examples per length over all splits (default 100)")
    p.add_argument("--ioi-n", type=int, default=200, help="IOI examples over all splits (default 200)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to export (default test)")
    p.add_argument("--templates", nargs="+", default=None, help="Laundry List templates (default: all)")
    p.add_argument("--pools", nargs="+", default=None, help="item pools (default: all)")
    p.add_argument("--no-ioi", action="store_true", help="leave out the IOI task")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory th_edit did not write (only th_edit's files are replaced)")
