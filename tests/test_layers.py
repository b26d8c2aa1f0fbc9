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
    ("preftune.errors",),
    ("preftune.config", "preftune.run_dir"),
    ("preftune.data",),
    ("preftune.losses", "preftune.modeling"),
    ("preftune.training",),
    ("preftune.tools",),
    ("preftune.config_checks", "preftune.recipe", "preftune.cli", "preftune.__main__", "preftune"),
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


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)}) at line {line}"
        for source, targets in graph().items()
        if source != "preftune"
        for target, line in targets
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    edges = {source: {t for t, _ in targets if t != "preftune"} for source, targets in graph().items()}
    lines = {(s, t): line for s, targets in graph().items() for t, line in targets}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            arrows = [f"{a} -> {b} (line {lines[a, b]})" for a, b in itertools.pairwise(cycle)]
            pytest.fail("import circle:\n" + "\n".join(arrows))


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
