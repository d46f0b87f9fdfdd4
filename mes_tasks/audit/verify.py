"""Continuous verification: the counters proved against their logs every ``MES_VERIFY_INTERVAL_S``
at a cost in proportion to what changed, and every accepted update accounted for.

Each work order keeps a checkpoint (``VerifyCheckpoint``): its counters and its ``version`` at
a point where they were proved equal to the sums of its logs. Every log carries the work
order's version right after it (the ledger writes both in one transaction, under the lock
and the fence), so "the logs since the checkpoint" are those with a greater version, read
through the ``wo_version`` index. A pass:

1. reads every work order's version and counters, and every checkpoint: one read each,
   whose cost grows with the number of work orders, never with the number of logs;
2. a work order at its checkpoint's version must have its checkpoint's counters: a counter
   changed without a version (a direct ``$inc``) makes it a suspect;
3. a work order whose version moved is advanced: its counters and its logs since the
   checkpoint, read in one snapshot transaction (one point in time, however updates flow);
   counters = checkpoint + those logs moves the checkpoint forward. Anything else (a counter
   restored from an old backup, a write that moved the version too, a log written by a
   worker of an earlier release, which carries no version) makes it a suspect;
4. a work order with a log deleted, edited or replaced since the last pass, or with a new
   log whose version is above the work order's (restored from a backup), read from the logs'
   change stream (``audit.logwatch``), is a suspect too: found in one pass without reading
   the logs that did not change;
5. every suspect is proved in full, in a snapshot, as the nightly audit re-checks: its
   counters against the sums of all its logs. A mismatch is drift; a match sets a new
   checkpoint. So nothing that made a work order a suspect is ever a false alarm, and a
   checkpoint is only ever what a snapshot proved;
6. the sweep proves in full the ``MES_VERIFY_SWEEP`` work orders whose logs were summed
   longest ago: the independent re-check of every work order over (work orders / sweep)
   passes, should anything escape the stream;
7. completeness: an outbox entry sent more than ``MES_VERIFY_COMPLETE_S`` ago must have an
   outcome (a log, or a dead letter not being retried) or still be in the broker. One with
   neither, which the relay has not re-sent for ``quiet_s`` either, is unexplained. The
   relay marks an entry ``settled`` once its outcome exists; the pass deletes the entries
   settled before it began, after finding their outcome again (``_prune``), so the outbox
   is pruned only once completeness has accounted for an entry. The logs read since their
   checkpoints whose request id has no outbox entry (sent with ``MES_JOURNAL=0``, or by
   hand) are counted, looked up before the prune.

The first pass proves every work order in full (there is no checkpoint yet): once, at the
cost of a full audit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mes_tasks.audit import alerts, logwatch
from mes_tasks.audit.checks import Finding, compare, counters_of, snapshot, version_of
from mes_tasks.audit.reports import write_files
from mes_tasks.db import Mongo, mongo_errors
from mes_tasks.models import (
    COUNTER_FIELDS,
    OUTBOX_SETTLED,
    VERIFY_TRIGGER,
    VERSION,
    AuditReport,
    FailedUpdate,
    OutboxMessage,
    VerifyCheckpoint,
    VerifyState,
    WorkOrder,
    outbox_work_order,
    utcnow,
)
from mes_tasks.settings import Settings

log = logging.getLogger(__name__)

COUNTERS = tuple(COUNTER_FIELDS.values())
COMPLETE_PAGE = 1000  # outbox entries looked at per pass, oldest first
PRUNE_PAGES = 20  # pages of settled entries a pass accounts for; the rest wait for the next
RELAY_QUIET_S = 30.0  # an entry the relay has not sent for this long is not on its way again
UNEXPLAINED = "unexplained_update"

Settled = Callable[[Iterable[str]], set[str]]  # request ids with an outcome
Held = Callable[[], "dict[str, int] | None"]  # job ids the broker holds; None: it cannot be read


@dataclass
class VerifyOutcome:
    """What one pass proved and found."""

    started_at: datetime
    finished_at: datetime | None = None
    work_orders: int = 0
    changed: int = 0  # versions moved since their checkpoints
    proved: int = 0  # proved in full (suspects, new work orders, the sweep)
    logs_read: int = 0
    log_changes: int = 0  # logs deleted, edited or replaced behind mes_tasks's back (the stream)
    findings: list[Finding] = field(default_factory=list)
    unexplained: list[dict[str, Any]] = field(default_factory=list)
    completeness_checked: bool = False
    outbox_pruned: int = 0  # settled outbox entries accounted for and deleted
    logs_without_entry: int = 0  # logs read since their checkpoints whose request id has no outbox entry
    new_request_ids: list[str] = field(default_factory=list, repr=False)  # of those logs

    @property
    def drift(self) -> list[str]:
        return sorted({f.work_order_id for f in self.findings})


def verify_pass(
    mongo: Mongo,
    *,
    sweep: int,
    complete_s: float,
    settled: Settled,
    held: Held,
) -> VerifyOutcome:
    """One pass of continuous verification (see the module's doc)."""
    outcome = VerifyOutcome(started_at=utcnow())
    with mongo_errors():
        changes = logwatch.read_changes()  # first: a log changed after this is the next pass's
        outcome.log_changes = changes.events
        checkpoints = {c["_id"]: c for c in _checkpoints().find({})}
        suspects: list[str] = []
        for doc in WorkOrder._get_collection().find({"_id": {"$type": "string"}}, [VERSION, *COUNTERS]):
            outcome.work_orders += 1
            cp = checkpoints.pop(doc["_id"], None)
            if cp is None or cp.get("drift") or changes.named(doc["_id"], version_of(doc)):
                suspects.append(doc["_id"])
            elif version_of(doc) != version_of(cp):
                outcome.changed += 1
                if not _advance(mongo, doc["_id"], cp, outcome):
                    suspects.append(doc["_id"])
            elif counters_of(doc) != counters_of(cp):
                suspects.append(doc["_id"])
        if checkpoints:  # their work orders are gone: the nightly audit reports any logs left
            _checkpoints().delete_many({"_id": {"$in": list(checkpoints)}})
        oldest = _checkpoints().find({}, ["_id"]).sort("swept_at", 1).limit(sweep)
        swept = [c["_id"] for c in oldest] if sweep > 0 else []  # a limit of 0 is none
        for wo_id in dict.fromkeys([*suspects, *swept]):
            _prove(mongo, wo_id, outcome)
        logwatch.keep(changes)
        outcome.logs_without_entry = _without_entry(outcome.new_request_ids)  # before the prune
        outcome.unexplained, outcome.completeness_checked = _unexplained(complete_s, settled, held)
        outcome.outbox_pruned = _prune(outcome.started_at, settled)
    outcome.finished_at = utcnow()
    return outcome


def record(outcome: VerifyOutcome, settings: Settings) -> AuditReport | None:
    """Keep what the pass found (``VerifyState``, which the metrics read) and, when it found
    drift or an unexplained update the pass before had not, store a report and alert as the
    nightly audit does. Returns that report, if any."""
    with mongo_errors():
        before = VerifyState.objects(id="last").first()
        state = VerifyState(
            id="last",
            started_at=outcome.started_at,
            finished_at=outcome.finished_at,
            verified_up_to=outcome.started_at,
            work_orders=outcome.work_orders,
            changed=outcome.changed,
            logs_read=outcome.logs_read,
            drift=outcome.drift,
            unexplained=outcome.unexplained,
            completeness_checked=outcome.completeness_checked,
            outbox_pruned=outcome.outbox_pruned,
            logs_without_entry=outcome.logs_without_entry,
            logs_without_entry_total=outcome.logs_without_entry
            + (before.logs_without_entry_total if before else 0),
        )
        if not outcome.completeness_checked and before is not None:
            state.unexplained = before.unexplained  # not looked at this time: as last known
        state.save()
    known_drift = set(before.drift) if before is not None else set()
    known_ids = {u["request_id"] for u in before.unexplained} if before is not None else set()
    new_drift = set(outcome.drift) - known_drift
    new_unexplained = [u for u in outcome.unexplained if u["request_id"] not in known_ids]
    if not new_drift and not new_unexplained:
        return None
    findings = [asdict(f) for f in outcome.findings if f.work_order_id in new_drift]
    report = AuditReport(
        trigger=VERIFY_TRIGGER,
        started_at=outcome.started_at,
        finished_at=outcome.finished_at,
        work_orders_scanned=outcome.work_orders,
        logs_scanned=outcome.logs_read,
        rechecked=outcome.proved,
        findings=findings + new_unexplained,
        finding_count=len(findings) + len(new_unexplained),
    )
    with mongo_errors():
        report.save()
        report.files = write_files(report, Path(settings.reports_dir))
        report.save()
    alerts.announce(report, settings)
    return report


def _advance(mongo: Mongo, wo_id: str, cp: dict[str, Any], outcome: VerifyOutcome) -> bool:
    """Move ``wo_id``'s checkpoint to its current version if its counters equal the
    checkpoint plus its logs since; False (nothing moved) if not."""
    doc, sums = snapshot(mongo, wo_id, after_version=version_of(cp))
    if doc is None or version_of(doc) < version_of(cp):
        return False  # gone, or older than what was proved: restored from a backup
    outcome.logs_read += _logs_in(sums)
    expected = {f: int(cp[f]) + int(sums.get(kind, 0)) for kind, f in COUNTER_FIELDS.items()}
    if counters_of(doc) != expected:
        return False
    _save(wo_id, version_of(doc), expected)
    outcome.new_request_ids.extend(sums.get("request_ids") or ())
    return True


def _prove(mongo: Mongo, wo_id: str, outcome: VerifyOutcome) -> None:
    """Compare ``wo_id``'s counters with the sums of all its logs, in one snapshot; a new
    checkpoint when they agree, findings when they do not."""
    doc, sums = snapshot(mongo, wo_id)
    outcome.proved += 1
    outcome.logs_read += _logs_in(sums)
    if doc is None:
        return  # deleted meanwhile: the nightly audit reports logs without a work order
    found = compare(wo_id, doc, sums)
    if found:
        outcome.findings.extend(found)
        # proved again each pass until it is repaired (a deleted log leaves the counter at its
        # checkpoint); swept last
        _checkpoints().update_one({"_id": wo_id}, {"$set": {"swept_at": utcnow(), "drift": True}})
        return
    _save(wo_id, version_of(doc), counters_of(doc), swept=True)


def _logs_in(sums: dict[str, Any]) -> int:
    return sum(int(sums.get(f"{kind}_n", 0)) for kind in COUNTER_FIELDS)


def _unexplained(complete_s: float, settled: Settled, held: Held) -> tuple[list[dict[str, Any]], bool]:
    """The outbox entries sent over ``complete_s`` ago (and not re-sent for ``quiet_s``) that
    have no outcome and that the broker does not hold; False when the broker could not be read."""
    now = utcnow()
    quiet_s = min(complete_s, RELAY_QUIET_S)
    old = {
        "state": "sent",
        "created_at": {"$lt": now - timedelta(seconds=complete_s)},
        "sent_at": {"$lt": now - timedelta(seconds=quiet_s)},
    }
    page = list(OutboxMessage._get_collection().find(old).sort("created_at", 1).limit(COMPLETE_PAGE))
    open_ = [d for d in page if d["request_id"] not in settled(d["request_id"] for d in page)]
    if not open_:
        return [], True
    holds = held()
    if holds is None:
        return [], False
    absent = [d for d in open_ if d["job_id"] not in holds]
    done = settled(d["request_id"] for d in absent)  # applied while the broker was read
    return [_entry(d, now) for d in absent if d["request_id"] not in done], True


def _without_entry(request_ids: list[str]) -> int:
    """How many of these request ids (of logs just read) have no outbox entry: updates sent
    with ``MES_JOURNAL=0`` or by hand. Counted, not a finding."""
    outbox, missing = OutboxMessage._get_collection(), 0
    for i in range(0, len(request_ids), COMPLETE_PAGE):
        chunk = set(request_ids[i : i + COMPLETE_PAGE])
        found = {
            d["request_id"] for d in outbox.find({"request_id": {"$in": list(chunk)}}, {"request_id": 1})
        }
        missing += len(chunk - found)
    return missing


def _prune(before: datetime, settled: Settled) -> int:
    """Delete the outbox entries settled before this pass began whose outcome is still there
    (a log, or a dead letter; one being retried was sent again under a newer entry).

    Each such log was written before its entry was settled, so before this pass began, and
    was read since its checkpoint by this pass or an earlier one (``_without_entry`` looked
    its entry up first). An entry whose log is gone (deleted behind mes_tasks's back: drift,
    which the pass reports) is kept; the relay drops it after ``SETTLED_KEEP_S``.
    """
    outbox, pruned, last = OutboxMessage._get_collection(), 0, None
    for _ in range(PRUNE_PAGES):
        query: dict[str, Any] = {"state": OUTBOX_SETTLED, "settled_at": {"$lt": before}}
        if last is not None:
            query["_id"] = {"$gt": last}
        page = list(outbox.find(query, {"request_id": 1}).sort("_id", 1).limit(COMPLETE_PAGE))
        if not page:
            break
        last = page[-1]["_id"]
        wanted = [d["request_id"] for d in page]
        done = settled(wanted)
        rest = [r for r in wanted if r not in done]
        if rest:  # a retried dead letter is an outcome here: its newer entry carries the update
            done |= set(FailedUpdate._get_collection().distinct("request_id", {"request_id": {"$in": rest}}))
        gone = [d["_id"] for d in page if d["request_id"] in done]
        if gone:
            pruned += int(outbox.delete_many({"_id": {"$in": gone}, "state": OUTBOX_SETTLED}).deleted_count)
    return pruned


def _entry(doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    """An unexplained update as a finding: what is known of it."""
    return {
        "check": UNEXPLAINED,
        "request_id": doc["request_id"],
        "job_id": doc["job_id"],
        "work_order_id": outbox_work_order(doc.get("payload")),
        "age_s": round((now - doc["created_at"]).total_seconds(), 1),  # read tz-aware (db)
        "republished": int(doc.get("republished") or 0),
    }


def _save(wo_id: str, version: int, counters: dict[str, int], *, swept: bool = False) -> None:
    values: dict[str, Any] = {VERSION: version, **counters, "proved_at": utcnow(), "drift": False}
    if swept:
        values["swept_at"] = values["proved_at"]
    _checkpoints().update_one({"_id": wo_id}, {"$set": values}, upsert=True)


def _checkpoints() -> Any:
    return VerifyCheckpoint._get_collection()
