"""One work order's counters, fencing epoch, version and recent logs (``workorder show``), and
creating one on a development stack (``workorder create``)."""

from __future__ import annotations

from typing import Any

from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError, UnknownWorkOrder
from mes_tasks.models import CONTEXT_FIELDS, QuantityLog, WorkOrder
from mes_tasks.ops.actions.limits import DEFAULT_LOGS, MAX_LOGS, check_range
from mes_tasks.partitions import queue_for
from mes_tasks.settings import Settings
from mes_tasks.validation import check_work_order_id

COUNTERS = ("input_qty", "output_qty", "epoch", "version")


def show_work_order(settings: Settings, work_order_id: str, logs: int = DEFAULT_LOGS) -> dict[str, Any]:
    """Counters, epoch, version, last update, its queue (``MES_PARTITIONS``) and its ``logs`` newest logs.

    Raises:
        UnknownWorkOrder: no such work order. ValidationError: a malformed id or ``logs``.
    """
    wo = check_work_order_id(work_order_id)
    check_range("logs", logs, 0, MAX_LOGS)
    with mongo_errors():
        doc = WorkOrder._get_collection().find_one({"_id": wo})
        newest = QuantityLog.objects(work_order_id=wo).order_by("-created_at", "-id")  # a group shares its ms
        found = list(newest.limit(logs)) if logs else []
    if doc is None:
        raise UnknownWorkOrder(f"work order {wo!r} does not exist")
    updated_at = doc.get("updated_at")
    return {
        "id": wo,
        **{k: doc.get(k, 0) for k in COUNTERS},
        "updated_at": None if updated_at is None else str(updated_at),  # as the CLI has always shown it
        "queue": queue_for(wo, settings.partitions),  # where its updates go
        "logs": [_log_dict(log) for log in found],
    }


def create_work_order(work_order_id: str) -> dict[str, Any]:
    """Create a work order with both counters at zero: a convenience for trying mes_tasks.

    In production the main app creates its work orders; mes_tasks only changes their
    counters, and an update for a work order that does not exist is dead-lettered
    ``UNKNOWN_WORK_ORDER``.

    Raises:
        MesError: ``WORK_ORDER_EXISTS``, leaving the one there untouched.
    """
    wo = check_work_order_id(work_order_id)
    with mongo_errors():
        created = WorkOrder._get_collection().update_one(
            {"_id": wo}, {"$setOnInsert": {k: 0 for k in COUNTERS}}, upsert=True
        )
    if created.upserted_id is None:
        raise MesError(f"work order {wo!r} exists already; nothing changed", code="WORK_ORDER_EXISTS")
    return {"id": wo, "created": True, **{k: 0 for k in COUNTERS}}


def _log_dict(log: QuantityLog) -> dict[str, Any]:
    data = {k: getattr(log, k) for k in ("request_id", "kind", "quantity", "value_after", "epoch", "task_id")}
    data["created_at"] = log.created_at.isoformat() if log.created_at else None
    data.update({k: getattr(log, k) for k in CONTEXT_FIELDS if getattr(log, k)})
    return data
