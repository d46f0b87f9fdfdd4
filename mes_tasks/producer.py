"""The producer side: validate, enqueue, and answer with a result dict, never an exception."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery.result import AsyncResult
from pymongo.collection import Collection

from mes_tasks import db, outbox
from mes_tasks.app import app
from mes_tasks.broker import is_outage
from mes_tasks.errors import MesError, QueueError, RequestIdConflict, ValidationError
from mes_tasks.keys import apply_ms_key, unrecorded_key
from mes_tasks.models import OutboxMessage
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.outbox import Job
from mes_tasks.partitions import queue_for, queue_names
from mes_tasks.settings import Settings, get_settings, mask_secrets
from mes_tasks.validation import (
    UPDATE_FIELDS,
    UpdateRequest,
    check_update_size,
    readable,
    shown,
    unknown_keys,
    validate_item,
    validate_update,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_APPLY_MS = 10.0  # estimate per queued update until the worker has measured one
OUTBOX_DOWN_BACKOFF_S = 1.0  # after the outbox failed, submissions skip it this long
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.3}
# Every publish, a .delay() from the main app included, fails over to the outbox within
# about a second; a caller's own options win, except these two.
PUBLISH_OPTIONS = {"retry": True, "retry_policy": PUBLISH_RETRY_POLICY}
REQUIRED_PARAMS = 3
# A batch publishes with retry=False and is retried as a whole (publish_all): a retry inside
# kombu's publish batch would revive the producer onto a channel the batch is not on.
BATCH_OPTIONS = {"ignore_result": True, "retry": False}
# Redis commands one update may buffer: its LPUSH, its task-sent event's PUBLISH, and a
# PEXPIRE per priority step for a queue that expires. A bound, so that the pipeline runs
# once, at the end of the batch.
BATCH_OPS_PER_UPDATE = 8


@dataclass
class Sent:
    """What became of one update: taken by the broker (``result``), or ``spooled`` for this reason.

    ``recorded``: whether the outbox holds it (False when MongoDB was down at the producer).
    """

    result: AsyncResult | None = None
    spooled: str | None = None
    recorded: bool = True
    error: QueueError | None = None  # the broker refused it and the outbox could not record it

    @property
    def queued(self) -> bool:
        """Whether the broker took it."""
        return self.spooled is None and self.error is None


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


class Producer:
    """Submits quantity updates; holds its Redis client for queue statistics."""

    def __init__(self, settings: Settings | None = None, redis_client: redis.Redis | None = None):
        self.settings = settings or get_settings()
        self.redis = redis_client or db.redis_client(self.settings)
        self._outbox: Collection[dict[str, Any]] | None = None
        self._outbox_down_until = 0.0
        self.unrecorded = 0  # submissions sent without an outbox record, in this process

    def submit(
        self,
        work_order_id: Any,
        kind: Any,
        quantity: Any,
        request_id: Any = None,
        context: Any = None,
    ) -> dict[str, Any]:
        """Validate and enqueue one update; see ``submit_quantity_update``."""
        try:
            job = _job(validate_update(work_order_id, kind, quantity, request_id, context))
            sent = self.send(*job)
        except (ValidationError, QueueError) as exc:
            return refused(exc)
        return self._answers([job], {job.job_id: sent})[job.job_id]

    def submit_many(self, items: Iterable[Any]) -> list[dict[str, Any]]:
        """Validate and enqueue a batch; see ``submit_quantity_updates``."""
        slots = _slots(items)
        jobs = [slot for slot in slots if isinstance(slot, Job)]
        answers = self._answers(jobs, self.send_many(jobs))
        results: list[dict[str, Any]] = []
        for slot in slots:
            if isinstance(slot, Job):
                results.append(answers[slot.job_id])
            elif isinstance(slot, int):  # the same update as an earlier item: that item's answer
                results.append({**results[slot], "duplicate_of": slot})
            else:
                results.append(slot)
        return results

    def send(
        self, job_id: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any] | None = None
    ) -> Sent:
        """Record the update in the outbox (``MES_JOURNAL``), then publish it.

        ``request_id`` defaults to ``job_id``.

        Returns:
            The broker's result handle, or the broker's reason when it refused the update,
            which then waits in the outbox for the relay.

        Raises:
            QueueError: the broker refused it and the outbox could not record it.
            TypeError, kombu's EncodeError: the arguments do not fit the task or are not JSON;
                nothing is kept.
            ValidationError: ``UPDATE_TOO_LARGE``; nothing is kept.
        """
        args, kwargs = bind_update(args, kwargs)
        kwargs["request_id"] = kwargs.get("request_id") or job_id
        check_update_size(args, kwargs)  # ValidationError here: the worker could only dead-letter it
        job = Job(job_id, args, kwargs)
        recorded = self._record([job])
        try:
            return Sent(result=publish(job_id, args, kwargs, options), recorded=bool(recorded))
        except Exception as exc:
            sent = self._after_refusal([job], recorded, exc)[job_id]
        if sent.error is not None:
            raise sent.error
        return sent

    def send_many(self, jobs: Sequence[Job]) -> dict[str, Sent]:
        """Record validated updates in one outbox write, then publish them in one pipeline.

        The outbox write runs on a thread of its own while the messages are prepared; the
        pipeline runs only once it is done, so the broker never holds what the outbox lacks.

        Returns:
            What became of each, by job id: queued; spooled (the broker refused the batch);
            or, where the outbox could not record it either, an ``error``.

        Raises:
            TypeError, kombu's EncodeError: an update does not fit the task; nothing is kept.
        """
        if not jobs:
            return {}
        recording = _started(lambda: self._record(jobs))
        try:
            publish_all(jobs, before_flush=recording)
        except Exception as exc:
            return self._after_refusal(jobs, recording(), exc)
        recorded = recording()
        return {job.job_id: Sent(recorded=job.job_id in recorded) for job in jobs}

    def _after_refusal(self, jobs: Sequence[Job], recorded: set[str], exc: Exception) -> dict[str, Sent]:
        """A publish failed: spool the updates if the broker is down, else forget them and re-raise."""
        if not is_outage(exc):
            if recorded:  # a mistake at the call site: never relay what can never be sent
                outbox.forget(sorted(recorded), self.outbox_collection())
            raise exc
        return self._spool(jobs, mask_secrets(f"{type(exc).__name__}: {exc}"), recorded)

    def _record(self, jobs: Sequence[Job]) -> set[str]:
        """The job ids the outbox now holds (none with ``MES_JOURNAL=0``)."""
        if not self.settings.journal:
            return set()
        if time.monotonic() < self._outbox_down_until:
            self._unrecorded(jobs, "it was unreachable a moment ago")
            return set()
        try:
            recorded = outbox.record_all(self.outbox_collection(), jobs)
        except MesError as exc:
            # Skip the outbox for a while rather than make every submission wait for a timeout.
            self._outbox_down_until = time.monotonic() + OUTBOX_DOWN_BACKOFF_S
            self._unrecorded(jobs, exc.message)
            return set()
        left_out = [job for job in jobs if job.job_id not in recorded]
        if left_out:
            self._unrecorded(left_out, "the outbox refused the entry")
        return recorded

    def _unrecorded(self, jobs: Sequence[Job], why: str) -> None:
        """Say, and count, that updates go to the broker without the outbox's protection."""
        self.unrecorded += len(jobs)
        log.warning("outbox unreachable, sending %s unrecorded: %s", _which(jobs), mask_secrets(why))
        try:
            self.redis.incrby(unrecorded_key(self.settings.key_prefix), len(jobs))
        except redis.RedisError:
            log.debug("could not count an unrecorded submission", exc_info=True)

    def _spool(self, jobs: Sequence[Job], reason: str, recorded: set[str]) -> dict[str, Sent]:
        """Broker down: mark the updates spooled in the outbox, or tell which nothing recorded."""
        try:
            outbox.spool_all(self.outbox_collection(), jobs, reason)
        except MesError as exc:
            kept = [job for job in jobs if job.job_id in recorded]
            lost = [job for job in jobs if job.job_id not in recorded]
            error = QueueError(
                f"nothing was recorded: the broker refused it ({reason}) "
                f"and the outbox is unreachable ({exc.message})"
            )
            if kept:  # kept as "sent": the relay re-sends them after the grace period
                log.warning("broker down, %s stays in the outbox as sent: %s", _which(kept), reason)
            if lost:
                log.error("could not enqueue nor spool %s: %s", _which(lost), error.message)
            return {job.job_id: Sent(spooled=reason) for job in kept} | {
                job.job_id: Sent(recorded=False, error=error) for job in lost
            }
        log.warning("broker down, spooled %s to the outbox: %s", _which(jobs), reason)
        return {job.job_id: Sent(spooled=reason) for job in jobs}

    def _answers(self, jobs: Sequence[Job], sent: dict[str, Sent]) -> dict[str, dict[str, Any]]:
        """Each update's result dict, by job id; the queue is read once, if any was queued."""
        queued = [job for job in jobs if sent[job.job_id].queued]
        length, per_update_ms = self.queue_state() if queued else (None, None)
        behind = {job.job_id: len(queued) - 1 - i for i, job in enumerate(queued)}  # queued after it
        return {job.job_id: _answer(job, sent[job.job_id], length, per_update_ms, behind.get(job.job_id, 0))
                for job in jobs}  # fmt: skip

    def outbox_collection(self) -> Collection[dict[str, Any]]:
        """The outbox, through a client of the producer's own (made on first use)."""
        if self._outbox is None:
            client = db.mongo_client(self.settings)
            self._outbox = client[self.settings.mongodb_db][OutboxMessage._meta["collection"]]
        return self._outbox

    def queue_stats(self) -> tuple[int | None, int | None]:
        """Messages waiting in ``workorder`` and the estimated wait for a new one (ms)."""
        length, per_update_ms = self.queue_state()
        return length, estimated_delay_ms(length, per_update_ms)

    def queue_state(self) -> tuple[int | None, float | None]:
        """Messages waiting per workorder queue (the mean, over partitions) and the worker's
        average time per update (ms)."""
        queues = queue_names(self.settings.partitions)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            pipe.get(apply_ms_key(self.settings.key_prefix))
            *lengths, apply_ms = pipe.execute()
        except redis.RedisError:
            return None, None
        return round(sum(lengths) / len(queues)), float(apply_ms) if apply_ms else DEFAULT_APPLY_MS


