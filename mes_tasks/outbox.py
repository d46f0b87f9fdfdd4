"""The outbox: a MongoDB record of every submitted update until it has an outcome.

The producer writes an entry (``state: "sent"``) before it publishes, and turns it into
``"spooled"`` when the broker refuses the message. ``relay`` (beat, every
``MES_OUTBOX_RELAY_INTERVAL_S``) then:

1. publishes spooled entries, oldest first and all of them (page by page), with their
   original job id and request id; an entry that can never be published (its payload
   does not fit the task) is set aside as a dead letter (``UNPUBLISHABLE``), where
   ``failed list/show/discard`` see it, so it never holds up the entries behind it;
2. deletes entries whose request id has an outcome: a ``QuantityLog``, or a
   ``FailedUpdate`` that is not ``retried`` (a retried update stays protected until it
   is applied or fails again);
3. re-publishes entries still without one ``MES_OUTBOX_GRACE_S`` after they were sent,
   unless the broker still holds their message (queued, or delivered and unacknowledged).

Step 3 covers what the broker itself can lose: kombu's Redis transport pops a message
(BRPOP) and records it as unacknowledged in a second step, so a worker killed or a
connection dropped between the two loses it. The request id makes a re-publish a
duplicate at worst, never a second count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from mes_tasks.broker import is_outage
from mes_tasks.db import mongo_errors
from mes_tasks.deadletter import Failure, record_failure
from mes_tasks.errors import PermanentError
from mes_tasks.models import FailedUpdate, OutboxMessage, QuantityLog, utcnow
from mes_tasks.names import UPDATE_QUANTITY

log = logging.getLogger(__name__)

SENT, SPOOLED = "sent", "spooled"
RELAY_BATCH = 500
SETTLE_SCAN_MAX = 20_000  # entries checked for an outcome per relay run
PUBLISH_MAX = 20_000  # spooled entries published per relay run; the next run goes on


class Unpublishable(PermanentError):
    """An outbox entry that can never be published: its payload does not fit the task."""

    code = "UNPUBLISHABLE"


Publish = Callable[[str, list[Any], dict[str, Any]], None]
Doc = dict[str, Any]


@dataclass
class RelayResult:
    """What one relay run did."""

    published: int = 0  # spooled entries handed to the broker
    settled: int = 0  # entries removed because their update has an outcome
    republished: int = 0  # sent entries the broker no longer held, sent again
    set_aside: int = 0  # entries that can never be published, moved to the dead letters

    def __bool__(self) -> bool:
        return bool(self.published or self.settled or self.republished or self.set_aside)


class Job(NamedTuple):
    """An update on its way to the broker: its job id and ``update_quantity``'s bound arguments."""

    job_id: str
    args: list[Any]
    kwargs: dict[str, Any]  # with its request id


def record_all(collection: Collection[Doc], jobs: Sequence[Job]) -> set[str]:
    """Record updates about to be published, in one unordered insert into the ``outbox`` given.

    A plain pymongo collection: the producer runs inside the main app, whose own
    mongoengine connections mes_tasks must not replace.

    Returns:
        The job ids recorded (all of them unless the server refused some).

    Raises:
        MongoUnavailable: MongoDB is down; nothing is known to be recorded.
    """
    now = utcnow()
    try:
        with mongo_errors():
            collection.insert_many(
                [_entry(job) | {"state": SENT, "sent_at": now, "created_at": now} for job in jobs],
                ordered=False,
            )
    except BulkWriteError as exc:
        refused = {error["index"] for error in exc.details.get("writeErrors", [])}
        return {job.job_id for i, job in enumerate(jobs) if i not in refused}
    return {job.job_id for job in jobs}


