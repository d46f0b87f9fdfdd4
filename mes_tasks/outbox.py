"""The producer's durable outbox: updates the broker could not take, kept in MongoDB.

``spool`` records one when Redis refuses it; ``relay`` (scheduled by beat) re-publishes
them with their original job id and request id once the broker is back, oldest first,
deleting each only after it was published. A crash between the two re-publishes it:
the request id makes that a duplicate, never a second count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from pymongo.collection import Collection

from mes_tasks.db import mongo_errors
from mes_tasks.models import OutboxMessage, utcnow

log = logging.getLogger(__name__)

RELAY_BATCH = 500
Publish = Callable[[str, list[Any], dict[str, Any]], None]


def spool(
    collection: Collection[dict[str, Any]], job_id: str, args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    """Record an update the broker refused, in the ``outbox`` collection given.

    A plain pymongo collection: the producer runs inside the main app, whose own
    mongoengine connections mes_tasks must not replace.

    Raises:
        MongoUnavailable: MongoDB is down too; nothing was recorded.
    """
    doc = {
        "job_id": job_id,
        "request_id": kwargs["request_id"],
        "payload": json.dumps({"args": args, "kwargs": kwargs}),
        "reason": reason,
        "created_at": utcnow(),
        "attempts": 0,
    }
    with mongo_errors():
        collection.insert_one(doc)


def pending() -> int:
    with mongo_errors():
        return int(OutboxMessage.objects.count())


def relay(publish: Publish, limit: int = RELAY_BATCH) -> int:
    """Re-publish spooled updates, oldest first; stop at the first broker failure.

    Returns:
        How many were published (and removed from the outbox).
    """
    sent = 0
    with mongo_errors():
        batch = list(OutboxMessage.objects.order_by("created_at").limit(limit))
    for message in batch:
        payload = json.loads(message.payload)
        try:
            publish(message.job_id, payload["args"], payload["kwargs"])
        except Exception as exc:  # broker still down: keep the rest for the next run
            with mongo_errors():
                message.update(inc__attempts=1, set__last_error=str(exc)[:500], set__last_attempt_at=utcnow())
            log.warning("outbox relay stopped after %d: %s", sent, type(exc).__name__)
            break
        with mongo_errors():
            message.delete()
        sent += 1
    return sent
