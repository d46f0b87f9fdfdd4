"""The consistency audit: every work order's counters against the sum of its logs.

How it stays exact while updates keep flowing, without one long snapshot:

1. read every work order's ``version`` (bumped by each committed change);
2. sum the logs per work order in one server-side ``$group``, streamed;
3. read the counters again, merged with the sums in ``_id`` order.

A work order whose version is the same in 1 and 3 had no commit while its logs
were summed, so comparing 2 with 3 is exact: no false alarm, no masked drift. The
few whose version moved are re-checked, each in a snapshot transaction that reads
counter and logs at one point in time. Memory grows with the number of work
orders (step 1), never with the number of logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pymongo.read_concern import ReadConcern

from mes_tasks.apply.ledger import Ledger
from mes_tasks.db import Mongo, mongo_errors
from mes_tasks.errors import FenceLost
from mes_tasks.models import COUNTER_FIELDS, VERSION, QuantityLog, VerifyCheckpoint, WorkOrder, utcnow

SNAPSHOT = ReadConcern("snapshot")
CURSOR_BATCH = 1000
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Finding:
    """One counter that does not equal the sum of its logs."""

    work_order_id: str
    check: str  # counter_mismatch | counters_without_logs | logs_without_work_order
    field: str
    counter: int | None
    log_sum: int
    delta: int  # counter - log_sum
    log_count: int


@dataclass(frozen=True)
class Repair:
    """Counters of one work order before and after a repair."""

    work_order_id: str
    before: dict[str, int]
    after: dict[str, int]


@dataclass
class AuditOutcome:
    """What one audit run saw and did."""

    started_at: datetime
    finished_at: datetime | None = None
    scope: list[str] | None = None
    work_orders_scanned: int = 0
    logs_scanned: int = 0
    rechecked: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: bool = False
    repairs: list[Repair] = field(default_factory=list)
    checkpoints_reset: int = 0  # continuous verification's checkpoints found wrong (and deleted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(wo_id: str, doc: dict[str, Any] | None, sums: dict[str, Any] | None) -> list[Finding]:
    """The findings for one work order, given its document and its log sums."""
    sums = sums or {}
    total_logs = sum(int(sums.get(f"{kind}_n", 0)) for kind in COUNTER_FIELDS)
    findings = []
    for kind, fname in COUNTER_FIELDS.items():
        log_sum, count = int(sums.get(kind, 0)), int(sums.get(f"{kind}_n", 0))
        if doc is None:
            if count:
                findings.append(
                    Finding(wo_id, "logs_without_work_order", fname, None, log_sum, -log_sum, count)
                )
            continue
        counter = int(doc.get(fname) or 0)
        if counter != log_sum:
            check = "counter_mismatch" if total_logs else "counters_without_logs"
            findings.append(Finding(wo_id, check, fname, counter, log_sum, counter - log_sum, count))
    return findings


def run_audit(
    mongo: Mongo, work_order_ids: list[str] | None = None, progress: Progress | None = None
) -> AuditOutcome:
    """Compare counters with log sums for all work orders, or for ``work_order_ids``."""
    outcome = AuditOutcome(started_at=utcnow(), scope=work_order_ids)
    with mongo_errors():
        versions = _versions(work_order_ids)
        suspects = []
        for wo_id, doc, sums in _merged(_counters(work_order_ids), _log_sums(work_order_ids)):
            outcome.work_orders_scanned += doc is not None
            outcome.logs_scanned += sum(int((sums or {}).get(f"{k}_n", 0)) for k in COUNTER_FIELDS)
            if _changed(doc, versions.get(wo_id)):
                suspects.append(wo_id)
            else:
                outcome.findings.extend(compare(wo_id, doc, sums))
            if progress:
                progress(1)
        outcome.rechecked = len(suspects)
        for wo_id in suspects:
            outcome.findings.extend(recheck(mongo, wo_id))
    outcome.finished_at = utcnow()
    return outcome


def check_checkpoints(outcome: AuditOutcome) -> int:
    """Verify continuous verification's checkpoints against what this audit proved; returns
    how many were wrong (each deleted: the next pass proves its work order in full).

    A work order with no finding had counters equal to its logs; if it is still at its
    checkpoint's version, the checkpoint must hold those same counters. One that does not
    was changed behind mes_tasks's back (it lives in ``verify_checkpoints``) and could one
    day mask a drift of the same size.
    """
    drifted = {f.work_order_id for f in outcome.findings}
    wrong = []
    with mongo_errors():
        checkpoints = {
            c["_id"]: c for c in VerifyCheckpoint._get_collection().find(_scope("_id", outcome.scope))
        }
        fields = [VERSION, *COUNTER_FIELDS.values()]
        for doc in WorkOrder._get_collection().find({"_id": {"$in": list(checkpoints)}}, fields):
            cp = checkpoints[doc["_id"]]
            same_version = version_of(doc) == version_of(cp)
            if same_version and counters_of(doc) != counters_of(cp) and doc["_id"] not in drifted:
                wrong.append(doc["_id"])
        if wrong:
            VerifyCheckpoint._get_collection().delete_many({"_id": {"$in": wrong}})
    return len(wrong)


def total_work_orders(work_order_ids: list[str] | None) -> int:
    """How many work orders an audit of this scope walks (for a progress bar)."""
    with mongo_errors():
        return int(WorkOrder._get_collection().count_documents(_scope("_id", work_order_ids)))


def recheck(mongo: Mongo, wo_id: str) -> list[Finding]:
    """Compare one work order on a single snapshot of its document and its logs."""
    return compare(wo_id, *snapshot(mongo, wo_id))


def snapshot(
    mongo: Mongo, wo_id: str, after_version: int | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """One work order's document and its log sums (``{input, input_n, output, output_n}``),
    read at one point in time; only the logs above ``after_version`` and up to the
    document's version when given (continuous verification's "logs since a checkpoint"),
    and then their request ids too (``request_ids``)."""
    with mongo.start_session() as session, session.start_transaction(read_concern=SNAPSHOT):
        doc = WorkOrder._get_collection().find_one({"_id": wo_id}, session=session)
        since = None
        if after_version is not None:
            since = {VERSION: {"$gt": after_version, "$lte": version_of(doc or {})}}
        rows = _log_sums([wo_id], since, with_ids=since is not None, session=session)
        sums = next(iter(rows), None)
    return doc, sums or {"_id": wo_id}


def version_of(doc: dict[str, Any]) -> int:
    """A work order's version (0 for one written before versions were kept)."""
    return int(doc.get(VERSION) or 0)


