"""What a main app reads: a work order's counters, its logs a page at a time, and where one update is now."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from mes_tasks.api.errors import ApiError
from mes_tasks.db import mongo_errors
from mes_tasks.errors import UnknownWorkOrder
from mes_tasks.models import (
    CONTEXT_FIELDS,
    OUTBOX_SETTLED,
    FailedUpdate,
    OutboxMessage,
    QuantityLog,
    WorkOrder,
    outbox_work_order,
)
from mes_tasks.partitions import index_of, queue_for
from mes_tasks.validation import check_work_order_id, shown

MAX_LOGS_PAGE = 1000
# Where an update is: on its way (outbox), counted (log), refused for good (dead letter), or unknown.
PENDING, APPLIED, DUPLICATE, DEAD_LETTERED, UNKNOWN = (
    "pending",
    "applied",
    "duplicate",
    "dead_lettered",
    "unknown",
)


def work_order(work_order_id: str, partitions: int) -> dict[str, Any]:
    """Counters, fencing epoch, version, and the queue (partition) its updates go to.

    Raises:
        UnknownWorkOrder: no such work order (404).
    """
    wo = check_work_order_id(work_order_id)
    with mongo_errors():
        doc = WorkOrder._get_collection().find_one({"_id": wo})
    if doc is None:
        raise UnknownWorkOrder(f"work order {shown(wo)} does not exist")
    queue = queue_for(wo, partitions)
    return {
        "id": wo,
        **{k: doc.get(k, 0) for k in ("input_qty", "output_qty", "epoch", "version")},
        "updated_at": _iso(doc.get("updated_at")),
        "queue": queue,
        "partition": index_of(queue),
    }


def logs(work_order_id: str, limit: int, before: str | None) -> dict[str, Any]:
    """The work order's logs, newest first, ``limit`` at a time; ``next_before`` pages on."""
    wo = check_work_order_id(work_order_id)
    query: dict[str, Any] = {"work_order_id": wo}
    if before is not None:
        query["_id"] = {"$lt": _log_id(before)}
    with mongo_errors():
        found = list(QuantityLog._get_collection().find(query).sort("_id", -1).limit(limit))
    page = [log_dict(d) for d in found]
    return {"work_order_id": wo, "logs": page, "next_before": page[-1]["id"] if len(page) == limit else None}


def update_status(request_id: str, partitions: int, job_id: str | None = None) -> dict[str, Any]:
    """Where one update is now, by its request id (see ``PENDING`` ... ``UNKNOWN``).

    ``job_id``: the submission asked about; if the request id was applied by another
    submission, this one was a ``duplicate`` of it.
    """
    with mongo_errors():
        log = QuantityLog._get_collection().find_one({"request_id": request_id})
        dead = FailedUpdate._get_collection().find_one({"request_id": request_id}) if log is None else None
        entry = OutboxMessage._get_collection().find_one(  # a settled one's outcome is read above
            {"request_id": request_id, "state": {"$ne": OUTBOX_SETTLED}}, sort=[("_id", -1)]
        )
    answer: dict[str, Any] = {"request_id": request_id}
    if log is not None:
        mine = job_id is None or log.get("task_id") == job_id
        return {**answer, "state": APPLIED if mine else DUPLICATE, "log": log_dict(log)}
    if dead is not None and dead.get("status") != "retried":
        return {**answer, "state": DEAD_LETTERED, "dead_letter": _dead_dict(dead)}
    if entry is not None:
        return {**answer, "state": PENDING, "outbox": _entry_dict(entry, partitions)}
    if dead is not None:  # retried: on its way again, its outbox entry already settled or not yet written
        return {**answer, "state": PENDING, "dead_letter": _dead_dict(dead)}
    return {**answer, "state": UNKNOWN}


def log_dict(doc: dict[str, Any]) -> dict[str, Any]:
    """A log as the gateway shows it (the console's fields, plus its id for paging)."""
    data = {k: doc.get(k) for k in ("request_id", "work_order_id", "kind", "quantity", "value_after", "epoch",
                                    "task_id")}  # fmt: skip
    data.update({k: doc[k] for k in CONTEXT_FIELDS if doc.get(k)})
    return {"id": str(doc["_id"]), **data, "created_at": _iso(doc.get("created_at"))}


def _dead_dict(doc: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(doc["_id"]), "code": doc.get("error_code"), "message": doc.get("error_message"),
            "status": doc.get("status"), "attempts": doc.get("attempts"),
            "last_failed_at": _iso(doc.get("last_failed_at"))}  # fmt: skip


def _entry_dict(doc: dict[str, Any], partitions: int) -> dict[str, Any]:
    """An outbox entry: ``sent`` (the broker took it; ``queue`` is where it waits) or ``spooled``."""
    wo = outbox_work_order(doc.get("payload"))
    return {"job_id": doc.get("job_id"), "state": doc.get("state") or "spooled",
            "queue": queue_for(wo, partitions) if wo is not None else None,
            "created_at": _iso(doc.get("created_at")), "attempts": doc.get("attempts", 0),
            "republished": doc.get("republished", 0)}  # fmt: skip


def _log_id(value: str) -> ObjectId:
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        raise ApiError(
            f"before must be a log id from next_before, not {shown(value)}", code="INVALID_PARAMETER"
        ) from None


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None
