"""Dead letters: list, inspect, retry, discard (``failed list|show|retry|discard``).

A selection is record ids, or ``every`` open dead letter (with ``code``: of that code).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mes_tasks.apply.deadletter import discard_failed, find_failed, get_failed, retry_failed
from mes_tasks.errors import ValidationError
from mes_tasks.models import FailedUpdate, QuantityLog
from mes_tasks.send.producer import default_producer

Skipped = Callable[[FailedUpdate], None]


def list_failed(
    code: str | None = None, work_order_id: str | None = None, status: str = "open"
) -> list[dict[str, Any]]:
    """Dead letters, newest failure first; ``status``: open, retried, discarded or ``all``."""
    found = find_failed(code=code, work_order_id=work_order_id, status=None if status == "all" else status)
    return [record_dict(r) for r in found]


def show_failed(record_id: str) -> dict[str, Any]:
    """One dead letter with its payload, whether its update was applied since, and its history."""
    return record_dict(get_failed(record_id), full=True)


def check_selection(record_ids: Sequence[str], every: bool, code: str | None) -> None:
    """Refuse ids with ``every``, neither, and ``code`` without ``every`` (``USAGE``)."""
    if bool(record_ids) == every:
        raise ValidationError("give record ids or --all, not both and not neither", code="USAGE")
    if code and not every:
        raise ValidationError("--code only goes with --all", code="USAGE")


def select_failed(
    record_ids: Sequence[str] = (), every: bool = False, code: str | None = None
) -> list[FailedUpdate]:
    """The dead letters a selection names: each id's (any status), or every open one."""
    check_selection(record_ids, every, code)
    if every:
        return find_failed(code=code)
    return [get_failed(i) for i in record_ids]


def retry_failed_updates(
    record_ids: Sequence[str] = (),
    every: bool = False,
    code: str | None = None,
    on_skip: Skipped | None = None,
) -> dict[str, Any]:
    """Re-send with the original request id: a retried update can never count twice.

    With ``every``, records that kept no full payload cannot be retried and are passed
    over (each handed to ``on_skip``); named by id, such a record is refused.

    Raises:
        MesError: ``PAYLOAD_TRUNCATED``, ``UNRETRYABLE``, or the producer's ``QueueError``
            (nothing recorded); the records re-sent before it stay re-sent.
    """
    records = select_failed(record_ids, every, code)
    if every:
        unsendable = [r for r in records if r.payload_truncated or not r.payload]
        for record in unsendable:
            if on_skip is not None:
                on_skip(record)
        records = [r for r in records if r not in unsendable]
    done: list[dict[str, Any]] = []
    for r in records:
        was, applied = r.status, _applied(r)
        done.append({**_brief(r), "was": was, "applied_before": applied, "task_id": retry_failed(r, _send)})
    return {"re_sent": done}


def discard_failed_updates(
    record_ids: Sequence[str] = (), every: bool = False, code: str | None = None
) -> dict[str, Any]:
    """Give up on the dead letters of a selection (``discard_records``)."""
    return discard_records(select_failed(record_ids, every, code))


def discard_records(records: Sequence[FailedUpdate]) -> dict[str, Any]:
    """Give up on these dead letters; they stay listed, with status discarded, for the record."""
    done: list[dict[str, Any]] = []
    already: list[dict[str, Any]] = []
    for record in records:
        (done if discard_failed(record) else already).append(_brief(record))
    return {"discarded": done, "already_discarded": already}


def record_dict(record: FailedUpdate, full: bool = False) -> dict[str, Any]:
    """A dead letter as JSON-ready data; ``full``: with its payload and history."""
    data: dict[str, Any] = {
        "id": str(record.id),
        "request_id": record.request_id,
        "work_order_id": record.work_order_id,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "attempts": record.attempts,
        "status": record.status,
        "first_failed_at": record.first_failed_at.isoformat(),
        "last_failed_at": record.last_failed_at.isoformat(),
    }
    if full:
        data["task_name"] = record.task_name
        data["task_id"] = record.task_id
        data["payload"] = record.payload
        data["applied_since"] = _applied(record)
        data["history"] = [{**e, "at": e["at"].isoformat()} for e in record.history]
    return data


def _send(args: list[Any], kwargs: dict[str, Any]) -> str:
    """Send as ``update_quantity.apply_async`` does (published, recorded in the outbox); the job id."""
    job_id = str(uuid.uuid4())
    try:
        sent = default_producer().send(job_id, args, kwargs, {})
    except TypeError as exc:  # an UNPUBLISHABLE entry: its payload can never be sent
        raise ValidationError(f"cannot be retried: {exc}", code="UNRETRYABLE") from None
    if sent.error is not None:
        raise sent.error
    return job_id  # spooled is sent too: the relay publishes it under this id


def _brief(record: FailedUpdate) -> dict[str, Any]:
    return {"id": str(record.id), "request_id": record.request_id}


def _applied(record: FailedUpdate) -> bool:
    return bool(QuantityLog.objects(request_id=record.request_id).count() > 0)
