"""The package's layers import only downward (see ARCHITECTURE.md); lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import th_edit

#: lowest first; a module may import modules of its own layer or of layers listed before it
LAYERS = [
    ("base", ["th_edit._version", "th_edit.errors"]),
    ("utils", ["th_edit.utils"]),
    ("core", ["th_edit.core"]),
    ("tasks", ["th_edit.tasks"]),
    ("edits", ["th_edit.edits"]),
    ("analysis", ["th_edit.analysis"]),
    ("sharing", ["th_edit.sharing"]),
    ("editor", ["th_edit.editor"]),
    ("app", ["th_edit.app"]),
    ("faces", ["th_edit", "th_edit.data", "th_edit.evaluate", "th_edit.models", "th_edit.__main__"]),
]


def layer_of(module: str, layers=LAYERS) -> int:
    """Index of the layer holding ``module`` (the longest matching prefix wins)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md")
    return best


def module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_of(root: Path, path: Path, package: str) -> set[str]:
    """Every ``package`` module that ``path`` imports, at any depth of the file (relative imports resolved)."""
    me = module_name(root, path, package)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            out.add(target)
            for a in node.names:  # `from . import x` may name a submodule
                if (root / Path(*target.split(".")[1:]) / f"{a.name}.py").exists() or (
                        root / Path(*target.split(".")[1:]) / a.name / "__init__.py").exists():
                    out.add(f"{target}.{a.name}")
    return out


def upward_imports(root: Path, package: str, layers=LAYERS) -> list[str]:
    """``"a -> b (layer x imports layer y)"`` for every import that runs up the layers."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(root, path, package)
        mine = layer_of(me, layers)
        for target in sorted(imports_of(root, path, package)):
            theirs = layer_of(target, layers)
            if theirs > mine:
                bad.append(f"{me} -> {target} ({layers[mine][0]} imports {layers[theirs][0]})")
    return bad


def test_the_package_imports_only_downward():
    root = Path(th_edit.__file__).parent
    assert upward_imports(root, "th_edit") == []


def test_every_module_sits_in_a_layer():
    root = Path(th_edit.__file__).parent
    for path in root.rglob("*.py"):
        layer_of(module_name(root, path, "th_edit"))


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "th_edit"
    for sub in ("core", "app"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "maths.py").write_text("def f():\n    from ..app import cli  # lazy, still upward\n")
    (pkg / "app" / "cli.py").write_text("from ..core.maths import f\n")
    assert upward_imports(pkg, "th_edit") == ["th_edit.core.maths -> th_edit.app (core imports app)",
                                              "th_edit.core.maths -> th_edit.app.cli (core imports app)"]
