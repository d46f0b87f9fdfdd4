"""The dead-letter store: updates that could not be applied, kept for operators."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError, MongoUnavailable, ValidationError
from mes_tasks.models import FAILED_STATUSES, FailedUpdate, utcnow
from mes_tasks.validation import MAX_UPDATE_BYTES, SHOWN_CHARS, check_work_order_id

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024  # of a dead letter's payload JSON; a longer one keeps this prefix
MAX_TEXT_CHARS = 1000  # of an error message, task id or work order id in a dead letter
MAX_HISTORY = 50  # events kept per dead letter, the newest


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

    Every part is bounded (payload, messages, the last ``MAX_HISTORY`` events), so the
    record fits in a MongoDB document whatever the update held; should the server refuse
    it all the same, a record without the payload is kept instead.

    Raises:
        MongoUnavailable: nothing could be recorded; the caller must not drop the task.
    """
    now = utcnow()
    payload, truncated = _payload(failure.args, failure.kwargs)
    refused = _upsert(failure.request_id, _changes(failure, now, payload, truncated))
    if refused is None:
        return
    log.warning(
        "dead letter %s refused (%s); recording it without its payload", _key(failure.request_id), refused
    )
    minimal = _without_payload(failure)
    refused = _upsert(minimal.request_id, _changes(minimal, now, None, True, f"payload not kept: {refused}"))
    if refused is not None:
        raise MongoUnavailable(f"the dead-letter store refused even a record without payload: {refused}")


def record_repeat(failure: Failure) -> bool:
    """Note a refusal of a request id whose dead letter is still open: a duplicate of that refusal.

    The record keeps its attempts, status and last failure time; its history gets a
    ``repeated`` event. A record that is ``retried`` or ``discarded`` is not open: a failure
    then is a new one, for ``record_failure``.

    Returns:
        Whether an open dead letter had this request id.

    Raises:
        MongoUnavailable: MongoDB could not be reached.
    """
    clean = _without_payload(failure)  # an event the server can always encode
    event = {**_event(clean, utcnow()), "event": "repeated"}
    history = {"$push": {"history": {"$each": [event], "$slice": -MAX_HISTORY}}}
    try:
        with mongo_errors():
            done = FailedUpdate._get_collection().update_one(
                {"request_id": _key(failure.request_id), "status": "open"}, history
            )
    except MongoUnavailable:
        raise
    except Exception:  # a request id BSON cannot encode: record_failure files it as it can
        log.debug("could not look up the dead letter of %r", failure.request_id, exc_info=True)
        return False
    return bool(done.matched_count)


def _event(failure: Failure, now: datetime, note: str | None = None) -> dict[str, Any]:
    """One failure, as its history entry."""
    event = {"at": now, "event": "failed", "code": failure.error.code,
             "message": _clip(failure.error.message, MAX_TEXT_CHARS), "attempts": failure.attempts,
             "task_id": _clip(failure.task_id, MAX_TEXT_CHARS)}  # fmt: skip
    if note:
        event["note"] = note
    return event


def _changes(
    failure: Failure, now: datetime, payload: str | None, truncated: bool, note: str | None = None
) -> dict[str, Any]:
    event = _event(failure, now, note)
    return {
        "$set": {
            "task_name": failure.task_name,
            "task_id": event["task_id"],
            "payload": payload,
            "payload_truncated": truncated,
            "work_order_id": _clip(failure.work_order_id, MAX_TEXT_CHARS),
            "error_code": failure.error.code,
            "error_message": event["message"],
            "last_failed_at": now,
            "status": "open",
        },
        "$setOnInsert": {"first_failed_at": now},
        "$inc": {"attempts": failure.attempts},
        "$push": {"history": {"$each": [event], "$slice": -MAX_HISTORY}},
    }


def _upsert(request_id: str, changes: dict[str, Any]) -> str | None:
    """Store a dead letter; the server's reason when it refused, None once stored.

    Raises:
        MongoUnavailable: MongoDB could not be reached.
    """
    try:
        with mongo_errors():
            FailedUpdate._get_collection().update_one({"request_id": _key(request_id)}, changes, upsert=True)
    except MongoUnavailable:
        raise
    except Exception as exc:  # e.g. DocumentTooLarge, or text BSON cannot encode
        return _clip(f"{type(exc).__name__}: {exc}", MAX_TEXT_CHARS)
    return None


def _payload(args: Any, kwargs: Any) -> tuple[str, bool]:
    """The update as JSON, and whether it was cut at ``MAX_PAYLOAD_BYTES`` (then not valid JSON)."""
    value = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    chunks, size = [], 0
    for chunk in json.JSONEncoder(default=repr).iterencode(value):  # ASCII: a character is a byte
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_PAYLOAD_BYTES:
            return "".join(chunks)[:MAX_PAYLOAD_BYTES], True
    return "".join(chunks), False


def _without_payload(failure: Failure) -> Failure:
    """The failure as the smallest record: no payload, every text valid UTF-8."""
    error = MesError(_utf8(failure.error.message), code=failure.error.code)
    task_id, work_order_id = failure.task_id, failure.work_order_id
    return replace(
        failure,
        request_id=_utf8(failure.request_id),
        task_id=task_id and _utf8(task_id),
        work_order_id=work_order_id and _utf8(work_order_id),
        args=(),
        kwargs={},
        error=error,
    )


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _key(request_id: str) -> str:
    """The request id a dead letter is filed under: itself, or a digest of one too long to index."""
    if len(request_id) <= MAX_UPDATE_BYTES:
        return request_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{request_id[:SHOWN_CHARS]}…({len(request_id)} chars, sha256 {digest})"


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} chars)"


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
    if record.payload_truncated or not record.payload:
        raise MesError(
            f"dead letter {record.id} kept no full payload (it was too large): discard it and send the "
            "update again from its source",
            code="PAYLOAD_TRUNCATED",
        )
    payload = json.loads(record.payload)
    kwargs = dict(payload.get("kwargs") or {})
    kwargs["request_id"] = record.request_id
    # "retried" before the send: from the moment the update is in the outbox, this record
    # must not count as its outcome (the relay would settle it and never re-send it).
    with mongo_errors():
        FailedUpdate.objects(id=record.id).update_one(set__status="retried")
    try:
        task_id = send(list(payload.get("args") or []), kwargs)
    except BaseException as exc:
        _set_status(record, "open", event="retry_failed", message=f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    _set_status(record, "retried", task_id=task_id)
    return task_id


def discard_failed(record: FailedUpdate) -> bool:
    """Mark a dead letter as discarded; it stays, with its history, for the record.

    Returns:
        False when it was discarded already (then nothing changes).
    """
    entry = {"at": utcnow(), "event": "discarded"}
    with mongo_errors():
        changed = FailedUpdate.objects(id=record.id, status__ne="discarded").update_one(
            set__status="discarded", push__history=entry
        )
    record.reload()
    return bool(changed)


def _set_status(record: FailedUpdate, status: str, event: str | None = None, **extra: Any) -> None:
    entry = {"at": utcnow(), "event": event or status, **extra}
    with mongo_errors():
        FailedUpdate.objects(id=record.id).update_one(set__status=status, push__history=entry)
    record.reload()


def _plain(name: str, value: str) -> str:
    if not value.replace("_", "").isalnum():
        raise ValidationError(f"{name} must be letters, digits and underscores", code="INVALID_CODE")
    return value
