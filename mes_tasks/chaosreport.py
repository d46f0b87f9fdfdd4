"""The figures of a chaos run: per fault window and in total, from the stores and the worker logs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

# Celery's worker log line: "[2026-11-23 04:30:18,864: INFO/MainProcess] Task ...[id] ..."
LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
DUPLICATE = "'status': 'duplicate'"
RETRY = " retry: Retry in "


@dataclass
class Row:
    """One fault: when it was injected and what happened to the updates around it."""

    fault: str
    injected: int = 0
    sent: int = 0
    applied: int = 0
    duplicates: int = 0  # suppressed by the worker: answered "duplicate", counted nothing
    retries: int = 0
    failed: int = 0
    lost: int = 0
    recovery_s: float | None = None
    window: tuple[datetime, datetime] | None = None


@dataclass
class Sent:
    """What the producer had accepted: request id -> (work order, kind, quantity), and when."""

    accepted: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    first_sent: dict[str, float] = field(default_factory=dict)  # request id -> epoch seconds
    times: list[float] = field(default_factory=list)  # every send, duplicates included


def worker_events(logs: Iterable[Path]) -> dict[str, list[float]]:
    """Epoch seconds of every suppressed duplicate and every retry in the worker logs."""
    events: dict[str, list[float]] = {"duplicates": [], "retries": []}
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            stamp = LOG_STAMP.match(line)
            if stamp is None:
                continue
            at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            if DUPLICATE in line:
                events["duplicates"].append(at)
            elif RETRY in line:
                events["retries"].append(at)
    return events


def fill_row(row: Row, sent: Sent, events: dict[str, list[float]], lost: set[str]) -> None:
    """Count the row's figures inside its window, from ``sent``, the stores and ``events``."""
    from mes_tasks.models import FailedUpdate, QuantityLog

    assert row.window is not None
    start, end = row.window
    inside = _between(start.timestamp(), end.timestamp())
    in_window = {"$gte": start, "$lte": end}
    row.sent = len([t for t in sent.times if inside(t)])
    row.applied = QuantityLog._get_collection().count_documents({"created_at": in_window})
    row.failed = FailedUpdate._get_collection().count_documents({"first_failed_at": in_window})
    row.duplicates = len([t for t in events["duplicates"] if inside(t)])
    row.retries = len([t for t in events["retries"] if inside(t)])
    row.lost = len([rid for rid in lost if inside(sent.first_sent[rid])])


def _between(start: float, end: float) -> Callable[[float], bool]:
    return lambda t: start <= t <= end


def lost_and_double_counted(sent: Sent) -> tuple[set[str], int]:
    """Accepted requests with no outcome; units counted beyond the distinct accepted requests."""
    from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder

    expected: dict[tuple[str, str], int] = {}
    for wo, kind, qty in sent.accepted.values():
        expected[wo, kind] = expected.get((wo, kind), 0) + qty
    outcomes = {d["request_id"] for d in QuantityLog._get_collection().find({}, {"request_id": 1})}
    outcomes |= {d["request_id"] for d in FailedUpdate._get_collection().find({}, {"request_id": 1})}
    lost = {rid for rid in sent.accepted if rid not in outcomes}
    double = 0
    for doc in WorkOrder.objects:
        for kind, value in (("input", doc.input_qty), ("output", doc.output_qty)):
            double += max(0, value - expected.get((doc.id, kind), 0))
    return lost, double


COLUMNS = (("fault", 30), ("times", 6), ("sent", 7), ("applied", 9), ("dups", 6), ("retries", 9),
           ("failed", 8), ("lost", 6), ("recovery s", 12))  # fmt: skip


def table(rows: list[Row], totals: dict[str, int]) -> str:
    """The run as a text table, one line per fault, then the totals."""
    head = "".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in rows:
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        cells = (r.fault, r.injected, r.sent, r.applied, r.duplicates, r.retries, r.failed, r.lost, rec)
        lines.append("".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, (_, w)) in
                             enumerate(zip(cells, COLUMNS, strict=True))))  # fmt: skip
    lines.append("-" * len(head))
    lines.append("  ".join(f"{k}={v}" for k, v in totals.items()))
    return "\n".join(lines)
