"""The outbox: a MongoDB record of every submitted update until it has an outcome.

The producer records an update as sent (``state: "sent"``) once the broker took it, or, for a
batch, while it publishes it; when the broker refuses it, the producer records it as
``"spooled"`` instead. ``sent_at`` is when the entry was written, plus the publish deadline
(``producer.PUBLISH_DEADLINE_S``), plus the wait its answer estimates ahead of it in its queue,
so the relay never looks at an entry before its publish has ended; for a spooled entry, when it
was spooled; for one the relay published, when it did.

The relay (``send.relay``) reads it to publish what was spooled and re-send what the broker lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from mes_tasks.db import mongo_errors
from mes_tasks.models import OUTBOX_SETTLED, FailedUpdate, OutboxMessage, QuantityLog, utcnow

log = logging.getLogger(__name__)

SENT, SPOOLED = "sent", "spooled"
SETTLED_KEEP_S = 86400.0  # a settled entry no pass accounted for is deleted after this long
WAITING = [SPOOLED, None]  # an entry written without a state is spooled (mongoengine's default)
DUPLICATE_KEY = 11000  # MongoDB's error code: an entry of this job id exists


Doc = dict[str, Any]


class Job(NamedTuple):
    """An update on its way to the broker: its job id and ``update_quantity``'s bound arguments."""

    job_id: str
    args: list[Any]
    kwargs: dict[str, Any]  # with its request id


def record_all(
    collection: Collection[Doc], jobs: Sequence[Job], waits_s: Sequence[float] | None = None
) -> set[str]:
    """Record updates as sent, in one unordered insert into the ``outbox`` given.

    A plain pymongo collection: the producer runs inside the main app, whose own
    mongoengine connections mes_tasks must not replace.

    Args:
        waits_s: per update, how long from now its ``sent_at`` is (s); none: now.

    Returns:
        The job ids recorded (all of them unless the server refused some).

    Raises:
        MongoUnavailable: MongoDB is down; nothing is known to be recorded.
    """
    now = utcnow()
    waits = list(waits_s) if waits_s is not None else [0.0] * len(jobs)
    entries = [_entry(job) | {"state": SENT, "sent_at": now + timedelta(seconds=wait), "created_at": now}
               for job, wait in zip(jobs, waits, strict=True)]  # fmt: skip
    try:
        with mongo_errors():
            collection.insert_many(entries, ordered=False)
    except BulkWriteError as exc:
        refused = {error["index"] for error in exc.details.get("writeErrors", [])}
        return {job.job_id for i, job in enumerate(jobs) if i not in refused}
    return {job.job_id for job in jobs}


def spool(
    collection: Collection[Doc], job_id: str, args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    """Record one update the broker refused as spooled; see ``spool_all``."""
    spool_all(collection, [Job(job_id, args, kwargs)], reason)


def spool_all(collection: Collection[Doc], jobs: Sequence[Job], reason: str) -> None:
    """Record updates the broker refused as spooled, in one insert (an entry of the job id turns spooled).

    Raises:
        MongoUnavailable: MongoDB is down too; nothing was recorded.
    """
    now = utcnow()
    spooled = {"state": SPOOLED, "reason": reason, "sent_at": now}
    try:
        with mongo_errors():
            collection.insert_many(
                [_entry(job) | spooled | {"created_at": now} for job in jobs], ordered=False
            )
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise
        with mongo_errors():  # a job id that has an entry already (a .delay() given its task id)
            collection.update_many(
                {"job_id": {"$in": [jobs[e["index"]].job_id for e in errors]}}, {"$set": spooled}
            )


def _entry(job: Job) -> Doc:
    payload = json.dumps({"args": job.args, "kwargs": job.kwargs})
    return {"job_id": job.job_id, "request_id": job.kwargs["request_id"], "payload": payload, "attempts": 0}


def counts() -> dict[str, int]:
    """Entries waiting per state: ``spooled`` (not yet in the broker) and ``sent``; counted on an index."""
    with mongo_errors():
        collection = outbox_collection()
        return {
            SPOOLED: collection.count_documents({"state": {"$in": WAITING}}),
            SENT: collection.count_documents({"state": SENT}),
        }


def forget(job_ids: list[str], collection: Collection[Doc] | None = None) -> int:
    """Delete the entries of these jobs (purged on purpose, or never sendable: not to be re-sent)."""
    with mongo_errors():
        found = (collection if collection is not None else outbox_collection()).delete_many(
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


def settle(ids: list[Any], *, keep: bool) -> int:
    """These entries' updates have their outcome: mark them ``settled`` for continuous
    verification to account for and prune (``keep``), or delete them now (verification off).
    Returns how many."""
    if not ids:
        return 0
    with mongo_errors():
        if not keep:
            return int(outbox_collection().delete_many({"_id": {"$in": ids}}).deleted_count)
        now = utcnow()
        done = outbox_collection().update_many(
            {"_id": {"$in": ids}, "state": SENT}, {"$set": {"state": OUTBOX_SETTLED, "settled_at": now}}
        )
        return int(done.modified_count)


def prune_settled(before: datetime) -> int:
    """Delete the settled entries settled before ``before``, accounted for or not: the bound
    on the outbox of a deployment whose verification passes do not run."""
    with mongo_errors():
        gone = outbox_collection().delete_many({"state": OUTBOX_SETTLED, "settled_at": {"$lt": before}})
        return int(gone.deleted_count)


def outbox_collection() -> Collection[Doc]:
    collection: Collection[Doc] = OutboxMessage._get_collection()
    return collection
