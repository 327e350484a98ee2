"""Every ```python block of README.md and docs/*.md runs, on a tiny model, so the documentation cannot drift.

Conventions (for whoever writes the docs):

* The blocks of one file run in order in one shared namespace, like the cells of a notebook: a later block
  may use names an earlier block of the same file defined. A block that fails is reported on its own; the
  blocks after it still run.
* The namespace starts with these names, standing for what a reader has at hand:
  ``path`` (a saved model directory), ``model`` and ``tokenizer`` (loaded from it), ``base_model`` (a
  second, unedited copy), ``editor`` (``ChannelEditor(model, tokenizer=tokenizer)``), ``data``
  (``laundry_list(tokenizer, ...)``), ``batch`` (a tokenized batch of task prompts). The model is a tiny
  random llama wide enough for the docs' head numbers (24 layers x 12 heads, d = 48) whose word-level
  tokenizer covers the task templates.
* ``th_edit.models.load_model`` / ``load_default_model`` return that tiny model whatever name they get
  (``"smollm2"``, ``"gemma3-270m"``, a path), and ``AutoModelForCausalLM`` / ``AutoTokenizer`` ``from_pretrained``
  read bundled names the same way; Hub calls go to the loopback Hub (``tests/hub_server.py``) as user ``me``.
* Files are written in a temporary working directory.
* A block preceded by the line ``<!-- no-test -->`` is skipped. Keep those few (a block that needs a GPU, the
  network or hours).

:data:`KNOWN_FAILING` lists blocks (file, first line) that fail today, with why; remove an entry when the
block is fixed (the test then must pass).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NO_TEST = "<!-- no-test -->"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: (file, first line of the block) -> why it fails; marked xfail (non-strict) until the docs are fixed
KNOWN_FAILING: dict[tuple[str, str], str] = {}


def extract_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of every ```python block of a Markdown text."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            out.append((start + 1, "\n".join(lines[start + 1:j]), before == NO_TEST))
            i = j + 1
        else:
            i += 1
    return out


BLOCKS = [(f, line, code, skipped) for f in DOC_FILES if f.is_file() for line, code, skipped in extract_blocks(f.read_text())]


def _first_line(code: str) -> str:
    return next((l.strip() for l in code.splitlines() if l.strip()), "")


def _tiny():
    from tiny_models import laundry_model

    return laundry_model("llama", seed=5, num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4)


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    """Run every file's blocks once in order; ``{(file, line): exception text or None}``."""
    from hub_server import point_hub_at, serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from th_edit import ChannelEditor
    from th_edit.data import laundry_list
    from th_edit.sharing import bundled_models as models_mod

    root = tmp_path_factory.mktemp("docs")
    server, state = serve(root / "hub", {"hf_test_me_write": "me"})
    model, tok = _tiny()
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    results: dict[tuple[str, int], str | None] = {}
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def load_tiny(*args, **kwargs):
        return real_model(path, attn_implementation="eager").eval(), real_tok(path)

    def model_from(name, *a, **kw):
        return real_model(path if str(name) in models_mod.BUNDLED else name, *a, **kw)

    def tok_from(name, *a, **kw):
        return real_tok(path if str(name) in models_mod.BUNDLED else name, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        point_hub_at(mp, state.endpoint)
        mp.setenv("HF_TOKEN", "hf_test_me_write")
        mp.setattr(models_mod, "load_model", load_tiny)
        mp.setattr(models_mod, "load_default_model", load_tiny)
        mp.setattr(AutoModelForCausalLM, "from_pretrained", model_from)
        mp.setattr(AutoTokenizer, "from_pretrained", tok_from)
        import th_edit.models as face

        mp.setattr(face, "load_model", load_tiny, raising=False)
        mp.setattr(face, "load_default_model", load_tiny, raising=False)
        for doc in DOC_FILES:
            work = root / f"work-{doc.stem}"
            work.mkdir()
            mp.chdir(work)
            m, t = load_tiny()
            data = laundry_list(t, lengths=[3, 5, 8, 10, 15, 20], n_per_length=100, seed=0)
            enc = t([r["prompt"] for r in data["test"].select(range(4))], return_tensors="pt", padding=True)
            ns = {"__name__": "__doc__", "path": str(path), "model": m, "tokenizer": t, "base_model": load_tiny()[0],
                  "editor": ChannelEditor(m, tokenizer=t), "data": data, "batch": dict(enc), "torch": torch}
            for f, line, code, skipped in BLOCKS:
                if f != doc or skipped:
                    continue
                try:
                    exec(compile(code, f"{doc.name}:{line}", "exec"), ns)
                    results[(doc.name, line)] = None
                except Exception:  # noqa: BLE001 - reported per block
                    results[(doc.name, line)] = traceback.format_exc(limit=-3)
    server.shutdown()
    return results


@pytest.mark.parametrize("doc,line,code,skipped", BLOCKS,
                         ids=[f"{f.name}:{line}" for f, line, _, _ in BLOCKS])
def test_doc_block_runs(doc_runs, doc, line, code, skipped, request):
    if skipped:
        pytest.skip(f"marked {NO_TEST}")
    why = KNOWN_FAILING.get((doc.name, _first_line(code)))
    if why:
        request.applymarker(pytest.mark.xfail(reason=why, strict=False))
    error = doc_runs[(doc.name, line)]
    assert error is None, f"{doc.name} line {line}:\n{code}\n\n{error}"


def test_extraction_and_the_skip_marker():
    text = "intro\n```python\nx = 1\n```\n\n<!-- no-test -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert extract_blocks(text) == [(2, "x = 1", False), (8, "raise SystemExit", True)]
    skipped = [b for b in BLOCKS if b[3]]
    assert len(skipped) <= max(2, len(BLOCKS) // 5), "keep <!-- no-test --> blocks few"


def test_every_cli_flag_has_help_and_version_prints(capsys):
    import argparse

    from th_edit import __version__
    from th_edit.app.cli import main
    from th_edit.app.parser import build_parser

    parser = build_parser()
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    missing = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in parsers for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    assert not missing, f"flags without help: {missing}"
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"th-edit {__version__}"
