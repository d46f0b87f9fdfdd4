"""The outbox: a MongoDB record of every submitted update until it has an outcome.

The producer writes an entry (``state: "sent"``) before it publishes, and turns it into
``"spooled"`` when the broker refuses the message. ``relay`` (beat, every
``MES_OUTBOX_RELAY_INTERVAL_S``) then:

1. publishes spooled entries, oldest first, with their original job id and request id;
2. deletes entries whose request id has an outcome (a ``QuantityLog`` or ``FailedUpdate``);
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pymongo.collection import Collection

from mes_tasks.db import mongo_errors
from mes_tasks.models import FailedUpdate, OutboxMessage, QuantityLog, utcnow

log = logging.getLogger(__name__)

SENT, SPOOLED = "sent", "spooled"
RELAY_BATCH = 500
SETTLE_SCAN_MAX = 20_000  # entries checked for an outcome per relay run
Publish = Callable[[str, list[Any], dict[str, Any]], None]
Doc = dict[str, Any]


@dataclass
class RelayResult:
    """What one relay run did."""

    published: int = 0  # spooled entries handed to the broker
    settled: int = 0  # entries removed because their update has an outcome
    republished: int = 0  # sent entries the broker no longer held, sent again

    def __bool__(self) -> bool:
        return bool(self.published or self.settled or self.republished)


def record(collection: Collection[Doc], job_id: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Record an update about to be published, in the ``outbox`` collection given.

    A plain pymongo collection: the producer runs inside the main app, whose own
    mongoengine connections mes_tasks must not replace.

    Raises:
        MongoUnavailable: MongoDB is down; nothing was recorded.
    """
    now = utcnow()
    with mongo_errors():
        collection.insert_one(
            _entry(job_id, args, kwargs) | {"state": SENT, "sent_at": now, "created_at": now}
        )


def spool(
    collection: Collection[Doc], job_id: str, args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    """Mark an update the broker refused as spooled, recording it first if it is not yet.

    Raises:
        MongoUnavailable: MongoDB is down too; nothing was recorded.
    """
    with mongo_errors():
        collection.update_one(
            {"job_id": job_id},
            {"$set": {"state": SPOOLED, "reason": reason},
             "$setOnInsert": _entry(job_id, args, kwargs) | {"created_at": utcnow()}},
            upsert=True,
        )  # fmt: skip


def _entry(job_id: str, args: list[Any], kwargs: dict[str, Any]) -> Doc:
    payload = json.dumps({"args": args, "kwargs": kwargs})
    return {"job_id": job_id, "request_id": kwargs["request_id"], "payload": payload, "attempts": 0}


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
    result = RelayResult(published=_publish_spooled(publish, limit))
    result.settled = _delete_settled(limit)
    result.republished = _republish_lost(publish, held, grace_s, limit)
    return result


def _publish_spooled(publish: Publish, limit: int) -> int:
    with mongo_errors():
        batch = list(_collection().find({"state": {"$ne": SENT}}).sort("created_at", 1).limit(limit))
    return _send_all(publish, batch, {"$inc": {"attempts": 1}})


def _send_all(publish: Publish, batch: list[Doc], update: Doc) -> int:
    """Publish each entry and mark it sent; stop at the first broker failure."""
    sent = 0
    for doc in batch:
        payload = json.loads(doc["payload"])
        try:
            publish(doc["job_id"], payload["args"], payload["kwargs"])
        except Exception as exc:  # broker still down: keep the rest for the next run
            _mark_failed(doc, exc)
            log.warning("outbox relay stopped after %d: %s", sent, type(exc).__name__)
            break
        with mongo_errors():
            _collection().update_one(
                {"_id": doc["_id"]}, {"$set": {"state": SENT, "sent_at": utcnow()}, **update}
            )
        sent += 1
    return sent


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


def _republish_lost(publish: Publish, held: Callable[[], set[str]], grace_s: float, limit: int) -> int:
    overdue = {"state": SENT, "sent_at": {"$lt": utcnow() - timedelta(seconds=grace_s)}}
    with mongo_errors():
        batch = list(_collection().find(overdue).sort("sent_at", 1).limit(limit))
    if not batch:
        return 0
    try:
        in_broker = held()  # before the outcome check: a message acked in between then shows as settled
    except Exception as exc:  # the broker is unreachable: nothing can be told lost now
        log.warning(
            "outbox: cannot read the broker (%s); lost updates are checked next run", type(exc).__name__
        )
        return 0
    absent = [d for d in batch if d["job_id"] not in in_broker]
    done = settled_request_ids(d["request_id"] for d in absent)
    lost = [d for d in absent if d["request_id"] not in done]
    for doc in lost:
        log.warning("outbox: %s (job %s) has no outcome and is not in the broker; re-sending",
                    doc["request_id"], doc["job_id"])  # fmt: skip
    return _send_all(publish, lost, {"$inc": {"republished": 1}})


def forget(job_ids: list[str]) -> int:
    """Delete the entries of these jobs (purged on purpose: they must not be re-sent)."""
    with mongo_errors():
        return int(_collection().delete_many({"job_id": {"$in": job_ids}}).deleted_count)


def settled_request_ids(request_ids: Iterable[str]) -> set[str]:
    """The request ids among ``request_ids`` that were applied or dead-lettered."""
    wanted = list(set(request_ids))
    if not wanted:
        return set()
    found: set[str] = set()
    with mongo_errors():
        for model in (QuantityLog, FailedUpdate):
            cursor = model._get_collection().find(
                {"request_id": {"$in": wanted}}, {"request_id": 1, "_id": 0}
            )
            found.update(d["request_id"] for d in cursor)
    return found


def _collection() -> Collection[Doc]:
    collection: Collection[Doc] = OutboxMessage._get_collection()
    return collection