def counters_of(doc: dict[str, Any]) -> dict[str, int]:
    """A work order's (or a checkpoint's) counters, by field."""
    return {f: int(doc.get(f) or 0) for f in COUNTER_FIELDS.values()}


def repair(ledger: Ledger, wo_id: str) -> Repair | None:
    """Set one work order's counters to its log sums, under its lock and fence.

    Returns None when there was nothing to change (safe to run twice).

    Raises:
        FenceLost, LockLost, LockBusy: another holder interfered; nothing was written.
    """
    with ledger.fenced(wo_id, read_concern=SNAPSHOT) as fence:
        session = fence.session
        doc = ledger.work_orders.find_one({"_id": wo_id}, session=session) or {}
        sums = next(iter(_log_sums([wo_id], session=session)), None) or {}
        before = {f: int(doc.get(f) or 0) for f in COUNTER_FIELDS.values()}
        after = {f: int(sums.get(kind, 0)) for kind, f in COUNTER_FIELDS.items()}
        if before == after:
            return None
        done = ledger.work_orders.update_one(
            {"_id": wo_id, "epoch": fence.epoch},
            {"$set": {**after, "updated_at": utcnow()}, "$inc": {"version": 1}},
            session=session,
        )
        if done.matched_count != 1:
            raise FenceLost(f"work order {wo_id!r} fenced during repair")
    return Repair(wo_id, before, after)


