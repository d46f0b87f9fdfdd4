"""The dead-letter store: updates that could not be applied, kept for operators."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError, ValidationError
from mes_tasks.models import FAILED_STATUSES, FailedUpdate, utcnow
from mes_tasks.validation import check_work_order_id


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


def find_failed(
    *, code: str | None = None, work_order_id: str | None = None, status: str | None = "open"
) -> list[FailedUpdate]:
    """Dead letters, newest failure first, filtered by error code / work order / status."""
    query: dict[str, Any] = {}
    if code:
        query["error_code"] = _plain("code", code)
    if work_order_id:
        query["work_order_id"] = check_work_order_id(work_order_id)
    if status:
        if status not in FAILED_STATUSES:
            raise ValidationError(
                f"status must be one of {', '.join(FAILED_STATUSES)}", code="INVALID_STATUS"
            )
        query["status"] = status
    with mongo_errors():
        return list(FailedUpdate.objects(**query).order_by("-last_failed_at"))


def get_failed(record_id: str) -> FailedUpdate:
    """One dead letter by id.

    Raises:
        ValidationError: malformed id. MesError(FAILED_UPDATE_NOT_FOUND): unknown id.
    """
    try:
        oid = ObjectId(record_id)
    except (InvalidId, TypeError):
        raise ValidationError(f"{record_id!r} is not a failed-update id", code="INVALID_ID") from None
    with mongo_errors():
        record: FailedUpdate | None = FailedUpdate.objects(id=oid).first()
    if record is None:
        raise MesError(f"no failed update {record_id}", code="FAILED_UPDATE_NOT_FOUND")
    return record


def retry_failed(record: FailedUpdate, send: Callable[..., str]) -> str:
    """Re-send a dead letter with its original request id (it can never count twice).

    Args:
        send: ``send(args, kwargs) -> task id``, e.g. a wrapper of ``apply_async``.
    Returns:
        The new task id.
    """
    payload = json.loads(record.payload or "{}")
    kwargs = dict(payload.get("kwargs") or {})
    kwargs["request_id"] = record.request_id
    task_id = send(list(payload.get("args") or []), kwargs)
    _set_status(record, "retried", task_id=task_id)
    return task_id


def discard_failed(record: FailedUpdate) -> None:
    """Mark a dead letter as discarded; it stays, with its history, for the record."""
    _set_status(record, "discarded")


def _set_status(record: FailedUpdate, status: str, **extra: Any) -> None:
    event = {"at": utcnow(), "event": status, **extra}
    with mongo_errors():
        FailedUpdate.objects(id=record.id).update_one(set__status=status, push__history=event)
    record.reload()


def _plain(name: str, value: str) -> str:
    if not value.replace("_", "").isalnum():
        raise ValidationError(f"{name} must be letters, digits and underscores", code="INVALID_CODE")
    return value
