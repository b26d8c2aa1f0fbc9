"""The package's import graph: every module imports only from its own layer or below (function-local imports
included), and no module reaches itself through its imports (no circle)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "preftune"

# Lowest first. A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[str, ...]] = [
    ("preftune.errors", "preftune.file_modes"),
    ("preftune.config", "preftune.run_dir"),
    ("preftune.data",),
    ("preftune.losses", "preftune.modeling"),
    ("preftune.training",),
    ("preftune.tools",),
    (
        "preftune.config_checks",
        "preftune.recipe",
        "preftune.sweep",
        "preftune.cli",
        "preftune.__main__",
        "preftune",
    ),
]


def layer_of(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "preftune"):
            return level
    if module == "preftune":  # the package itself re-exports the public names: it sits on top
        return len(LAYERS) - 1
    raise AssertionError(f"{module}: no layer for it in tests/test_layers.py (add it, and to docs/LAYOUT.md)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported preftune module, line) for every import in the file, at any depth; ``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        found.extend((name, node.lineno) for name in names if name.split(".")[0] == "preftune")
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: [(t, line) for t, line in imports(path, known) if t != name] for name, path in mods.items()}


def test_no_relative_imports() -> None:
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{path}:{node.lineno}: relative import in {name}; import from preftune.*")


def upward(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Every import of a higher layer, as a line naming it."""
    return [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)}) at line {line}"
        for source, targets in graph.items()
        if source != "preftune"
        for target, line in targets
        if layer_of(target) > layer_of(source)
    ]


def circle(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One import circle as its arrows ([] when there is none)."""
    edges = {source: sorted({t for t, _ in targets if t != "preftune"}) for source, targets in graph.items()}
    lines = {(s, t): line for s, targets in graph.items() for t, line in targets}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return [f"{a} -> {b} (line {lines[a, b]})" for a, b in itertools.pairwise(cycle)]
    return []


def test_no_import_goes_up_a_layer() -> None:
    found = upward(graph())
    assert not found, "imports up the layers:\n" + "\n".join(found)


def test_no_import_circle() -> None:
    found = circle(graph())
    assert not found, "import circle:\n" + "\n".join(found)


def test_the_checks_find_a_function_local_upward_import_and_a_circle(tmp_path) -> None:
    source = tmp_path / "model.py"
    source.write_text(
        "def f():\n    from preftune.training.trainer import DPOTrainer\n    return DPOTrainer\n"
    )
    found = imports(source, {"preftune.training.trainer"})
    assert found == [("preftune.training.trainer", 2)]
    assert upward({"preftune.modeling.model": found}) == [
        "preftune.modeling.model (layer 3) imports preftune.training.trainer (layer 4) at line 2"
    ]
    two = {"preftune.data.a": [("preftune.data.b", 3)], "preftune.data.b": [("preftune.data.a", 7)]}
    assert circle(two) == [
        "preftune.data.a -> preftune.data.b (line 3)",
        "preftune.data.b -> preftune.data.a (line 7)",
    ]


def test_the_layer_rules_catch_what_they_should() -> None:
    """The checker itself: a lower module importing a higher one is found, and the layer order is the
    documented one."""
    assert layer_of("preftune.errors") < layer_of("preftune.config") < layer_of("preftune.data.batch")
    assert (
        layer_of("preftune.data.batch") < layer_of("preftune.losses") == layer_of("preftune.modeling.model")
    )
    assert layer_of("preftune.modeling.model") < layer_of("preftune.training.trainer")
    assert (
        layer_of("preftune.training.trainer") < layer_of("preftune.tools.report") < layer_of("preftune.cli")
    )
    assert layer_of("preftune.config_checks") == layer_of("preftune.recipe") == layer_of("preftune.cli")


def test_every_module_is_listed_in_the_layout_doc() -> None:
    layout = (PACKAGE.parent / "docs" / "LAYOUT.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in modules().values()
        if path.name != "__init__.py" and f"`{path.relative_to(PACKAGE.parent)}`" not in layout
    ]
    assert not missing, f"modules not in docs/LAYOUT.md: {', '.join(missing)}"


def test_importing_changes_no_warning_filter() -> None:
    """No module calls ``warnings.filterwarnings`` / ``simplefilter`` at import (outside any function): the
    library silences a warning only around the call that emits it."""
    found = []
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            for call in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") in (
                    "filterwarnings",
                    "simplefilter",
                ):
                    found.append(f"{name}:{call.lineno}")
    assert not found, f"warning filters changed at import: {', '.join(found)}"


def test_no_function_is_over_60_lines() -> None:
    """A function reads in one screen (its signature and docstring counted): longer ones are split into named
    steps."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)"
                    )
    assert not long, "functions over 60 lines: " + "; ".join(long)
