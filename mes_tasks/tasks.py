"""Celery tasks. ``update_quantity`` is the only way counters change."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import asdict
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Reject
from celery.result import AsyncResult

from mes_tasks import broker
from mes_tasks.app import app
from mes_tasks.apply.deadletter import Failure, record_failure, record_repeat
from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.alerts import summary
from mes_tasks.audit.reports import audit_and_report
from mes_tasks.errors import (
    MesError,
    MongoUnavailable,
    NegativeCounter,
    PermanentError,
    RedisUnavailable,
    TransientError,
)
from mes_tasks.keys import negative_wait_key
from mes_tasks.names import AUDIT_WORK_ORDERS, RELAY_OUTBOX, UPDATE_QUANTITY, WORKORDER_QUEUE
from mes_tasks.queues import in_use
from mes_tasks.send import outbox
from mes_tasks.send.producer import default_producer, publish
from mes_tasks.settings import Settings, get_settings
from mes_tasks.validation import check_work_order_id, readable, validate_update
from mes_tasks.worker import active as lease
from mes_tasks.worker import tally
from mes_tasks.worker.state import STATE

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500  # of an unexpected error's text, in logs and dead letters


class InternalError(TransientError):
    """An unexpected error; retried like a transient one, then dead-lettered."""

    code = "INTERNAL_ERROR"


class LedgerTask(Task):  # type: ignore[misc]
    """Base task: this worker process's ledger (see ``worker``)."""

    @property
    def ledger(self) -> Ledger:
        return STATE.ledger


class UpdateTask(LedgerTask):
    """``update_quantity``'s class: a ``.delay()`` from the main app is recorded in the outbox first.

    The task's own retries (``Task.retry`` passes ``retries``) are sent as Celery sends
    them: their update is in the outbox already. The relay sends by name
    (``producer.publish``) and never comes here.
    """

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> AsyncResult:
        if "retries" in options:
            return super().apply_async(args, kwargs, task_id=task_id, **{**readable(args, kwargs), **options})
        job_id = task_id or str(uuid.uuid4())
        try:
            # TypeError at the call site for arguments that do not fit; QueueError: nothing recorded
            sent = default_producer().send(job_id, list(args or ()), dict(kwargs or {}), options)
        except Exception:
            _forget_result_channel(job_id)
            raise
        if sent.result is None:  # spooled: the broker refused it
            _forget_result_channel(job_id)
        return sent.result or self.AsyncResult(job_id)


def _forget_result_channel(task_id: str) -> None:
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


def backoff_s(retries: int, settings: Settings) -> float:
    """Capped exponential backoff with jitter (half to full of the capped step)."""
    step = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
    return float(step * random.uniform(0.5, 1.0))


