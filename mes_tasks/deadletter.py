"""The dead-letter store: updates that could not be applied, kept for operators."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError
from mes_tasks.models import FailedUpdate, utcnow


@dataclass(frozen=True)
class Failure:
    """One final failure of a task delivery."""

    task_name: str
    task_id: str | None
    request_id: str
    work_order_id: str | None
    args: tuple[Any, ...] | list[Any]
    kwargs: dict[str, Any]
    error: MesError
    attempts: int


def record_failure(failure: Failure) -> None:
    """Upsert the ``FailedUpdate`` for this request id and append the attempt to its history.

    Raises:
        MongoUnavailable: nothing could be recorded; the caller must not drop the task.
    """
    now = utcnow()
    event = {
        "at": now,
        "event": "failed",
        "code": failure.error.code,
        "message": failure.error.message,
        "attempts": failure.attempts,
        "task_id": failure.task_id,
    }
    with mongo_errors():
        FailedUpdate._get_collection().update_one(
            {"request_id": failure.request_id},
            {
                "$set": {
                    "task_name": failure.task_name,
                    "task_id": failure.task_id,
                    "payload": _payload(failure.args, failure.kwargs),
                    "work_order_id": failure.work_order_id,
                    "error_code": failure.error.code,
                    "error_message": failure.error.message,
                    "last_failed_at": now,
                    "status": "open",
                },
                "$setOnInsert": {"first_failed_at": now},
                "$inc": {"attempts": failure.attempts},
                "$push": {"history": event},
            },
            upsert=True,
        )


def _payload(args: Any, kwargs: Any) -> str:
    return json.dumps({"args": list(args or ()), "kwargs": dict(kwargs or {})}, default=repr)