def estimated_delay_ms(length: int | None, per_update_ms: float | None, behind: int = 0) -> int | None:
    """The wait of an update with ``behind`` updates queued after it, of ``length`` waiting (ms).

    The update being applied counts too, and the update itself is always waiting.
    """
    if length is None or per_update_ms is None:
        return None
    return round((max(length - behind, 1) + 1) * per_update_ms)


def refused(exc: MesError) -> dict[str, Any]:
    """The result dict of an update that was not queued, nor kept."""
    extra = {"recorded": False} if isinstance(exc, QueueError) else {}
    return {"success": False, "job_id": None, "code": exc.code, **extra, "error": exc.message}


def _answer(
    job: Job, sent: Sent, length: int | None, per_update_ms: float | None, behind: int
) -> dict[str, Any]:
    if sent.error is not None:
        return refused(sent.error)
    rid = job.kwargs["request_id"]
    if sent.spooled is not None:
        return {"success": True, "job_id": job.job_id, "request_id": rid, "code": "SPOOLED", "recorded": True,
                "queue_length": None, "estimated_delay_ms": None, "error": sent.spooled}  # fmt: skip
    return {
        "success": True,
        "job_id": job.job_id,
        "request_id": rid,
        "code": "QUEUED",
        "recorded": sent.recorded,
        "queue_length": length,
        "estimated_delay_ms": estimated_delay_ms(length, per_update_ms, behind),
    }


