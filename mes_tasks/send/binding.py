"""Binding a batch's items to updates, before anything is sent.

A call's arguments are bound by ``validation.bind_update``: one that does not fit (a stray
keyword, a missing argument) is a mistake at the call site, ``TypeError``, nothing kept. A
batch item is judged on its own: its job, the index of an earlier item with the same update,
or its refusal.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from mes_tasks.errors import RequestIdConflict, ValidationError
from mes_tasks.send.answers import refused
from mes_tasks.send.outbox import Job
from mes_tasks.validation import UpdateRequest, shown, validate_item

MAX_BATCH_ITEMS = 10_000  # a larger batch is refused whole (BATCH_TOO_LARGE): send several


def job_of(req: UpdateRequest) -> Job:
    """A validated update under a new job id, which stands in for a missing request id."""
    job_id = str(uuid.uuid4())
    kwargs = {"request_id": req.request_id or job_id, "context": req.context or None}
    return Job(job_id, [req.work_order_id, req.kind, req.quantity], kwargs)


def listed(items: Iterable[Any]) -> list[Any]:
    if isinstance(items, str | bytes | dict):
        raise TypeError(f"submit_quantity_updates takes a list of items, not a {type(items).__name__}")
    return list(items)


def too_large(n: int) -> list[dict[str, Any]]:
    """Every item's answer to a batch of ``n`` items, more than ``MAX_BATCH_ITEMS``."""
    refusal = refused(ValidationError(
        f"a batch takes at most {MAX_BATCH_ITEMS:,} items and this one has {n:,}: nothing was sent; "
        "send it as several batches", code="BATCH_TOO_LARGE"))  # fmt: skip
    return [dict(refusal) for _ in range(n)]


def slots(items: list[Any]) -> list[Job | int | dict[str, Any]]:
    """Per item: its job, the index of an earlier item with the same update, or its refusal."""
    slots: list[Job | int | dict[str, Any]] = []
    first: dict[str, tuple[int, Job]] = {}  # request id -> the item that carries it first
    for i, item in enumerate(items):
        try:
            job = job_of(validate_item(item))
        except ValidationError as exc:
            slots.append(refused(exc))
            continue
        at, earlier = first.setdefault(job.kwargs["request_id"], (i, job))
        slots.append(job if earlier is job else repeated(at, earlier, job))
    return slots


def repeated(at: int, earlier: Job, job: Job) -> int | dict[str, Any]:
    """An update whose request id item ``at`` carries: a duplicate of it, or a conflict."""
    if earlier.args == job.args:
        return at
    conflict = RequestIdConflict(
        f"request id {shown(job.kwargs['request_id'])} is item {at}'s, for a different update "
        f"({', '.join(map(str, earlier.args))}); nothing was sent for this item"
    )
    return refused(conflict)
