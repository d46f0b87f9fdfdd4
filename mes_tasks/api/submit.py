"""Submissions over HTTP: the producer's own path, with the request id also taken from ``Idempotency-Key``.

Every answer is the result dict ``submit_quantity_update(s)`` gives (``send.answers``). One
thing is added before sending: an update whose request id is logged already is answered
at once, ``DUPLICATE`` with the log's value (or ``REQUEST_ID_CONFLICT`` for another update
under that id), and not sent again. That is what makes a main app's retry of an HTTP call
whose first call went through cheap and plain; the count is exactly-once either way,
since the worker's log decides.

Only a request id marked as sent (``Producer.sent_before``: queued by a submission within
``SENT_MARK_S``) is looked up: a first call, the common case, costs MongoDB nothing before
it is sent. One that is not marked (sent by ``.delay()``, or longer ago) is sent again,
answered ``QUEUED``, and the log counts it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mes_tasks.api.errors import ApiError
from mes_tasks.db import mongo_errors
from mes_tasks.errors import MongoUnavailable, QueueError, RequestIdConflict, ValidationError
from mes_tasks.models import QuantityLog
from mes_tasks.send.answers import refused
from mes_tasks.send.binding import MAX_BATCH_ITEMS
from mes_tasks.send.producer import Producer
from mes_tasks.validation import shown, validate_item

IDEMPOTENCY_HEADER = "Idempotency-Key"
DUPLICATE = "DUPLICATE"


def with_key(item: dict[str, Any], key: str | None) -> dict[str, Any]:
    """The item with its request id from ``Idempotency-Key`` if given; both given must agree."""
    if key is None:
        return item
    given = item.get("request_id")
    if given is not None and given != key:
        raise ApiError(
            f"the {IDEMPOTENCY_HEADER} header and request_id differ ({shown(key)}, {shown(given)}): "
            "send one, or the same in both",
            code="IDEMPOTENCY_KEY_MISMATCH",
        )
    return {**item, "request_id": key}


def submit_one(producer: Producer, item: dict[str, Any]) -> dict[str, Any]:
    """One update's result dict; see the module docstring."""
    try:
        req = validate_item(item)
    except ValidationError as exc:
        return refused(exc)
    logged = _logged_of(producer, [req.request_id] if req.request_id else [])
    if req.request_id in logged:
        return _already(logged[req.request_id], item)
    return producer.submit_valid(req)


def submit_batch(producer: Producer, items: Sequence[Any]) -> list[dict[str, Any]]:
    """Each item's result dict, in order; see ``submit_quantity_updates``.

    Items whose request id is logged already are answered here; the others go out through
    the batch path together (one pipeline per chunk, one outbox write per chunk).
    """
    if len(items) > MAX_BATCH_ITEMS:
        raise ApiError(
            f"a batch takes at most {MAX_BATCH_ITEMS:,} updates and this one has {len(items):,}: nothing was "
            "sent; send it as several batches",
            code="BATCH_TOO_LARGE",
        )
    logged = _logged_of(producer, _request_ids(items))
    results: list[dict[str, Any] | None] = [None] * len(items)
    sent_at = []
    for i, item in enumerate(items):
        rid = item.get("request_id") if isinstance(item, dict) else None
        if isinstance(rid, str) and rid in logged:
            results[i] = _already(logged[rid], item)
        else:
            sent_at.append(i)
    answers = producer.submit_many([items[i] for i in sent_at])
    for i, answer in zip(sent_at, answers, strict=True):
        if "duplicate_of" in answer:  # an index among the items sent: make it the caller's
            answer = {**answer, "duplicate_of": sent_at[answer["duplicate_of"]]}
        results[i] = answer
    return [r for r in results if r is not None]


def nothing_recorded(results: Sequence[dict[str, Any]]) -> bool:
    """Whether every update of a call was refused with nothing recorded (the caller must retry)."""
    return bool(results) and all(r.get("code") == QueueError.code for r in results)


def logged_updates(request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The logs of the request ids that have one, by request id (one query)."""
    if not request_ids:
        return {}
    fields = {"request_id": 1, "work_order_id": 1, "kind": 1, "quantity": 1, "value_after": 1,
              "task_id": 1, "created_at": 1, "_id": 0}  # fmt: skip
    with mongo_errors():
        found = QuantityLog._get_collection().find({"request_id": {"$in": list(set(request_ids))}}, fields)
        return {d["request_id"]: d for d in found}


def _logged_of(producer: Producer, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``logged_updates`` of those request ids that may be logged: the ones marked as sent, or
    all of them when Redis cannot say. Nothing with MongoDB down: the producer answers for
    the broker then (queued unrecorded, spooled, or nothing recorded), and the log decides."""
    marked = producer.sent_before(request_ids)
    try:
        return logged_updates(request_ids if marked is None else [r for r in request_ids if r in marked])
    except MongoUnavailable:
        return {}


def _request_ids(items: Sequence[Any]) -> list[str]:
    return [r for item in items if isinstance(item, dict) and isinstance(r := item.get("request_id"), str)]


def _already(log: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """The answer to an update whose request id is logged: the same update, or a conflict."""
    rid = log["request_id"]
    if (log["work_order_id"], log["kind"], log["quantity"]) != (
        item.get("work_order_id"), item.get("kind"), item.get("quantity")):  # fmt: skip
        return refused(RequestIdConflict(
            f"request id {shown(rid)} was applied to another update ({log['work_order_id']}, {log['kind']}, "
            f"{log['quantity']}); nothing was sent"))  # fmt: skip
    created = log.get("created_at")
    return {"success": True, "job_id": log.get("task_id"), "request_id": rid, "code": DUPLICATE,
            "recorded": True, "queue_length": None, "estimated_delay_ms": 0,
            "value_after": log.get("value_after"),
            "applied_at": created.isoformat() if created else None}  # fmt: skip