def spool(
    collection: Collection[Doc], job_id: str, args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    """Mark one update the broker refused as spooled; see ``spool_all``."""
    spool_all(collection, [Job(job_id, args, kwargs)], reason)


def spool_all(collection: Collection[Doc], jobs: Sequence[Job], reason: str) -> None:
    """Mark updates the broker refused as spooled, in one write, recording any that is not yet.

    Raises:
        MongoUnavailable: MongoDB is down too; nothing was recorded.
    """
    with mongo_errors():
        collection.bulk_write(
            [UpdateOne({"job_id": job.job_id},
                       {"$set": {"state": SPOOLED, "reason": reason},
                        "$setOnInsert": _entry(job) | {"created_at": utcnow()}},
                       upsert=True) for job in jobs],
            ordered=False,
        )  # fmt: skip


def _entry(job: Job) -> Doc:
    payload = json.dumps({"args": job.args, "kwargs": job.kwargs})
    return {"job_id": job.job_id, "request_id": job.kwargs["request_id"], "payload": payload, "attempts": 0}


def counts() -> dict[str, int]:
    """Entries waiting per state: ``spooled`` (not yet in the broker) and ``sent``."""
    with mongo_errors():
        rows = OutboxMessage._get_collection().aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        found = {str(r["_id"]): int(r["n"]) for r in rows}
    return {SPOOLED: found.get(SPOOLED, 0) + found.get("None", 0), SENT: found.get(SENT, 0)}


def relay(
    publish: Publish, held: Callable[[], set[str]], grace_s: float, limit: int = RELAY_BATCH
) -> RelayResult:
    """Publish what was spooled, drop what has an outcome, re-send what the broker lost.

    Args:
        publish: sends one update to the broker under its job id.
        held: the task ids the broker still holds for ``workorder`` (see ``broker``).
        grace_s: how long a sent update may go without an outcome before it is checked.
    """
    result = RelayResult()
    _publish_spooled(publish, limit, result)
    result.settled = _delete_settled(limit)
    _republish_lost(publish, held, grace_s, limit, result)
    return result


def _publish_spooled(publish: Publish, limit: int, result: RelayResult) -> None:
    """Every spooled entry, oldest first, a page at a time, until the broker refuses one."""
    after: Doc = {}
    while result.published + result.set_aside < PUBLISH_MAX:
        with mongo_errors():
            batch = list(_collection().find({"state": {"$ne": SENT}, **after}).sort("_id", 1).limit(limit))
        if not batch:
            return
        if not _send_all(publish, batch, {"$inc": {"attempts": 1}}, result, "published"):
            return  # the broker is down: the next run goes on
        after = {"_id": {"$gt": batch[-1]["_id"]}}


def _send_all(publish: Publish, batch: list[Doc], update: Doc, result: RelayResult, count: str) -> bool:
    """Publish each entry and mark it sent; False at the first broker failure (the rest wait).

    An entry that fails for any other reason is set aside and the others go on.
    """
    for doc in batch:
        try:
            payload = json.loads(doc["payload"])
            publish(doc["job_id"], payload["args"], payload["kwargs"])
        except Exception as exc:
            if is_outage(exc):  # broker still down: keep the rest for the next run
                _mark_failed(doc, exc)
                log.warning("outbox relay stopped: %s", type(exc).__name__)
                return False
            set_aside(doc, exc)
            result.set_aside += 1
            continue
        with mongo_errors():
            _collection().update_one(
                {"_id": doc["_id"]}, {"$set": {"state": SENT, "sent_at": utcnow()}, **update}
            )
        setattr(result, count, getattr(result, count) + 1)
    return True


def set_aside(doc: Doc, exc: Exception) -> None:
    """Move an entry that can never be published to the dead letters, and out of the outbox."""
    reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    payload = _loaded(doc.get("payload"))
    args: list[Any] = payload["args"] if isinstance(payload.get("args"), list) else []
    kwargs: dict[str, Any] = payload["kwargs"] if isinstance(payload.get("kwargs"), dict) else {}
    failure = Failure(
        task_name=UPDATE_QUANTITY,
        task_id=doc.get("job_id"),
        request_id=str(doc.get("request_id") or doc["job_id"]),
        work_order_id=args[0] if args and isinstance(args[0], str) else None,
        args=args,
        kwargs=kwargs,
        error=Unpublishable(f"the outbox entry cannot be published: {reason}"),
        attempts=1,
    )
    record_failure(failure)
    with mongo_errors():
        _collection().delete_one({"_id": doc["_id"]})
    log.error("outbox: %s (job %s) can never be published, set aside as a dead letter: %s",
              doc.get("request_id"), doc.get("job_id"), reason)  # fmt: skip


def _loaded(raw: Any) -> Doc:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _mark_failed(doc: Doc, exc: Exception) -> None:
    with mongo_errors():
        _collection().update_one(
            {"_id": doc["_id"]},
            {"$set": {"state": SPOOLED, "last_error": str(exc)[:500], "last_attempt_at": utcnow()},
             "$inc": {"attempts": 1}},
        )  # fmt: skip


def _delete_settled(limit: int) -> int:
    deleted, last_id, scanned = 0, None, 0
    while scanned < SETTLE_SCAN_MAX:
        query: Doc = {"state": SENT} if last_id is None else {"state": SENT, "_id": {"$gt": last_id}}
        with mongo_errors():
            batch = list(_collection().find(query, {"request_id": 1}).sort("_id", 1).limit(limit))
        if not batch:
            break
        done = settled_request_ids(d["request_id"] for d in batch)
        ids = [d["_id"] for d in batch if d["request_id"] in done]
        if ids:
            with mongo_errors():
                deleted += _collection().delete_many({"_id": {"$in": ids}}).deleted_count
        last_id, scanned = batch[-1]["_id"], scanned + len(batch)
    return deleted


def _republish_lost(
    publish: Publish, held: Callable[[], set[str]], grace_s: float, limit: int, result: RelayResult
) -> None:
    overdue = {"state": SENT, "sent_at": {"$lt": utcnow() - timedelta(seconds=grace_s)}}
    with mongo_errors():
        batch = list(_collection().find(overdue).sort("sent_at", 1).limit(limit))
    if not batch:
        return
    try:
        in_broker = held()  # before the outcome check: a message acked in between then shows as settled
    except Exception as exc:  # the broker is unreachable: nothing can be told lost now
        log.warning(
            "outbox: cannot read the broker (%s); lost updates are checked next run", type(exc).__name__
        )
        return
    absent = [d for d in batch if d["job_id"] not in in_broker]
    done = settled_request_ids(d["request_id"] for d in absent)
    lost = [d for d in absent if d["request_id"] not in done]
    for doc in lost:
        log.warning("outbox: %s (job %s) has no outcome and is not in the broker; re-sending",
                    doc["request_id"], doc["job_id"])  # fmt: skip
    _send_all(publish, lost, {"$inc": {"republished": 1}}, result, "republished")


def forget(job_ids: list[str], collection: Collection[Doc] | None = None) -> int:
    """Delete the entries of these jobs (purged on purpose, or never sendable: not to be re-sent)."""
    with mongo_errors():
        found = (collection if collection is not None else _collection()).delete_many(
            {"job_id": {"$in": job_ids}}
        )
        return int(found.deleted_count)


def settled_request_ids(request_ids: Iterable[str]) -> set[str]:
    """The request ids among ``request_ids`` that were applied, or dead-lettered and not retried since.

    A ``retried`` dead letter is no outcome: its update is on its way again and, until it
    is applied or fails anew (which sets the record ``open``), the outbox keeps re-sending
    it if the broker loses it.
    """
    wanted = list(set(request_ids))
    if not wanted:
        return set()
    found: set[str] = set()
    queries: tuple[tuple[Any, Doc], ...] = ((QuantityLog, {}), (FailedUpdate, {"status": {"$ne": "retried"}}))
    with mongo_errors():
        for model, extra in queries:
            cursor = model._get_collection().find(
                {"request_id": {"$in": wanted}, **extra}, {"request_id": 1, "_id": 0}
            )
            found.update(d["request_id"] for d in cursor)
    return found


def _collection() -> Collection[Doc]:
    collection: Collection[Doc] = OutboxMessage._get_collection()
    return collection
