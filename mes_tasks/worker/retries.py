"""What the worker does with a failed update: retry it with backoff, wait for its count, or dead-letter it.

A transient failure (a store away, a busy lock) is retried on a countdown, up to
``MES_RETRY_MAX`` times; a correction that would take a counter below zero waits up to
``MES_NEGATIVE_WAIT_S`` for its count; a permanent refusal, or a transient one that
outlasted every retry, becomes one dead letter, logged and counted once.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, NoReturn

import redis
from celery.exceptions import Reject

from mes_tasks import tally
from mes_tasks.apply.deadletter import Failure, record_failure, record_repeat
from mes_tasks.errors import (
    MesError,
    MongoUnavailable,
    NegativeCounter,
    PermanentError,
    RedisUnavailable,
    TransientError,
)
from mes_tasks.keys import negative_wait_key
from mes_tasks.settings import Settings
from mes_tasks.worker.state import STATE, LedgerTask

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500  # of an unexpected error's text, in logs and dead letters
# A correction that overtook its count is looked at again this many times on the backoff's
# first step before the steps grow: the count is usually a few seconds behind (spooled in an
# outage and relayed once the broker is back), and the third step (2-4 s) made it wait on.
NEGATIVE_QUICK_RETRIES = 4


class InternalError(TransientError):
    """An unexpected error; retried like a transient one, then dead-lettered."""

    code = "INTERNAL_ERROR"


def backoff_s(retries: int, settings: Settings) -> float:
    """Capped exponential backoff with jitter (half to full of the capped step)."""
    step = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
    return float(step * random.uniform(0.5, 1.0))


def negative_wait_backoff_s(retries: int, settings: Settings) -> float:
    """The countdown of a correction waiting for its count: the first ``NEGATIVE_QUICK_RETRIES``
    retries each wait the first step of ``backoff_s``, the later ones its growing steps."""
    return backoff_s(max(0, retries - NEGATIVE_QUICK_RETRIES + 1), settings)


def count(outcome: str, code: str | None = None, apply_ms: float | None = None) -> None:
    """Count the outcome for ``celery -A mes_tasks metrics``: in memory, flushed between tasks."""
    STATE.tally.add(outcome, code, apply_ms)


def retry_or_dead_letter(task: LedgerTask, exc: MesError) -> NoReturn:
    settings = task.ledger.settings
    if task.request.retries < settings.retry_max:
        countdown = backoff_s(task.request.retries, settings)
        log.warning("%s: %s; retry %d in %.2fs", exc.code, exc.message, task.request.retries + 1, countdown)
        count(tally.RETRIED, exc.code)
        retry(task, exc, countdown)
    dead_letter(task, exc)


def retry(task: LedgerTask, exc: Exception, countdown: float) -> NoReturn:
    """``task.retry``; a retry the broker did not take sends the message back to its queue.

    Celery rejects a message whose retry it could not publish (the broker away or silent)
    without requeueing it: the update would live on only in the outbox (or nowhere, with
    ``MES_JOURNAL=0``). Requeued, it is applied again at once; if the broker refuses that too,
    it stays unacknowledged and comes back when this worker's connection does, or with the
    next holder of its queue.
    """
    try:
        raise task.retry(exc=exc, countdown=countdown)
    except Reject as rejected:
        if rejected.requeue:
            raise
        log.warning("the retry of %s was not published (%s): back to its queue",
                    task.request.id, rejected.reason)  # fmt: skip
        raise Reject(rejected.reason, requeue=True) from rejected


def wait_for_count_or_dead_letter(task: LedgerTask, exc: NegativeCounter, request_id: str) -> NoReturn:
    """A correction that would go below zero may have overtaken its count: retry it for a while.

    Its count may still be on its way (spooled during an outage, or retried after
    ``LOCK_BUSY``), so the refusal is final only ``MES_NEGATIVE_WAIT_S`` after the first one.
    """
    settings = task.ledger.settings
    try:
        waited = _negative_waited_s(task.ledger.redis, settings, request_id)
    except redis.RedisError as store_exc:
        retry_or_dead_letter(task, RedisUnavailable(f"Redis unreachable: {store_exc}"))
    left = settings.negative_wait_s - waited
    if left <= 0:
        dead_letter(task, exc)
    countdown = min(negative_wait_backoff_s(task.request.retries, settings), left)
    log.warning("%s: %s; its count may be late: retry in %.2fs (%.0fs of %gs waited)",
                exc.code, exc.message, countdown, waited, settings.negative_wait_s)  # fmt: skip
    count(tally.RETRIED, exc.code)
    retry(task, exc, countdown)


def _negative_waited_s(client: redis.Redis, settings: Settings, request_id: str) -> float:
    """Seconds since this update was first refused for going below zero (0 the first time)."""
    key = negative_wait_key(settings.key_prefix, request_id)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(key, f"{now:.3f}", nx=True, ex=int(2 * settings.negative_wait_s) + 1)
    pipe.get(key)
    _, first = pipe.execute()
    return max(0.0, now - float(first or now))


def dead_letter(task: LedgerTask, exc: MesError) -> NoReturn:
    req = task.request
    request_id = req.kwargs.get("request_id") if req.kwargs else None
    failure = Failure(
        task_name=task.name,
        task_id=req.id,
        request_id=request_id if isinstance(request_id, str) and request_id else req.id,
        work_order_id=_work_order_of(req.args, req.kwargs),
        args=req.args or (),
        kwargs=req.kwargs or {},
        error=exc,
        attempts=req.retries + 1,
    )
    try:
        repeated = record_repeat(failure)
        if not repeated:
            record_failure(failure)
    except MongoUnavailable as store_exc:
        # Nothing recorded it: keep the message alive rather than drop the update.
        log.error("dead-letter store unreachable (%s); retrying %s", store_exc, req.id)
        retry(task, store_exc, task.ledger.settings.retry_backoff_max_s)
    _report_dead_letter(failure.request_id, exc, repeated)
    raise exc


def _report_dead_letter(request_id: str, exc: MesError, repeated: bool) -> None:
    """Log and count a final failure once per dead letter.

    A request id sent again while its dead letter is open (a scanner's repeat) is a
    duplicate of that refusal: the tally counts it as ``duplicate``, as the ledger counts
    the repeat of an applied update, so one dead letter is one ``dead_lettered``.
    """
    if repeated:
        log.info("update %s refused again [%s]: its dead letter is open already", request_id, exc.code)
        count(tally.DUPLICATE)
        return
    # A refusal (unknown work order, negative counter, conflicting request id) is routine on a
    # plant floor: one WARNING line. A transient cause that outlasted every retry is an ERROR.
    level = logging.WARNING if isinstance(exc, PermanentError) else logging.ERROR
    log.log(level, "update %s dead-lettered [%s]: %s", request_id, exc.code, exc.message)
    count(tally.DEAD_LETTERED, exc.code)


def queue_of(request: Any) -> str | None:
    """The queue a message came from (kombu routes by the queue's name)."""
    info = request.delivery_info or {}
    key = info.get("routing_key")
    return key if isinstance(key, str) and key else None


def _work_order_of(args: Any, kwargs: Any) -> str | None:
    value = (args[0] if args else None) or (kwargs or {}).get("work_order_id")
    return value if isinstance(value, str) else None
