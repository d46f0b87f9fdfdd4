"""What operators ask: queue lengths, in-flight messages, held locks, workers, pause/resume."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery

from mes_tasks.broker import in_flight_by_queue, task_id_of
from mes_tasks.db import mongo_errors, redis_errors
from mes_tasks.errors import MesError, RedisUnavailable
from mes_tasks.keys import lease_key, lock_key, pause_key, unrecorded_key
from mes_tasks.models import AuditReport, FailedUpdate, OutboxMessage, utcnow
from mes_tasks.names import AUDIT_QUEUE, WORKORDER_QUEUE
from mes_tasks.partitions import every_queue
from mes_tasks.queues import UNACKED_KEY, ask_waiting, in_use, waiting_from
from mes_tasks.send import outbox
from mes_tasks.settings import Settings

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
        replies = _active_queues(app, timeout_s)
    except Exception as exc:  # kombu raises its own OperationalError subclasses
        raise RedisUnavailable(f"cannot ask the workers: {exc}") from exc
    by_queue: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for queue in queues:
            by_queue.setdefault(queue["name"], []).append(worker)
    return by_queue


def _active_queues(app: Celery, timeout_s: float) -> dict[str, Any]:
    """``inspect active_queues``, asked twice when the first ask finds its connection dead.

    A long-lived process keeps pooled broker connections; after a Redis restart the first
    one it takes is closed by the server, and dropped: the second ask gets a fresh one.
    """
    try:
        return app.control.inspect(timeout=timeout_s).active_queues() or {}
    except (redis.ConnectionError, ConnectionError):
        return app.control.inspect(timeout=timeout_s).active_queues() or {}


def backlog(client: redis.Redis, queue: str = WORKORDER_QUEUE) -> int:
    """Messages waiting in ``queue`` plus every delivered, unacknowledged one (all queues)."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        asked = ask_waiting(pipe, [queue])
        pipe.hlen(UNACKED_KEY)
        replies = pipe.execute()
    return waiting_from([queue], replies[:asked])[queue] + int(replies[asked])


def watched_queues(client: redis.Redis, settings: Settings) -> list[str]:
    """The queues ``queue status`` shows: every workorder queue in use, leftovers too, then ``audit``."""
    return [*in_use(client, settings.partitions), AUDIT_QUEUE]


