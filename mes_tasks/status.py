"""What operators ask: queue lengths, in-flight messages, held locks, workers, pause/resume."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery

from mes_tasks import outbox
from mes_tasks.db import mongo_errors, redis_errors
from mes_tasks.errors import MesError, RedisUnavailable
from mes_tasks.keys import lock_key, pause_key, unrecorded_key
from mes_tasks.models import AuditReport, FailedUpdate, utcnow
from mes_tasks.names import QUEUES, WORKORDER_QUEUE
from mes_tasks.settings import Settings

UNACKED_KEY = "unacked"  # kombu's hash of delivered, unacknowledged messages (all queues)
INSPECT_TIMEOUT_S = 1.0
RESUME_WAIT_S = 5.0  # how long ``resume`` waits to see the active worker consume again


def held_locks(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every work-order lock currently held, with its owner token and remaining TTL."""
    pattern = lock_key(prefix, "*")
    start = len(lock_key(prefix, ""))
    with redis_errors():
        keys = sorted(client.scan_iter(match=pattern, count=500))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        values = pipe.execute()
    return [
        {"work_order_id": key[start:], "key": key, "token": values[2 * i], "ttl_ms": values[2 * i + 1]}
        for i, key in enumerate(keys)
        if values[2 * i] is not None
    ]


def consumers(app: Celery, timeout_s: float = INSPECT_TIMEOUT_S) -> dict[str, list[str]]:
    """Queue name -> workers that answered and consume it."""
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:  # kombu raises its own OperationalError subclasses
        raise RedisUnavailable(f"cannot ask the workers: {exc}") from exc
    by_queue: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for queue in queues:
            by_queue.setdefault(queue["name"], []).append(worker)
    return by_queue


def backlog(client: redis.Redis, queue: str = WORKORDER_QUEUE) -> int:
    """Messages waiting in ``queue`` plus every delivered, unacknowledged one (all queues)."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.hlen(UNACKED_KEY)
        waiting, unacked = pipe.execute()
    return int(waiting) + int(unacked)


def queue_status(app: Celery, client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """One snapshot of the whole pipeline's health."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.hlen(UNACKED_KEY)
        pipe.get(pause_key(settings.key_prefix))
        pipe.get(unrecorded_key(settings.key_prefix))
        *lengths, unacked, paused, unrecorded = pipe.execute()
    by_queue = consumers(app)
    with mongo_errors():
        failed = FailedUpdate.objects(status="open").count()
        last: AuditReport | None = AuditReport.objects.order_by("-started_at").first()
    return {
        "queues": {
            q: {"waiting": n, "consumers": by_queue.get(q, [])} for q, n in zip(QUEUES, lengths, strict=True)
        },
        "unacked": unacked,
        "paused": None if paused is None else _pause_record(paused),
        "unrecorded": int(unrecorded or 0),
        "failed_open": failed,
        "outbox": outbox.counts(),
        "locks_held": len(held_locks(client, settings.key_prefix)),
        "last_audit": None if last is None else _audit_brief(last),
    }


def pause_state(client: redis.Redis, settings: Settings) -> dict[str, Any] | None:
    """The pause in force (``{"at": ...}``), or None."""
    with redis_errors():
        raw = client.get(pause_key(settings.key_prefix))
    return None if raw is None else _pause_record(raw)


def pause(app: Celery, client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE) -> list[str]:
    """Pause ``queue`` until ``resume``: messages stay queued, the in-flight update completes.

    The pause is a Redis key that every ``workorder`` worker honours at start, when it
    takes the lease and on every tick, so a restart, a standby or a successor never
    undoes it. The consumers that answer are also told at once; returns their names.
    """
    with redis_errors():
        client.set(pause_key(settings.key_prefix), json.dumps({"at": utcnow().isoformat()}))
    try:
        consuming = consumers(app).get(queue, [])
        replies = _control(app, "cancel_consumer", queue, destination=consuming) if consuming else []
    except MesError:  # recorded all the same: the workers honour it at their next tick
        return []
    return sorted(name for reply in replies for name in reply)


def resume(app: Celery, client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE) -> list[str]:
    """End the pause; the active ``workorder`` worker consumes again at its next tick.

    Returns the workers seen consuming ``queue`` within ``RESUME_WAIT_S`` (none: no
    active worker is running). Only the lease holder ever consumes, never another worker.
    """
    with redis_errors():
        if not client.delete(pause_key(settings.key_prefix)):
            raise MesError(f"{queue!r} is not paused", code="NOT_PAUSED")
    deadline = time.monotonic() + RESUME_WAIT_S
    while True:
        consuming = consumers(app).get(queue, [])
        if consuming or time.monotonic() > deadline:
            return consuming
        time.sleep(0.2)


def _pause_record(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"at": None}


def _control(app: Celery, command: str, queue: str, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        replies = getattr(app.control, command)(queue, reply=True, timeout=INSPECT_TIMEOUT_S, **kwargs)
    except Exception as exc:
        raise RedisUnavailable(f"cannot reach the workers: {exc}") from exc
    if not replies:
        raise MesError(f"no worker answered {command} for {queue!r}", code="NO_WORKER")
    return list(replies)


def _audit_brief(report: AuditReport) -> dict[str, Any]:
    return {
        "id": str(report.id),
        "started_at": report.started_at.isoformat(),
        "finding_count": report.finding_count,
        "repaired": report.repaired,
    }
