"""Issue 13, High: a non-editable wheel installed with ``pip install --target`` renders cards and saves models
(templates are package data read with importlib.resources, never looked up under ``sys.prefix``)."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import sys, pathlib
    import th_edit
    assert pathlib.Path(th_edit.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()), th_edit.__file__
    from transformers import GPT2Config, GPT2LMHeadModel
    from th_edit import ChannelEditor
    from th_edit.sharing.cards import template_text
    editor = ChannelEditor(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16)))
    editor.scale_component(1, 0, "ov", 0, 0.0)
    assert "th_edit" in str(editor.model_card(repo_id="me/x"))
    assert all(template_text(n) for n in ("edited_model", "edit_plan", "dataset"))
    editor.save_pretrained(sys.argv[2])
    print("OK", th_edit.__file__)
''')


def _copy_sources(dest: Path) -> None:
    """The files a build needs, without build outputs of the checkout (so nothing is written there)."""
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "th_edit", dest / "th_edit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_wheel_installed_with_target_renders_cards_and_saves(tmp_path):
    src, dist, target, out = tmp_path / "src", tmp_path / "dist", tmp_path / "target", tmp_path / "saved"
    src.mkdir()
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=120)
    if built.returncode and "No module named" in built.stderr:
        pytest.skip(f"cannot build wheels offline here: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    wheel = next(dist.glob("th_edit-*.whl"))
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert not (target / "share").exists()  # nothing outside the package
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HOME": str(tmp_path), "TH_EDIT_DISABLE_PROGRESS": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(target), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "README.md").read_text().count("th_edit")
