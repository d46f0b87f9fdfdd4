"""Binding a call to ``update_quantity``'s arguments, and a batch's items to updates, before anything is sent.

A call that does not fit (a stray keyword, a missing argument) is a mistake at the call site:
``TypeError``, nothing kept. A batch item is judged on its own: its job, the index of an
earlier item with the same update, or its refusal.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from mes_tasks.errors import RequestIdConflict, ValidationError
from mes_tasks.send.answers import refused
from mes_tasks.send.outbox import Job
from mes_tasks.validation import UPDATE_FIELDS, UpdateRequest, shown, unknown_keys, validate_item

REQUIRED_PARAMS = 3
MAX_BATCH_ITEMS = 10_000  # a larger batch is refused whole (BATCH_TOO_LARGE): send several


def bind_update(args: Any, kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    """``update_quantity``'s arguments as (work order, kind, quantity) and named ones.

    Raises:
        TypeError: they do not fit ``update_quantity``'s signature (a stray keyword such as
            ``countdown=5`` given to ``.delay()``): a mistake at the call site, never spooled.
    """
    positional, named = list(args or ()), dict(kwargs or {})
    if len(positional) > len(UPDATE_FIELDS):
        raise TypeError(
            f"update_quantity takes at most {len(UPDATE_FIELDS)} arguments, got {len(positional)}"
        )
    unknown = sorted(str(k) for k in unknown_keys(named, UPDATE_FIELDS))
    if unknown:
        raise TypeError(
            f"update_quantity got unexpected keyword argument(s) {unknown}; its parameters are "
            f"{', '.join(UPDATE_FIELDS)} (apply_async options such as countdown go to apply_async)"
        )
    given = dict(zip(UPDATE_FIELDS, positional, strict=False))
    twice = sorted(set(given) & set(named))
    if twice:
        raise TypeError(f"update_quantity got multiple values for argument(s) {twice}")
    merged = {**given, **named}
    missing = [p for p in UPDATE_FIELDS[:REQUIRED_PARAMS] if p not in merged]
    if missing:
        raise TypeError(f"update_quantity is missing required argument(s) {missing}")
    return [merged[p] for p in UPDATE_FIELDS[:REQUIRED_PARAMS]], {
        p: merged[p] for p in UPDATE_FIELDS[REQUIRED_PARAMS:] if p in merged
    }


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