def _job(req: UpdateRequest) -> Job:
    """A validated update under a new job id, which stands in for a missing request id."""
    job_id = str(uuid.uuid4())
    kwargs = {"request_id": req.request_id or job_id, "context": req.context or None}
    return Job(job_id, [req.work_order_id, req.kind, req.quantity], kwargs)


def _slots(items: Iterable[Any]) -> list[Job | int | dict[str, Any]]:
    """Per item: its job, the index of an earlier item with the same update, or its refusal."""
    if isinstance(items, str | bytes | dict):
        raise TypeError(f"submit_quantity_updates takes a list of items, not a {type(items).__name__}")
    slots: list[Job | int | dict[str, Any]] = []
    first: dict[str, tuple[int, Job]] = {}  # request id -> the item that carries it first
    for i, item in enumerate(items):
        try:
            job = _job(validate_item(item))
        except ValidationError as exc:
            slots.append(refused(exc))
            continue
        at, earlier = first.setdefault(job.kwargs["request_id"], (i, job))
        slots.append(job if earlier is job else _repeated(at, earlier, job))
    return slots


def _repeated(at: int, earlier: Job, job: Job) -> int | dict[str, Any]:
    """An update whose request id item ``at`` carries: a duplicate of it, or a conflict."""
    if earlier.args == job.args:
        return at
    conflict = RequestIdConflict(
        f"request id {shown(job.kwargs['request_id'])} is item {at}'s, for a different update "
        f"({', '.join(map(str, earlier.args))}); nothing was sent for this item"
    )
    return refused(conflict)


