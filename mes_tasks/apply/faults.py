"""The one fault-injection seam: named points on the commit path where a test injects a fault.

Production installs no fault; a point is then one dictionary lookup. A test installs one
in-process (``injected``), or starts a worker through ``devtools.faultworker``, which installs
one before Celery starts. The points sit where production's own order of checks puts them,
so whatever a test does at a point meets the checks that production runs after it:

* ``BEGUN``: the update's transaction has started, before any write and before the lock
  check is sent. A lock stolen here is caught by that check (``LockLost``).
* ``WRITTEN``: every write is done and the lock check has answered; the commit is next. A
  crash here leaves nothing; a worker held here holds an open transaction, as one that
  dies mid-commit does.
* ``COMMITTED``: a group's transaction has committed; its messages are not yet acknowledged
  (``worker.grouping``). A crash here leaves committed updates whose messages come back:
  duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

BEGUN = "begun"
WRITTEN = "written"
COMMITTED = "committed"
POINTS = (BEGUN, WRITTEN, COMMITTED)

Fault = Callable[[], None]

_installed: dict[str, Fault] = {}


def at(point: str) -> None:
    """Run the fault installed at ``point``, if any (production: none)."""
    fault = _installed.get(point)
    if fault is not None:
        fault()


def install(point: str, fault: Fault) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; the points are {', '.join(POINTS)}")
    _installed[point] = fault


def remove(point: str) -> None:
    _installed.pop(point, None)


@contextmanager
def injected(point: str, fault: Fault) -> Iterator[None]:
    """``fault`` runs each time the commit path passes ``point``, inside this block."""
    install(point, fault)
    try:
        yield
    finally:
        remove(point)