def _changed(doc: dict[str, Any] | None, version_before: int | None) -> bool:
    version_now = None if doc is None else version_of(doc)
    return version_now != version_before


def _scope(key: str, ids: list[str] | None) -> dict[str, Any]:
    # Work-order ids are strings; anything else cannot be updated, so it is not audited.
    return {key: {"$type": "string"}} if ids is None else {key: {"$in": ids}}


def _versions(ids: list[str] | None) -> dict[str, int]:
    cursor = WorkOrder._get_collection().find(_scope("_id", ids), {"version": 1}, batch_size=CURSOR_BATCH)
    return {doc["_id"]: int(doc.get("version") or 0) for doc in cursor}


def _counters(ids: list[str] | None) -> Iterator[dict[str, Any]]:
    projection = {"version": 1, **{f: 1 for f in COUNTER_FIELDS.values()}}
    coll = WorkOrder._get_collection()
    return iter(coll.find(_scope("_id", ids), projection, batch_size=CURSOR_BATCH).sort("_id", 1))


def _log_sums(
    ids: list[str] | None, match: dict[str, Any] | None = None, with_ids: bool = False, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Per work order: ``{_id, input, input_n, output, output_n}``, sorted by ``_id``; of the
    logs that also ``match``, when given; ``with_ids``: and their ``request_ids``.

    Grouping on (work order, kind) with plain ``$sum`` costs little more than the bare
    ``$group`` floor; per-kind ``$cond`` sums or a ``$type`` match would double it.
    """
    pipeline: list[dict[str, Any]] = [
        {
            "$group": {
                "_id": {"w": "$work_order_id", "k": "$kind"},
                "s": {"$sum": "$quantity"},
                "n": {"$sum": 1},
            }
        },
        {"$sort": {"_id": 1}},
    ]
    if with_ids:
        pipeline[0]["$group"]["r"] = {"$push": "$request_id"}
    # one work order by equality: SecantusDB bounds the index range (``wo_version``) only then,
    # and reads all that work order's keys for an ``$in`` of one
    which = {} if ids is None else {"work_order_id": ids[0] if len(ids) == 1 else {"$in": ids}}
    wanted = {**which, **(match or {})}
    if wanted:
        pipeline.insert(0, {"$match": wanted})
    coll = QuantityLog._get_collection()
    rows = coll.aggregate(pipeline, allowDiskUse=True, batchSize=CURSOR_BATCH, **kwargs)
    return _fold_kinds(rows)


def _fold_kinds(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Fold consecutive (work order, kind) rows into one dict per work order."""
    current: dict[str, Any] | None = None
    for row in rows:
        wo_id, kind = row["_id"]["w"], row["_id"]["k"]
        if current is None or current["_id"] != wo_id:
            if current is not None:
                yield current
            current = {"_id": wo_id}
        current[kind], current[f"{kind}_n"] = row["s"], row["n"]
        if "r" in row:
            current.setdefault("request_ids", []).extend(row["r"])
    if current is not None:
        yield current


def _merged(
    docs: Iterable[dict[str, Any]], sums: Iterable[dict[str, Any]]
) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    """Join two ``_id``-sorted streams: (id, doc or None, sums or None)."""
    doc_it, sum_it = iter(docs), iter(sums)
    doc, s = next(doc_it, None), next(sum_it, None)
    while doc is not None or s is not None:
        if s is None or (doc is not None and doc["_id"] < s["_id"]):
            yield doc["_id"], doc, None  # type: ignore[index]
            doc = next(doc_it, None)
        elif doc is None or s["_id"] < doc["_id"]:
            yield s["_id"], None, s
            s = next(sum_it, None)
        else:
            yield doc["_id"], doc, s
            doc, s = next(doc_it, None), next(sum_it, None)
