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


def _fake_package(tmp_path: Path, *subpackages: str) -> Path:
    """An empty ``th_edit`` package under ``tmp_path`` with the given (empty) sub-packages."""
    pkg = tmp_path / "th_edit"
    for sub in subpackages:
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    return pkg


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = _fake_package(tmp_path, "core", "app")
    (pkg / "core" / "maths.py").write_text("def f():\n    from ..app import cli  # lazy, still upward\n")
    (pkg / "app" / "cli.py").write_text("from ..core.maths import f\n")
    assert upward_imports(pkg, "th_edit") == ["th_edit.core.maths -> th_edit.app (core imports app)",
                                              "th_edit.core.maths -> th_edit.app.cli (core imports app)"]


# ----- the facade is not passed down --------------------------------------------------------------
#: layers whose functions take explicit inputs (layout, edit log, model, tokenizer...), never an editor
NO_EDITOR_LAYERS = ("utils", "core", "tasks", "edits", "sharing")


def _arguments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    return [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]


def editor_parameters(root: Path, package: str, layers=LAYERS) -> list[str]:
    """``"module:function(editor: annotation)"`` for every parameter named like an editor below the facade
    that breaks the rule: none under utils/core/tasks/edits/sharing, typed ``HeadEditor`` under analysis."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(root, path, package)
        layer = layers[layer_of(me, layers)][0]
        if layer not in (*NO_EDITOR_LAYERS, "analysis"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for arg in _arguments(node):
                if arg.arg not in ("editor", "editor_or_model", "editor_cls"):
                    continue
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
                if layer == "analysis" and arg.arg == "editor" and annotation in ("HeadEditor", "'HeadEditor'"):
                    continue
                bad.append(f"{me}:{node.name}({arg.arg}: {annotation})")
    return bad


def test_no_editor_is_passed_below_the_facade():
    root = Path(th_edit.__file__).parent
    assert editor_parameters(root, "th_edit") == []


def test_the_checker_catches_an_editor_parameter(tmp_path):
    pkg = _fake_package(tmp_path, "edits", "analysis")
    (pkg / "edits" / "fit.py").write_text("def fit(editor, tokenizer):\n    pass\n")
    (pkg / "analysis" / "roles.py").write_text(
        "def a(editor: HeadEditor):\n    pass\n\ndef b(editor):\n    pass\n\nclass C:\n    def m(self, *, editor=None):\n        pass\n")
    assert editor_parameters(pkg, "th_edit") == ["th_edit.analysis.roles:b(editor: None)",
                                                 "th_edit.analysis.roles:m(editor: None)",
                                                 "th_edit.edits.fit:fit(editor: None)"]


# ----- no import circle inside a layer ------------------------------------------------------------
def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Every import circle among the package's modules (module-level and lazy imports alike; a module
    importing its own package's ``__init__`` is not counted), each as a list of modules, smallest first."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        me = module_name(root, path, package)
        graph[me] = {t for t in imports_of(root, path, package) if t != me and not me.startswith(t + ".")}
    for targets in graph.values():
        targets &= set(graph)
    cycles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_circle():
    root = Path(th_edit.__file__).parent
    assert import_cycles(root, "th_edit") == []


def test_the_checker_catches_a_circle(tmp_path):
    pkg = _fake_package(tmp_path, "edits")
    (pkg / "edits" / "plan.py").write_text("from . import plan_checks\n")
    (pkg / "edits" / "plan_checks.py").write_text("def f():\n    from .scale import make_edit  # lazy\n")
    (pkg / "edits" / "scale.py").write_text("from .plan import Edit\n")
    (pkg / "edits" / "steering.py").write_text("from .scale import make_edit\n")
    assert import_cycles(pkg, "th_edit") == [["th_edit.edits.plan", "th_edit.edits.plan_checks", "th_edit.edits.scale"]]