# max_retries=None: the retry budget is ours (MES_RETRY_MAX), not Celery's default of 3.
# throws: our own coded errors are dead-lettered and logged by us in one line; Celery logs
# them without a traceback ("raised expected"). An unexpected error keeps its traceback.
@app.task(
    bind=True,
    base=UpdateTask,
    name=UPDATE_QUANTITY,
    acks_late=True,
    max_retries=None,
    throws=(MesError,),
)
def update_quantity(
    self: LedgerTask,
    work_order_id: str,
    kind: str,
    quantity: int,
    request_id: str | None = None,
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Add ``quantity`` to the ``kind`` counter of a work order, exactly once per request id.

    Returns:
        ``{"status": "applied" | "duplicate", "value": counter after, "request_id": ..., ...}``
    """
    started = time.monotonic()
    if not lease.may_apply(_queue_of(self.request)):  # resumed after a stop, or handed over
        log.warning("not the active workorder consumer any more: handing %s back", self.request.id)
        raise Reject("not the active workorder consumer", requeue=True)
    try:
        req = validate_update(work_order_id, kind, quantity, request_id, context)
        result = self.ledger.apply(req, req.request_id or self.request.id, self.request.id)
    except NegativeCounter as exc:
        _wait_for_count_or_dead_letter(self, exc, req.request_id or self.request.id)
    except PermanentError as exc:
        _dead_letter(self, exc)
    except TransientError as exc:
        _retry_or_dead_letter(self, exc)
    except Exception as exc:
        log.exception("unexpected error in %s", self.request.id)
        _retry_or_dead_letter(self, InternalError(f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}"))
    STATE.record_duration(started)
    _count(result.status, apply_ms=(time.monotonic() - started) * 1000)
    return result.to_dict()


def _count(outcome: str, code: str | None = None, apply_ms: float | None = None) -> None:
    """Count the outcome for ``celery -A mes_tasks metrics``: in memory, flushed between tasks."""
    STATE.tally.add(outcome, code, apply_ms)


def _retry_or_dead_letter(task: LedgerTask, exc: MesError) -> NoReturn:
    settings = task.ledger.settings
    if task.request.retries < settings.retry_max:
        countdown = backoff_s(task.request.retries, settings)
        log.warning("%s: %s; retry %d in %.2fs", exc.code, exc.message, task.request.retries + 1, countdown)
        _count(tally.RETRIED, exc.code)
        raise task.retry(exc=exc, countdown=countdown)
    _dead_letter(task, exc)


def _wait_for_count_or_dead_letter(task: LedgerTask, exc: NegativeCounter, request_id: str) -> NoReturn:
    """A correction that would go below zero may have overtaken its count: retry it for a while.

    Its count may still be on its way (spooled during an outage, or retried after
    ``LOCK_BUSY``), so the refusal is final only ``MES_NEGATIVE_WAIT_S`` after the first one.
    """
    settings = task.ledger.settings
    try:
        waited = _negative_waited_s(task.ledger.redis, settings, request_id)
    except redis.RedisError as store_exc:
        _retry_or_dead_letter(task, RedisUnavailable(f"Redis unreachable: {store_exc}"))
    left = settings.negative_wait_s - waited
    if left <= 0:
        _dead_letter(task, exc)
    countdown = min(backoff_s(task.request.retries, settings), left)
    log.warning("%s: %s; its count may be late: retry in %.2fs (%.0fs of %gs waited)",
                exc.code, exc.message, countdown, waited, settings.negative_wait_s)  # fmt: skip
    _count(tally.RETRIED, exc.code)
    raise task.retry(exc=exc, countdown=countdown)


def _negative_waited_s(client: redis.Redis, settings: Settings, request_id: str) -> float:
    """Seconds since this update was first refused for going below zero (0 the first time)."""
    key = negative_wait_key(settings.key_prefix, request_id)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(key, f"{now:.3f}", nx=True, ex=int(2 * settings.negative_wait_s) + 1)
    pipe.get(key)
    _, first = pipe.execute()
    return max(0.0, now - float(first or now))


def _dead_letter(task: LedgerTask, exc: MesError) -> NoReturn:
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
        raise task.retry(exc=store_exc, countdown=task.ledger.settings.retry_backoff_max_s) from store_exc
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
        _count(tally.DUPLICATE)
        return
    # A refusal (unknown work order, negative counter, conflicting request id) is routine on a
    # plant floor: one WARNING line. A transient cause that outlasted every retry is an ERROR.
    level = logging.WARNING if isinstance(exc, PermanentError) else logging.ERROR
    log.log(level, "update %s dead-lettered [%s]: %s", request_id, exc.code, exc.message)
    _count(tally.DEAD_LETTERED, exc.code)


def _queue_of(request: Any) -> str | None:
    """The queue a message came from (kombu routes by the queue's name)."""
    info = request.delivery_info or {}
    key = info.get("routing_key")
    return key if isinstance(key, str) and key else None


def _work_order_of(args: Any, kwargs: Any) -> str | None:
    value = (args[0] if args else None) or (kwargs or {}).get("work_order_id")
    return value if isinstance(value, str) else None


@app.task(bind=True, base=LedgerTask, name=AUDIT_WORK_ORDERS, acks_late=False)
def audit_work_orders(
    self: LedgerTask, work_order_ids: list[str] | None = None, repair: bool | None = None
) -> dict[str, Any]:
    """Audit counters against logs (all work orders, or the given ones); store and alert.

    Acknowledged on receipt: an audit that dies is not re-run twice; the next one covers it.
    ``repair`` defaults to ``MES_AUDIT_REPAIR``.
    """
    ids = None if work_order_ids is None else [check_work_order_id(i) for i in work_order_ids]
    do_repair = self.ledger.settings.audit_repair if repair is None else bool(repair)
    report = audit_and_report(self.ledger, ids, do_repair=do_repair, trigger="schedule")
    return {"report_id": str(report.id), "finding_count": report.finding_count, "summary": summary(report)}


def _relayed(channel: Any) -> list[str]:
    """Every workorder queue that may hold an update: ``workorder``, the current N's, and
    any leftover of another N (a producer or worker on another ``MES_PARTITIONS``)."""
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        queues = in_use(client, get_settings().partitions)
    return [*dict.fromkeys([WORKORDER_QUEUE, *queues])]


@app.task(name=RELAY_OUTBOX, acks_late=False, ignore_result=True)
def relay_outbox(grace_s: float | None = None) -> dict[str, int]:
    """Publish spooled updates, drop settled ones, re-send what the broker lost (beat, every few s).

    ``grace_s`` defaults to ``MES_OUTBOX_GRACE_S``.
    """
    with app.connection_for_read() as conn:

        def held() -> set[str]:
            conn.ensure_connection(max_retries=1)  # Redis down: fail now, the next run tries again
            return broker.held_task_ids(conn.default_channel, _relayed(conn.default_channel))

        result = outbox.relay(
            publish, held, get_settings().outbox_grace_s if grace_s is None else grace_s
        )  # MongoDB connected at start-up
    if result:
        log.info("outbox: %s", result)
    return asdict(result)
