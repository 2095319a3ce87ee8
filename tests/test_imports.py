"""The package's import graph: no module of ``vforge/`` imports, even lazily or for type checking only, a module
that imports it back (directly or around a longer loop); and no library module imports an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vforge"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (top level, functions,
    ``if TYPE_CHECKING``), relative imports resolved; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        path.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if colour[start] == 0 and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "vforge"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "a.py").write_text("from . import b\n")
    (pkg / "training" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from vforge.training.c import X\n")
    (pkg / "training" / "c.py").write_text("def f():\n    from .a import g\n")
    graph = import_graph(pkg)
    assert graph["vforge.training.a"] == {"vforge.training.b"}
    assert find_cycle(graph) == ["vforge.training.a", "vforge.training.b", "vforge.training.c", "vforge.training.a"]
    (pkg / "training" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_vforge_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "vforge.training.loop" in graph["vforge.train"]  # the walk sees the package
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))


ENTRY_POINTS = {"vforge.train", "vforge.predict", "vforge.export", "vforge.automl"}


def test_no_library_module_imports_an_entry_point():
    graph = import_graph()
    assert "vforge.serving" in graph["vforge.predict"] and "vforge.serving" in graph["vforge.tracking.registry"]
    offenders = {m: sorted(deps & ENTRY_POINTS) for m, deps in graph.items()
                 if m not in ENTRY_POINTS and deps & ENTRY_POINTS}
    assert not offenders, f"library modules importing entry points: {offenders}"
