"""The workorder queue: its status, pause, resume and purge (``queue status|pause|resume|purge``)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from mes_tasks import broker
from mes_tasks.errors import ValidationError
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.ops import status
from mes_tasks.ops.stores import Stores
from mes_tasks.partitions import index_of, queue_of
from mes_tasks.queues import in_use
from mes_tasks.send import outbox


def queue_status(app: Celery, stores: Stores) -> dict[str, Any]:
    """Waiting and in-flight messages, consumers, pauses, failed updates, outbox, locks, last audit."""
    return status.queue_status(app, stores.redis, stores.settings)


def queue_target(stores: Stores, partition: int | None = None) -> str:
    """``workorder`` (every workorder queue), or one partition's queue: current or a leftover.

    Raises:
        ValidationError: ``INVALID_PARTITION``, neither a partition of ``MES_PARTITIONS`` nor
            a leftover ``workorder.I`` of another N that holds updates.
    """
    if partition is None:
        return WORKORDER_QUEUE
    settings = stores.settings
    current = [] if settings.partitions == 1 else list(range(settings.partitions))
    leftovers = [i for q in in_use(stores.redis, settings.partitions) if (i := index_of(q)) is not None]
    if partition in current or partition in leftovers:
        return queue_of(partition)
    known = ", ".join(str(i) for i in sorted(set(current) | set(leftovers))) or "none"
    ranged = "none (there is one queue, workorder)" if not current else f"0 to {settings.partitions - 1}"
    raise ValidationError(
        f"--partition {partition}: MES_PARTITIONS is {settings.partitions}, so the partitions are {ranged}, "
        f"and no leftover workorder.{partition} of another N holds updates (partitions in use: {known})",
        code="INVALID_PARTITION",
    )


def pause_queue(app: Celery, stores: Stores, partition: int | None = None) -> dict[str, Any]:
    """Pause the workorder queues (or one partition's) until resumed; the consumers told at once."""
    target = queue_target(stores, partition)
    workers = status.pause(app, stores.redis, stores.settings, target)
    return {"paused": True, "queue": target, "stopped_on": workers}


def resume_queue(app: Celery, stores: Stores, partition: int | None = None) -> dict[str, Any]:
    """End the pauses the target covers; the workers seen consuming it again.

    Raises:
        MesError: ``NOT_PAUSED``, or ``PAUSED_AS_A_WHOLE`` (``status.end_pauses``).
    """
    target = queue_target(stores, partition)
    ended = status.end_pauses(stores.redis, stores.settings, target)
    workers = status.wait_for_consumers(app, target)
    return {"paused": False, "queue": target, "ended": ended, "consumed_by": workers}


def purge_queue(app: Celery, stores: Stores, partition: int | None = None) -> dict[str, Any]:
    """Drop every waiting update of the target for good, with its outbox record so it is not re-sent.

    ``workorder`` takes every workorder queue in use, leftovers of another N too.
    """
    target = queue_target(stores, partition)
    queues = in_use(stores.redis, stores.settings.partitions) if target == WORKORDER_QUEUE else [target]
    with app.connection_for_write() as conn:
        job_ids = [i for q in queues for i in broker.take_waiting(conn.default_channel, q)]
    return {"purged": len(job_ids), "outbox_removed": outbox.forget(job_ids), "job_ids": job_ids}
