"""``th-edit``: the command line.

Commands: ``analyze``, ``find``, ``edit``, ``eval``, ``push``, ``demo``, ``export-tasks`` (``th-edit COMMAND --help``).
MODEL is a bundled model (``smollm2``, ``gemma3-270m``), a local directory or a Hub id.

Exit codes: 0 success; 2 bad arguments; 3 the model or plan does not fit (unsupported architecture,
plan for another model, malformed plan); 4 Hub or file-system error; 1 anything unexpected.
Every command runs under ``accelerate launch``; only the main process writes files or prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import (
    AnalysisOnlyError,
    HubError,
    InvalidArgumentError,
    ModelFileError,
    ModelNotInstalledError,
    OffloadedWeightsError,
    OutputDirectoryError,
    PlanFormatError,
    PlanMismatchError,
    ThEditError,
    UnsupportedModelError,
)
from .parser import build_parser

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_MISMATCH, EXIT_IO = 0, 1, 2, 3, 4


class _Out:
    """Human lines unless ``--quiet``; one JSON object on stdout with ``--json``; main process only."""

    def __init__(self, args):
        from ..utils.distributed import is_main_process

        self.quiet, self.json, self.main = args.quiet, args.json, is_main_process()

    def say(self, text: str) -> None:
        if self.main and not self.quiet and not self.json:
            print(text, flush=True)

    def result(self, payload: dict[str, Any]) -> None:
        if self.main and self.json:
            print(json.dumps(payload, default=str))


def _load(args):
    """``(model, tokenizer)`` on ``--device`` in ``--dtype`` (or spread by ``--device-map``)."""
    from ..sharing.bundled_models import load_model

    device = None if args.device_map and args.device == "auto" else args.device
    return load_model(args.model, gguf_file=args.gguf_file, revision=args.revision, cache_dir=args.cache_dir,
                      device=device, dtype=args.dtype, device_map=args.device_map)


def _batch_size(args, model, tokenizer, rows) -> int:
    """``--batch-size`` as a number (``auto``: the largest evaluation batch that fits, remembered)."""
    from ..tasks.evaluate import evaluation_batch_size

    return evaluation_batch_size(model, tokenizer, rows, args.batch_size)


def _runtime(model, batch_size=None) -> dict[str, Any]:
    from ..utils.devices import runtime_record

    return runtime_record(model, batch_size=batch_size)


def _data(args, tokenizer):
    from ..tasks.data import laundry_list

    return laundry_list(tokenizer, lengths=args.lengths, n_per_length=args.n, seed=args.seed, template=args.template,
                        items=args.items)


def cmd_analyze(args, out: _Out) -> dict[str, Any]:
    """Channel map (split over the processes under ``accelerate launch``), head roles, tables and plots;
    only the main process writes. ``--weights-only`` reads the checkpoint files without loading the model
    (no head roles: they need a forward pass)."""
    from ..analysis.roles import sequence_roles
    from ..editor import ChannelEditor

    settings = dict(modes=tuple(args.modes), progress=not args.quiet, seed=args.seed,
                    memory_limit_mb=args.memory_limit_mb)
    if args.weights_only:
        from ..utils.devices import resolve_device, resolve_dtype

        if args.gguf_file:
            raise InvalidArgumentError("--weights-only reads safetensors checkpoints; drop --gguf-file.")
        device = resolve_device(args.device)
        editor = ChannelEditor.from_checkpoint(args.model, device=device, dtype=resolve_dtype(args.dtype, device),
                                               revision=args.revision)
        cmap, roles = editor.channel_map(device=device, **settings), None
        runtime = {"device": str(device), "weights_only": True}
    else:
        model, _ = _load(args)
        editor = ChannelEditor(model)
        cmap = editor.channel_map(**settings)
        roles = sequence_roles(model, seed=args.seed)
        runtime = _runtime(model)
    folder = Path(args.out)
    top = cmap.top_channels(args.modes[0], k=args.top)
    if out.main:
        _write_analysis(folder, cmap, roles, top, args.modes[0], editor.n_layers, editor.n_heads)
    out.say(top.to_string(index=False))
    out.say(f"wrote tables and plots to {folder} (channel map from {cmap.meta['processes']} process(es)"
            f"{', weights only' if args.weights_only else ''})")
    return {"out": str(folder), "processes": cmap.meta["processes"], "weights_only": bool(args.weights_only),
            "top": top.to_dict("records"), "runtime": runtime}


def _write_analysis(folder: Path, cmap, roles, top, mode: str, n_layers: int, n_heads: int) -> None:
    import pandas as pd

    from .plots import plot_component_profile, plot_receiver_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    cmap.to_csv(str(folder / "channels_pairs.csv"))
    cmap.to_parquet(str(folder / "channels_components.parquet"), level="component")
    cmap.to_csv(str(folder / "channels_heads.csv"), level="head")
    if roles is not None:
        role_table = pd.DataFrame([{"layer": l, "head": h, **{k: float(v[l, h]) for k, v in roles.items()}}
                                   for l in range(n_layers) for h in range(n_heads)])
        role_table.to_csv(folder / "head_roles.csv", index=False)
    first = top.iloc[0]
    receiver, sender = (int(first.receiver_layer), int(first.receiver_head)), (int(first.sender_layer), int(first.sender_head))
    plot_receiver_heatmap(cmap, mode, receiver, folder / "heatmap.png", baseline="zscore")
    plot_component_profile(cmap, mode, sender, [receiver], folder / "component_profile.png")


def cmd_find(args, out: _Out) -> dict[str, Any]:
    from ..editor import ChannelEditor

    model, tokenizer = _load(args)
    editor = ChannelEditor(model, tokenizer=tokenizer)
    data = _data(args, tokenizer)
    if not args.roles:
        return _find_circuit(editor, data["train"], args, out) | {"runtime": _runtime(model)}
    f = editor.find_channels(data["train"], n_prompts=args.n_prompts, seed=args.seed, progress=not args.quiet)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        f.channels.to_csv(Path(args.out) / "channels.csv", index=False)
    cols = ["sender_layer", "sender_head", "sender_component", "receiver_layer", "receiver_head", "mode", "score",
            "score_over_baseline", "inhibition_score"]
    out.say(f"mover heads: {f.meta['movers']}; inhibition heads: {f.inhibition_heads}")
    out.say("inhibition channels:\n" + f.top("inhibition", 10)[cols].to_string(index=False))
    out.say("duplicate-detection channels:\n" + f.top("duplicate", 10)[cols].to_string(index=False))
    out.say(f"rank correlation (weight vs causal): {f.rank_correlation}")
    return {"movers": f.meta["movers"], "inhibition_heads": f.inhibition_heads, "rank_correlation": f.rank_correlation,
            "inhibition": f.top("inhibition", 10).to_dict("records"), "duplicate": f.top("duplicate", 10).to_dict("records"),
            "runtime": _runtime(model)}


def _find_circuit(editor, train, args, out: _Out) -> dict[str, Any]:
    """``find`` (default): :meth:`ChannelEditor.find_circuit` on the train split; JSON and PNG/SVG into ``--out``."""
    chosen = {k: v for k, v in (("min_effect", args.min_effect), ("max_depth", args.max_depth)) if v is not None}
    circuit = editor.find_circuit(train, n_prompts=args.n_prompts, seed=args.seed, progress=not args.quiet, **chosen)
    if args.out:
        from .circuit_plot import plot_circuit

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        circuit.save(folder / "circuit.json")
        for suffix in ("png", "svg"):
            plot_circuit(circuit, folder / f"circuit.{suffix}", n_heads=editor.n_heads)
    heads = [f"{h.layer}.{h.head} ({h.role}, step {h.step})" for h in circuit.heads]
    out.say(f"circuit: {len(heads)} head(s): {', '.join(heads) or 'none'}; {circuit.meta.get('reason', '')}")
    out.say(f"weight vs causal rank correlation per mode: {circuit.meta.get('spearman')}; "
            f"attribution vs causal: {circuit.meta.get('spearman_attribution')}")
    return {"circuit": circuit.to_dict(), "heads": circuit.head_list()}


def cmd_edit(args, out: _Out) -> dict[str, Any]:
    from ..editor import ChannelEditor
    from ..utils.files import check_not_overlapping, check_output_directory

    check_not_overlapping(args.out, args.model if Path(args.model).is_dir() else None)
    check_output_directory(args.out, args.overwrite)  # refuse now, not after a long fit
    model, tokenizer = _load(args)
    if args.plan:
        editor = ChannelEditor.from_plan(model, args.plan, tokenizer=tokenizer)
        payload: dict[str, Any] = {"plan": args.plan}
    else:
        editor = ChannelEditor(model, tokenizer=tokenizer)
        payload = _auto_edit(editor, args, out)
    editor.save_pretrained(args.out, overwrite=args.overwrite)
    if args.adapter:
        editor.save_adapter(Path(args.out) / "adapter", layout=args.adapter_layout, max_rank=args.max_lora_rank)
        payload["adapter"] = str(Path(args.out) / "adapter")
    out.say(f"{len(editor.edits)} edit(s); saved the edited model, its plan and card to {args.out}")
    return {**payload, "out": args.out, "n_edits": len(editor.edits), "runtime": _runtime(model, args.batch_size)}


def _head_spec(text: str):
    from ..edits.fit_config import HEAD_SPECS

    if text in HEAD_SPECS:
        return text
    try:
        return [tuple(int(x) for x in part.split(".")) for part in text.split(",") if part]
    except ValueError as exc:
        raise InvalidArgumentError(f"--heads {text!r}: use all, upper, discovered (= circuit), roles or L.H,L.H,... (e.g. 20.0,20.1)") from exc


def _auto_edit(editor, args, out: _Out) -> dict[str, Any]:
    """``edit --auto``: fit (default) or grid-search an edit on the dev split; the test split is read once."""
    data = _data(args, editor.tokenizer)
    dev = data["dev"].filter(lambda r: r["list_length"] in set(args.search_lengths))
    test = data["test"].filter(lambda r: r["list_length"] in set(args.search_lengths))
    if args.search == "grid":
        f = editor.find_channels(data["train"], seed=args.seed, progress=not args.quiet)
        args.batch_size = _batch_size(args, editor.model, editor.tokenizer, data["test"])
        search = editor.search_edit(dev, data["test"], f, batch_size=args.batch_size, progress=not args.quiet,
                                    train=data["train"])  # train chose the channels, dev the edit
        out.say(search.summary().round(3).to_string(index=False))
        return {"search": "grid", "edits": search.edits, "test_before": search.test_before.accuracy_by_length(),
                "test_after": search.test_after.accuracy_by_length(), "guard_change": search.guard_change}
    train = data["train"].filter(lambda r: r["list_length"] in set(args.search_lengths))
    result = editor.fit_edit(train, dev, heads=_head_spec(args.heads), budget=args.budget, test=test,
                             seed=args.seed, progress=not args.quiet)
    changed = len(result.head_mass())
    out.say(f"rescaled {result.n_components} component(s) in {changed} head(s) (of {len(result.heads)} fitted): "
            f"test {result.test_before} -> {result.test_after}, guard change {result.guard_change:+.2%}")
    return {"search": "fit", "changed_heads": changed, **result.summary()}


def cmd_eval(args, out: _Out) -> dict[str, Any]:
    from ..editor import ChannelEditor
    from ..tasks.evaluate import evaluate, guard_loss

    model, tokenizer = _load(args)
    split = _data(args, tokenizer)[args.split]
    payload: dict[str, Any] = {}
    plan = found = None
    if args.plan:  # refuse (or loudly allow) prompts the plan was made with, before any work
        from ..sharing.checkpoints import load_plan
        from ..tasks.provenance import check_overlap

        plan = load_plan(args.plan)
        found = check_overlap(plan, split, allow=args.allow_overlap)
        payload["overlap"] = found.to_dict()
        if found.total:
            out.say(f"WARNING: {found.describe()}; the numbers below are inflated (--allow-overlap).")
        elif found.checked:
            out.say(f"no overlap: none of the {found.n_eval} evaluation prompts was used to make the edit.")
    args.batch_size = _batch_size(args, model, tokenizer, split)
    before = evaluate(model, tokenizer, split, batch_size=args.batch_size, progress=not args.quiet, desc="evaluating")
    runtime = _runtime(model, args.batch_size)
    payload.update(before=before.to_dict(), runtime=runtime)
    after = guard = None
    if plan is not None:
        g0 = guard_loss(model, tokenizer)
        editor = ChannelEditor.from_plan(model, plan)
        after = evaluate(model, tokenizer, split, batch_size=args.batch_size, progress=not args.quiet, desc="with plan")
        guard = (g0, guard_loss(model, tokenizer))
        payload.update(after=after.to_dict(), guard=guard, edits=[e.describe() for e in editor.edits])
    cols = ["list_length", "n", "accuracy", "ci_low", "ci_high"]
    out.say(("base model" if args.plan else "model") + ":\n" + before.by_length()[cols].round(3).to_string(index=False))
    if after is not None:
        out.say("with the plan:\n" + after.by_length()[cols].round(3).to_string(index=False))
    if args.report:
        from .report import write_report

        path = write_report(args.report, title=f"th_edit evaluation: {args.model}", before=before, after=after,
                            guard=guard, overlap=found,
                            meta={"model": args.model, "plan": args.plan, "split": args.split,
                                  "seed": args.seed, "template": args.template, "items": args.items or "household",
                                  "examples per length": args.n, **{f"runtime {k}": v for k, v in runtime.items()}})
        out.say(f"report: {path}")
        payload["report"] = str(path)
    return payload


def cmd_push(args, out: _Out) -> dict[str, Any]:
    from ..edits.plan import PLAN_FILES, EditPlan
    from ..sharing.hub import files_to_push, push_folder

    folder = Path(args.directory)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory; write it with `th-edit edit --out` or save_pretrained/save_plan.")
    is_plan_only = all((folder / f).is_file() for f in PLAN_FILES) and not (folder / "config.json").is_file()
    card = folder / "README.md"
    wrote_card = is_plan_only and not card.exists() and not card.is_symlink()
    if wrote_card:
        from ..sharing.cards import plan_card

        plan_card(EditPlan.load(folder), repo_id=args.repo_id).save(card)
    upload, left_out = files_to_push(folder)
    if left_out:
        out.say(f"not uploading {len(left_out)} file(s) (not written by th_edit, changed since, links, dotfiles "
                f"or key material): {', '.join(left_out[:10])}")
    try:
        info = push_folder(folder, args.repo_id, token=args.token, private=not args.public)
    except BaseException:
        if wrote_card:
            card.unlink(missing_ok=True)  # a failed push leaves the directory as it was
        raise
    oid = getattr(info, "oid", None)
    out.say(f"pushed {len(upload)} file(s) of {folder} to {args.repo_id} "
            f"({'public' if args.public else 'private'}, commit {oid})")
    return {"repo_id": args.repo_id, "commit": oid, "private": not args.public, "uploaded": upload,
            "left_out": left_out}


def cmd_demo(args, out: _Out) -> dict[str, Any]:
    from .demo import run_demo

    result = run_demo(args.out, model=args.model, seed=args.seed, n_per_length=args.n, lengths=args.lengths,
                      search_lengths=args.search_lengths, n_prompts=args.n_prompts, cache_dir=args.cache_dir,
                      heads=_head_spec(args.heads), budget=args.budget, control_budget=args.control_budget,
                      compare_heads=args.compare_heads, device=args.device, dtype=args.dtype,
                      save_model=args.save_model, progress=not args.quiet, say=out.say)
    s = result.summary
    out.say("test accuracy by list length (before -> after): " + ", ".join(
        f"{n}: {s['test_before'][n]:.2f} -> {s['test_after'][n]:.2f}" for n in s["test_before"]))
    out.say(f"{s['n_components']} component(s) rescaled in {s['changed_heads']} head(s) (of {s['fitted_heads']} fitted); "
            f"guard loss {100 * s['guard_change']:+.2f}%")
    out.say(f"report: {result.report}  (timings: {result.timings})")
    return s


def _tokenizer(args) -> tuple[Any, str]:
    """``(tokenizer, what lm-eval's pretrained= needs)`` of MODEL; a bundled model is converted once and
    named by its converted directory."""
    from ..sharing.bundled_models import BUNDLED, cache_root, load_model

    if args.model in BUNDLED:
        root = Path(args.cache_dir) if args.cache_dir else cache_root()
        return load_model(args.model, cache_dir=args.cache_dir)[1], str(root / BUNDLED[args.model].name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model, revision=args.revision), args.model


def cmd_export_tasks(args, out: _Out) -> dict[str, Any]:
    """Laundry List (every template and pool) and IOI as lm-evaluation-harness tasks in DIRECTORY."""
    from ..tasks.lm_eval_export import ExportConfig, export_tasks

    config = ExportConfig(lengths=args.lengths, n_per_length=args.n, seed=args.seed, split=args.split,
                          ioi_n=args.ioi_n, templates=args.templates, pools=args.pools, include_ioi=not args.no_ioi)
    tokenizer, pretrained = _tokenizer(args)
    result = export_tasks(args.directory, tokenizer, config=config, tokenizer_name=args.model, overwrite=args.overwrite)
    out.say(f"wrote {len(result.tasks)} lm-eval task(s) ({sum(result.tasks.values())} rows) to {result.directory}; "
            f"run them with:\n  {result.command(pretrained)}")
    return {"directory": str(result.directory), "tasks": result.tasks, "lm_eval_command": result.command(pretrained)}


COMMANDS = {"analyze": cmd_analyze, "find": cmd_find, "edit": cmd_edit, "eval": cmd_eval, "push": cmd_push,
            "demo": cmd_demo, "export-tasks": cmd_export_tasks}


#: exception classes -> exit code, first match wins (the README's "Exit codes")
EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((InvalidArgumentError, OutputDirectoryError, AnalysisOnlyError), EXIT_USAGE),
    ((PlanMismatchError, PlanFormatError, UnsupportedModelError, OffloadedWeightsError), EXIT_MISMATCH),
    ((HubError, ModelFileError, ModelNotInstalledError, OSError), EXIT_IO),
    ((ThEditError,), EXIT_UNEXPECTED),
)


def exit_code_of(exc: BaseException) -> int:
    """The exit code the CLI returns for ``exc``."""
    return next((code for kinds, code in EXIT_CODES if isinstance(exc, kinds)), EXIT_UNEXPECTED)


def _fail(exc: BaseException, argv: list[str], command: str | None) -> int:
    code = exit_code_of(exc)
    known = isinstance(exc, (ThEditError, OSError))
    text = str(exc) if known else f"unexpected {type(exc).__name__}: {exc} (please report this as a bug)"
    if not known:
        logger.debug("unexpected error", exc_info=exc)
    print(f"th-edit: error: {text}", file=sys.stderr)
    if "--json" in argv:
        from ..utils.distributed import is_main_process

        if is_main_process():
            print(json.dumps({"command": command, "error": text, "error_type": type(exc).__name__,
                              "exit_code": code}))
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``th-edit``; returns the exit code. With ``--json`` stdout gets exactly one JSON
    object, also on failure (then with ``error``, ``error_type`` and ``exit_code``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser().parse_args(argv)
    except InvalidArgumentError as exc:
        return _fail(exc, argv, command)
    if args.quiet or args.json:
        os.environ["TH_EDIT_DISABLE_PROGRESS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="th-edit: %(message)s")
    out = _Out(args)
    try:
        with _library_bars(enabled=not (args.quiet or args.json)):
            payload = COMMANDS[args.command](args, out)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        return _fail(exc, argv, args.command)
    out.result({"command": args.command, **payload})
    return EXIT_OK


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """Silence the progress bars of datasets (always: th_edit's prompt sets are generated in memory in
    milliseconds, and "Generating train split" read like a download) and, when ``enabled`` is false, of
    transformers (weight loading) for the call; restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    was = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if was[1]:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
