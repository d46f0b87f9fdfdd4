"""The figures of a chaos run: per fault and in total, from the stores and the worker logs.

An update's outcome is its ``QuantityLog`` (applied) or a ``FailedUpdate`` that is not
``retried`` (a retried dead letter is waiting for its new outcome). An injection's
recovery is the time from the fault's end until every update accepted before that
moment had its outcome: ``None`` when one never had.
"""

from __future__ import annotations

import re
import statistics
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo.database import Database

# Celery's worker log line: "[2026-11-23 04:30:18,864: INFO/MainProcess] Task ...[id] ..."
LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
DUPLICATE = "'status': 'duplicate'"
RETRY = " retry: Retry in "
RECOVERY_GOAL_S = 5.0
UNCONSUMED_GOAL_S = 5.0  # partitioned: a queue with waiting updates is consumed again within this
IN_CHUNK = 2000  # request ids per $in query
Update = tuple[str, str, int]  # work order, kind, quantity
Db = Database[dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    at: float  # epoch seconds: the log's created_at, or the dead letter's last failure
    applied: bool


@dataclass
class Injection:
    """One injection of a fault: from ``started`` to ``ended`` (the fault's end), then its recovery."""

    key: str
    started: float
    ended: float = 0.0
    settled: float = 0.0  # when the harness saw every earlier update with its outcome (or gave up)
    excluded: frozenset[str] = frozenset()  # left unsettled by earlier injections: theirs, not ours
    pending_at_start: int = 0  # of those, still without an outcome when this one began
    problems: list[str] = field(default_factory=list)
    last: tuple[str, ...] = ()  # the request ids whose outcomes the harness saw last, to say why


@dataclass
class Row:
    """One fault over all its injections."""

    key: str
    fault: str
    goal_s: float = RECOVERY_GOAL_S  # the fault's worst recovery may be this long
    injected: int = 0
    sent: int = 0
    applied: int = 0
    duplicates: int = 0  # suppressed by the worker: answered "duplicate", counted nothing
    retries: int = 0
    failed: int = 0
    lost: int = 0
    recoveries: list[float | None] = field(default_factory=list)
    overlapped: list[int] = field(default_factory=list)  # earlier updates pending at each start
    problems: list[str] = field(default_factory=list)
    # Partitioned runs (``chaoswatch.charge``): the worst unconsumed gap of each injection,
    # the gaps over the goal as told, and the double consumers seen.
    unconsumed: list[float] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    doubles: list[str] = field(default_factory=list)

    @property
    def worst_s(self) -> float | None:
        if not self.recoveries or None in self.recoveries:
            return None
        return max(r for r in self.recoveries if r is not None)

    @property
    def median_s(self) -> float | None:
        done = [r for r in self.recoveries if r is not None]
        return statistics.median(done) if done else None

    @property
    def meets_goal(self) -> bool:
        worst = self.worst_s
        return worst is not None and worst <= self.goal_s

    @property
    def worst_unconsumed_s(self) -> float:
        return max(self.unconsumed, default=0.0)

    @property
    def unconsumed_goal_s(self) -> float:
        """A fault with a recovery goal of its own (a silent Redis) leaves queues that long."""
        return max(UNCONSUMED_GOAL_S, self.goal_s)


class Accepted:
    """What the producer side had accepted: request id -> update, and when; shared by threads."""

    def __init__(self) -> None:
        self.accepted: dict[str, Update] = {}
        self.accepted_at: dict[str, float] = {}  # request id -> epoch seconds of its first acceptance
        self.times: list[float] = []  # every accepted send, duplicates included
        self._lock = threading.Lock()

    def accept(self, request_id: str, update: Update, at: float) -> bool:
        """Record one accepted send; False when the request id was accepted before."""
        with self._lock:
            self.times.append(at)
            first = request_id not in self.accepted
            self.accepted.setdefault(request_id, update)
            self.accepted_at.setdefault(request_id, at)
            return first

    def before(self, at: float) -> set[str]:
        """Request ids first accepted at or before ``at``."""
        with self._lock:
            return {rid for rid, t in self.accepted_at.items() if t <= at}


def outcomes(db: Db, request_ids: Iterable[str] | None = None) -> dict[str, Outcome]:
    """The outcome of each request id (of all when ``request_ids`` is None) that has one."""
    found: dict[str, Outcome] = {}
    for query in _queries(request_ids):
        for doc in db.failed_updates.find(
            {**query, "status": {"$ne": "retried"}}, {"request_id": 1, "last_failed_at": 1}
        ):
            found[doc["request_id"]] = Outcome(_epoch(doc["last_failed_at"]), applied=False)
        for doc in db.quantity_logs.find(query, {"request_id": 1, "created_at": 1}):
            found[doc["request_id"]] = Outcome(_epoch(doc["created_at"]), applied=True)
    return found


def _queries(request_ids: Iterable[str] | None) -> Iterator[dict[str, Any]]:
    if request_ids is None:
        yield {}
        return
    ids = list(request_ids)
    for i in range(0, len(ids), IN_CHUNK):
        yield {"request_id": {"$in": ids[i : i + IN_CHUNK]}}


def _epoch(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def recovery_s(inj: Injection, sent: Accepted, done: dict[str, Outcome]) -> float | None:
    """Seconds from the fault's end until every update accepted before it had its outcome."""
    waited = sent.before(inj.ended) - inj.excluded
    if any(rid not in done for rid in waited):
        return None
    return max([0.0, *(done[rid].at - inj.ended for rid in waited)])


def unsettled(inj: Injection, sent: Accepted, done: dict[str, Outcome]) -> set[str]:
    """The injection's updates (accepted before its end, not an earlier one's) with no outcome."""
    return {rid for rid in sent.before(inj.ended) - inj.excluded if rid not in done}


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


def add_injection(
    row: Row, inj: Injection, db: Db, sent: Accepted, events: dict[str, list[float]], done: dict[str, Outcome]
) -> None:
    """Add one injection's figures, counted from its start until it had recovered, to ``row``."""
    start, end = inj.started, max(inj.settled, inj.ended)
    window = {"$gte": utc(start), "$lte": utc(end)}
    row.injected += 1
    row.sent += len([t for t in sent.times if start <= t <= end])
    row.applied += db.quantity_logs.count_documents({"created_at": window})
    row.failed += db.failed_updates.count_documents({"first_failed_at": window})
    row.duplicates += len([t for t in events["duplicates"] if start <= t <= end])
    row.retries += len([t for t in events["retries"] if start <= t <= end])
    row.lost += len(unsettled(inj, sent, done))
    row.recoveries.append(recovery_s(inj, sent, done))
    row.overlapped.append(inj.pending_at_start)
    row.problems.extend(inj.problems)


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def counting_errors(db: Db, sent: Accepted, done: dict[str, Outcome]) -> tuple[set[str], set[str], int]:
    """Lost request ids, dead-lettered ones, and units counted beyond what was applied.

    Every accepted update of the run is valid and applicable, so a dead letter that stayed
    one is an error too; it is left out of the expected counters.
    """
    lost = {rid for rid in sent.accepted if rid not in done}
    dead = {rid for rid in sent.accepted if rid in done and not done[rid].applied}
    expected: dict[tuple[str, str], int] = {}
    for rid, (wo, kind, qty) in sent.accepted.items():
        if rid not in dead:
            expected[wo, kind] = expected.get((wo, kind), 0) + qty
    double = 0
    for doc in db.work_orders.find({}, {"input_qty": 1, "output_qty": 1}):
        for kind in ("input", "output"):
            double += max(0, int(doc.get(f"{kind}_qty") or 0) - expected.get((doc["_id"], kind), 0))
    return lost, dead, double


COLUMNS = (("fault", 37), ("times", 6), ("sent", 7), ("applied", 9), ("dups", 6), ("retries", 9),
           ("failed", 8), ("lost", 6), ("worst s", 9), ("median s", 10))  # fmt: skip
UNCONSUMED_COLUMN = ("unconsumed s", 14)  # partitioned runs: the worst gap of any queue


def table(rows: list[Row], totals: dict[str, int], partitioned: bool = False) -> str:
    """The run as a text table, one line per fault, then the totals (the last line)."""
    columns = (*COLUMNS, UNCONSUMED_COLUMN) if partitioned else COLUMNS
    head = _line([name for name, _ in columns], columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [r.fault, r.injected, r.sent, r.applied, r.duplicates, r.retries, r.failed,
                 r.lost, _seconds(r.worst_s), _seconds(r.median_s)]  # fmt: skip
        lines.append(_line([*cells, f"{r.worst_unconsumed_s:.1f}"] if partitioned else cells, columns))
    lines.append("-" * len(head))
    lines.append("  ".join(f"{k}={v}" for k, v in totals.items()))
    return "\n".join(lines)


def _line(cells: list[Any], columns: tuple[tuple[str, int], ...]) -> str:
    return "".join(
        f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
        for i, (v, (_, w)) in enumerate(zip(cells, columns, strict=True))
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def _goals_apart(rows: list[Row]) -> str:
    """The faults whose goal is not the common one: ``" (redis-silent 60 s)"``, or nothing."""
    apart = [f"{r.key} {r.goal_s:g} s" for r in rows if r.goal_s != RECOVERY_GOAL_S and r.injected]
    return f" ({', '.join(apart)})" if apart else ""


def verdict(
    rows: list[Row], totals: dict[str, int], recovery_goal: bool, partitioned: bool = False
) -> tuple[bool, list[str]]:
    """Whether the run met its goal, and the lines that say so."""
    checks = {
        "lost = 0": totals["lost"] == 0,
        "double-counted = 0": totals["double_counted"] == 0,
        "audit clean": totals["audit_findings"] == 0,
        "continuous verification: no false alarm": totals.get("verify_false_alarms", 0) == 0,
        "nothing dead-lettered": totals["dead_lettered"] == 0,
        "every bad input refused or dead-lettered": totals["bad_accounted"] == totals["bad_sent"],
        "no valid update refused": totals["producer_refused"] == 0,
        "every fault's own checks": not any(r.problems for r in rows),
    }
    slow = [r for r in rows if not r.meets_goal]
    lines = [f"goal: lost = 0, double-counted = 0, audit clean, worst recovery <= {RECOVERY_GOAL_S:g} s "
             f"for every fault{_goals_apart(rows)}"]  # fmt: skip
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in checks.items()]
    lines += [f"       {r.key}: {p}" for r in rows for p in r.problems]
    mark = "ok  " if not slow else "FAIL" if recovery_goal else "over"
    waived = "" if recovery_goal else " (not required: --no-recovery-goal)"
    lines.append(f"  {mark} worst recovery <= {RECOVERY_GOAL_S:g} s{_goals_apart(rows)}{waived}")
    lines += [f"       {r.key}: worst {_seconds(r.worst_s)} s{_overlap(r)}" for r in slow]
    ok = all(checks.values()) and (not slow or not recovery_goal)
    if partitioned:
        held, more = _consumption(rows, recovery_goal)
        return ok and held, lines + more
    return ok, lines


def _consumption(rows: list[Row], time_goal: bool) -> tuple[bool, list[str]]:
    """The partitioned run's own goals: every queue consumed again in time, by one worker.

    ``time_goal`` False (``--no-recovery-goal``): a late queue is reported, not failed.
    """
    gaps = [r for r in rows if r.worst_unconsumed_s > r.unconsumed_goal_s]
    doubled = [r for r in rows if r.doubles]
    mark = "ok  " if not gaps else "FAIL" if time_goal else "over"
    waived = "" if time_goal else " (not required: --no-recovery-goal)"
    apart = _goals_apart(rows)
    lines = [f"  {mark} every queue with waiting updates consumed again within {UNCONSUMED_GOAL_S:g} s "
             f"of the fault's end (of its start: a change of the fleet){apart}{waived}"]  # fmt: skip
    lines += [f"       {r.key}: {gap}" for r in gaps for gap in r.gaps]
    lines.append(f"  {'FAIL' if doubled else 'ok  '} never two consumers on one queue")
    lines += [f"       {r.key}: {d}" for r in doubled for d in r.doubles]
    return (not gaps or not time_goal) and not doubled, lines


def _overlap(row: Row) -> str:
    """Why a slow fault may be slow for an earlier one's sake."""
    hit = [n for n in row.overlapped if n]
    if not hit:
        return ""
    return (f" ({len(hit)} of {row.injected} injection(s) began while {max(hit)} update(s) of "
            "earlier faults were still pending)")  # fmt: skip