def partition_status(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Per workorder queue: waiting, in flight, holder (host:pid:tag), paused, oldest age (s)."""
    prefix, queues = settings.key_prefix, in_use(client, settings.partitions)
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        asked = ask_waiting(pipe, queues)
        for queue in queues:
            pipe.lindex(queue, -1)  # kombu pushes on the left, pops on the right
            pipe.get(lease_key(prefix, queue))
            pipe.exists(pause_key(prefix), pause_key(prefix, queue))
        replies = pipe.execute()
        in_flight = in_flight_by_queue(client, UNACKED_KEY)
    waiting, replies = waiting_from(queues, replies[:asked]), replies[asked:]
    fields = ("head", "lease", "paused")
    rows = [
        {"waiting": waiting[q], **dict(zip(fields, replies[i * 3 : i * 3 + 3], strict=True))}
        for i, q in enumerate(queues)
    ]
    heads = {task_id_of(r["head"]): q for q, r in zip(queues, rows, strict=True) if r["head"]}
    with mongo_errors():
        created = {d["job_id"]: d["created_at"] for d in OutboxMessage._get_collection().find(
            {"job_id": {"$in": sorted(heads)}}, {"job_id": 1, "created_at": 1})}  # fmt: skip
    now = utcnow()
    return [
        {
            "queue": queue,
            "waiting": int(row["waiting"]),
            "in_flight": in_flight.get(queue, 0),
            "holder": str(row["lease"]).split("/", 1)[0] if row["lease"] else None,
            "paused": bool(row["paused"]),
            "oldest_age_s": _age_s(created.get(task_id_of(row["head"])) if row["head"] else None, now),
        }
        for queue, row in zip(queues, rows, strict=True)
    ]


def _age_s(created_at: Any, now: Any) -> float | None:
    if created_at is None:
        return None
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=now.tzinfo)
    return float(round((now - created_at).total_seconds(), 1))


def queue_status(app: Celery, client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """One snapshot of the whole pipeline's health."""
    queues = watched_queues(client, settings)
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        asked = ask_waiting(pipe, queues)
        pipe.hlen(UNACKED_KEY)
        pipe.get(pause_key(settings.key_prefix))
        pipe.get(unrecorded_key(settings.key_prefix))
        replies = pipe.execute()
        unacked, paused, unrecorded = replies[asked:]
        lengths = waiting_from(queues, replies[:asked]).values()
    by_queue = consumers(app)
    with mongo_errors():
        failed = FailedUpdate.objects(status="open").count()
        last: AuditReport | None = AuditReport.objects.order_by("-started_at").first()
    return {
        "queues": {
            q: {"waiting": n, "consumers": by_queue.get(q, [])} for q, n in zip(queues, lengths, strict=True)
        },
        "partitions": partition_status(client, settings),
        "unacked": unacked,
        "paused": None if paused is None else _pause_record(paused),
        "pauses": pauses(client, settings),
        "unrecorded": int(unrecorded or 0),
        "failed_open": failed,
        "outbox": outbox.counts(),
        "locks_held": len(held_locks(client, settings.key_prefix)),
        "last_audit": None if last is None else _audit_brief(last),
    }


def pause_state(
    client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE
) -> dict[str, Any] | None:
    """The pause in force on ``queue`` (``{"at": ...}``), or None; ``workorder``: on all."""
    with redis_errors():
        raw = client.get(pause_key(settings.key_prefix, queue))
    return None if raw is None else _pause_record(raw)


def pause(app: Celery, client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE) -> list[str]:
    """Pause ``queue`` until ``resume``: messages stay queued, the in-flight update completes.

    The pause is a Redis key that every ``workorder`` worker honours at start, when it
    takes the lease and on every tick, so a restart, a standby or a successor never
    undoes it. The consumers that answer are also told at once; returns their names.
    """
    with redis_errors():
        client.set(pause_key(settings.key_prefix, queue), json.dumps({"at": utcnow().isoformat()}))
    replies: list[dict[str, Any]] = []
    try:
        by_queue = consumers(app)
        for target in _targets(queue):
            consuming = by_queue.get(target, [])
            if consuming:
                replies += _control(app, "cancel_consumer", target, destination=consuming)
    except MesError:  # recorded all the same: the workers honour it at their next tick
        return []
    return sorted({name for reply in replies for name in reply})


def pauses(client: redis.Redis, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every pause in force: ``workorder`` (all queues) and each queue's own, with when it began."""
    names = every_queue()
    with redis_errors():
        raws = client.mget([pause_key(settings.key_prefix, q) for q in names])
    return {q: _pause_record(raw) for q, raw in zip(names, raws, strict=True) if raw is not None}


def resume(app: Celery, client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE) -> list[str]:
    """End the pauses that cover ``queue`` (``end_pauses``); the workers consuming it again."""
    end_pauses(client, settings, queue)
    return wait_for_consumers(app, queue)


def end_pauses(client: redis.Redis, settings: Settings, queue: str = WORKORDER_QUEUE) -> list[str]:
    """End every pause ``queue`` covers; the queues whose pause ended.

    ``workorder`` covers them all: the pause of every queue and each queue's own.
    ``workorder.{i}`` covers its own only; the pause of every queue outlasts it.

    Raises:
        MesError: ``NOT_PAUSED`` (nothing to end), or ``PAUSED_AS_A_WHOLE`` (only the
            pause of every queue holds ``queue``: ending it is ``queue resume``'s job).
    """
    names = every_queue() if queue == WORKORDER_QUEUE else [queue]
    with redis_errors():
        pipe = client.pipeline(transaction=True)
        for name in names:
            pipe.delete(pause_key(settings.key_prefix, name))
        ended = [name for name, n in zip(names, pipe.execute(), strict=True) if n]
    if ended:
        return ended
    whole = pause_state(client, settings)
    if whole is not None:
        raise MesError(
            f"{queue!r} has no pause of its own: every workorder queue is paused (since {whole['at']}); "
            "`celery -A mes_tasks queue resume` without --partition ends that pause",
            code="PAUSED_AS_A_WHOLE",
        )
    raise MesError(f"{queue!r} is not paused", code="NOT_PAUSED")


def wait_for_consumers(app: Celery, queue: str = WORKORDER_QUEUE) -> list[str]:
    """The workers seen consuming ``queue`` within ``RESUME_WAIT_S`` (none: no active worker runs).

    Only a lease holder ever consumes, never another worker.
    """
    deadline = time.monotonic() + RESUME_WAIT_S
    while True:
        by_queue = consumers(app)
        consuming = sorted({w for target in _targets(queue) for w in by_queue.get(target, [])})
        if consuming or time.monotonic() > deadline:
            return consuming
        time.sleep(0.2)


def _targets(queue: str) -> list[str]:
    """The queues a pause of ``queue`` stops: every workorder queue, whatever N, for ``workorder``."""
    return every_queue() if queue == WORKORDER_QUEUE else [queue]


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