def _started(call: Callable[[], T]) -> Callable[[], T]:
    """``call``, started on a thread of its own; the function returned waits for its result."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future.result


def _which(jobs: Sequence[Job]) -> str:
    """Updates as a log line names them: the request id of one, the number of several."""
    return str(jobs[0].kwargs["request_id"]) if len(jobs) == 1 else f"{len(jobs)} updates"


def publish(
    job_id: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any] | None = None
) -> AsyncResult:
    """Send one update to the broker under ``job_id``, by task name, unrecorded (the relay's way).

    ``options``: ``apply_async`` options of a ``.delay()`` caller, passed on over the
    bounded publish retry (``PUBLISH_OPTIONS``), which a caller cannot switch off.

    ``ignore_result``: with a Redis result backend every ``apply_async`` otherwise
    subscribes the producer to the task's result channel, a subscription that only a
    ``.get()`` ever clears (a leak in a main app that never waits), and a Redis outage
    then blocks the call for the backend's ~20 s of reconnect retries. The outcome of an
    update is its ``QuantityLog`` or ``FailedUpdate``.
    """
    args, kwargs = bind_update(args, kwargs)  # TypeError: an entry that can never be sent
    given = {"ignore_result": True} if options is None else options
    return _send_task(Job(job_id, args, kwargs), {**given, **PUBLISH_OPTIONS})


def publish_all(jobs: Sequence[Job], before_flush: Callable[[], object] = lambda: None) -> None:
    """Send validated updates by task name on one pooled producer, in one Redis pipeline.

    kombu (5.7 and later) buffers each message's LPUSH in a pipeline that runs when the
    batch ends (``Producer.batch``), right after ``before_flush`` returns; without it, or
    on a transport that cannot batch, ``before_flush`` runs first and the messages go one
    by one, still on one producer and connection. The batch is retried as a whole, with
    the waits of ``PUBLISH_RETRY_POLICY``.

    Raises:
        The last broker error when every attempt failed: then no message was sent or, when
        the pipeline itself failed (kombu's ``BatchPublishError``), some may have been.
    """
    policy, retries = PUBLISH_RETRY_POLICY, int(PUBLISH_RETRY_POLICY["max_retries"])
    for attempt in range(retries + 1):
        try:
            return _publish_batch(jobs, before_flush)
        except Exception as exc:
            if attempt == retries or not is_outage(exc):
                raise
        time.sleep(min(policy["interval_start"] + attempt * policy["interval_step"], policy["interval_max"]))


def _publish_batch(jobs: Sequence[Job], before_flush: Callable[[], object]) -> None:
    with app.producer_or_acquire() as producer:
        batched = getattr(producer, "supports_batch_publish", False)
        if not batched:
            before_flush()
        with producer.batch(max_size=BATCH_OPS_PER_UPDATE * len(jobs)) if batched else nullcontext():
            for job in jobs:
                _send_task(job, {**BATCH_OPTIONS, "producer": producer})
            before_flush()


def _send_task(job: Job, options: dict[str, Any]) -> AsyncResult:
    """Every publish of an update; Flower and the logs show it as ``readable`` puts it.

    With ``MES_PARTITIONS`` > 1 the update goes to its work order's partition, whatever
    queue the caller named: one work order's updates must share one queue.
    """
    reprs = readable(job.args, job.kwargs)
    result: AsyncResult = app.send_task(
        UPDATE_QUANTITY, job.args, job.kwargs, task_id=job.job_id, **{**reprs, **options, **_route(job)}
    )
    return result


def _route(job: Job) -> dict[str, str]:
    partitions = get_settings().partitions
    if partitions == 1:
        return {}  # task_routes: workorder
    return {"queue": queue_for(str(job.args[0]), partitions)}


_default: Producer | None = None


def default_producer() -> Producer:
    """This process's producer, made on first use."""
    global _default
    if _default is None:
        _default = Producer()
    return _default


def submit_quantity_update(
    work_order_id: Any,
    kind: Any,
    quantity: Any,
    request_id: Any = None,
    context: Any = None,
) -> dict[str, Any]:
    """Validate and enqueue an update for the ``workorder`` worker.

    Returns:
        ``{"success": True, "job_id", "request_id", "code": "QUEUED", "queue_length",
        "estimated_delay_ms"}``; with the broker down, ``"code": "SPOOLED"`` (kept in the
        MongoDB outbox, relayed later with the same request id); otherwise ``{"success":
        False, "code": <MISSING_WORK_ORDER_ID | INVALID_... | QUEUE_ERROR>, "error": reason}``,
        where ``QUEUE_ERROR`` means nothing was recorded.
    """
    return default_producer().submit(work_order_id, kind, quantity, request_id, context)


def submit_quantity_updates(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Validate and enqueue a batch of updates (a scanner burst): one outbox write, one publish.

    Args:
        items: each a dict of ``submit_quantity_update``'s arguments by name
            (``work_order_id``, ``kind``, ``quantity``, optional ``request_id`` and ``context``).

    Returns:
        One result dict per item, in their order, shaped as ``submit_quantity_update``'s. A
        bad item is refused on its own (``INVALID_ITEM``: not a dict, or a key that is no
        argument; or the field's code) and the others go on. An item whose request id an
        earlier item of the batch carries, for the same update, is not sent again: it gets
        that item's answer plus ``"duplicate_of": <its index>``; for a different update it
        is refused as ``REQUEST_ID_CONFLICT``. A request id sent before the batch counts
        once all the same: the worker's log decides.

    Raises:
        TypeError: ``items`` is a string or a dict, not a list of items.
    """
    return default_producer().submit_many(items)
