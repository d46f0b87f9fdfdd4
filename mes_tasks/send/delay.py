"""``update_quantity.delay()`` / ``apply_async()`` from the main app: the producer's path, Celery's handle.

The update is published and recorded as a submission is (``send.producer``); the caller
gets Celery's ``AsyncResult`` as usual, or ``TypeError`` for arguments that do not fit the
task, or ``QueueError`` when nothing was recorded.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Task
from celery.result import AsyncResult

from mes_tasks.app import app
from mes_tasks.send.producer import default_producer


def send_delayed(
    task: Task, args: Any, kwargs: Any, task_id: str | None, options: dict[str, Any]
) -> AsyncResult:
    """Send a ``.delay()`` of ``task`` (``update_quantity``) as a submission, under ``task_id`` if given."""
    job_id = task_id or str(uuid.uuid4())
    try:
        # TypeError at the call site for arguments that do not fit; QueueError: nothing recorded
        sent = default_producer().send(job_id, list(args or ()), dict(kwargs or {}), options)
    except Exception:
        forget_result_channel(job_id)
        raise
    if sent.result is None:  # spooled: the broker refused it
        forget_result_channel(job_id)
    return sent.result or task.AsyncResult(job_id)


def forget_result_channel(task_id: str) -> None:
    """Drop the result subscription a refused publish left behind, without a word to Redis.

    Celery subscribes to a task's result before it publishes; the relay re-sends a spooled
    update without a result, and an update not sent has none, so nothing ever arrives there.
    Left in place, the handle's ``__del__`` would unsubscribe over the dead connection (a
    reconnect and a "must be restarted" error in the main app); a reconnect subscribes only
    to what is left.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    subscribed = getattr(consumer, "subscribed_to", None)
    if isinstance(subscribed, set):
        subscribed.discard(app.backend.get_key_for_task(task_id))
