"""The producer side: validate, enqueue, and answer with a result dict, never an exception."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
from celery.result import AsyncResult
from kombu.pools import ProducerPool
from pymongo.collection import Collection

from mes_tasks import db
from mes_tasks.app import app
from mes_tasks.broker import is_outage
from mes_tasks.errors import MesError, QueueError, RequestIdConflict, ValidationError
from mes_tasks.keys import apply_ms_key, unrecorded_key
from mes_tasks.models import OutboxMessage
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.partitions import queue_for, queue_names
from mes_tasks.queues import ask_waiting, waiting_from
from mes_tasks.send import outbox
from mes_tasks.send.outbox import Job
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
# Every publish (a submission, a .delay() from the main app, the relay's) gives up on a broker
# that refuses or has gone silent within PUBLISH_DEADLINE_S, and the update is spooled: a
# connection, and every read or write on it, waits at most PUBLISH_TIMEOUT_S, and a failed
# attempt is tried again after PUBLISH_RETRY_WAIT_S if another one can end before the deadline
# (a connection that went silent is replaced by a new one, which may answer).
PUBLISH_TIMEOUT_S = 0.4
PUBLISH_DEADLINE_S = 1.0
PUBLISH_RETRY_WAIT_S = 0.1
PUBLISH_ATTEMPTS = 3
PUBLISH_POOL_LIMIT = 10  # broker connections of one producer: threads that publish at once
PUBLISH_TRANSPORT_OPTIONS = {
    "socket_timeout": PUBLISH_TIMEOUT_S,
    "socket_connect_timeout": PUBLISH_TIMEOUT_S,
    "max_retries": 0,  # kombu's own reconnect loop (seconds per attempt) is replaced by ours
    "connect_retries_timeout": PUBLISH_TIMEOUT_S,
}
REQUIRED_PARAMS = 3
# kombu's publish retry stays off: the retry is ours, of the whole publish, under the deadline.
BATCH_OPTIONS = {"ignore_result": True, "retry": False}
# Redis commands one update may buffer: its LPUSH, its task-sent event's PUBLISH, and a
# PEXPIRE per priority step for a queue that expires. A bound, so that the pipeline runs
# once per chunk, when the chunk is flushed.
BATCH_OPS_PER_UPDATE = 8
BATCH_CHUNK = 500  # updates of a batch published in one pipeline, then recorded in one write
MAX_BATCH_ITEMS = 10_000  # a larger batch is refused whole (BATCH_TOO_LARGE): send several


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
        bounded = replace(
            self.settings, connect_timeout_s=min(self.settings.connect_timeout_s, PUBLISH_TIMEOUT_S)
        )
        self.redis = redis_client or db.redis_client(bounded)
        self._outbox: Collection[dict[str, Any]] | None = None
        self._outbox_down_until = 0.0
        self.unrecorded = 0  # submissions sent without an outbox record, in this process
        self._publishers: tuple[Any, Any] | None = None  # kombu ProducerPool, EventDispatcher
        self._seen: tuple[int | None, float | None] = (None, None)  # the queue state last read
        self._lock = threading.Lock()

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
        listed = _listed(items)
        if len(listed) > MAX_BATCH_ITEMS:
            return _too_large(len(listed))
        slots = _slots(listed)
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
        """Publish the update, then record it in the outbox (``MES_JOURNAL``) as sent.

        ``request_id`` defaults to ``job_id``.

        Returns:
            The broker's result handle, or the broker's reason when it refused the update,
            which then waits in the outbox, spooled, for the relay.

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
        try:
            result = self.publish(job_id, args, kwargs, options)
        except Exception as exc:
            sent = self._after_refusal([job], set(), exc)[job_id]
            if sent.error is not None:
                raise sent.error from exc
            return sent
        return Sent(result=result, recorded=job_id in self._record([job], self._waits_s(1)))

    def send_many(self, jobs: Sequence[Job]) -> dict[str, Sent]:
        """Publish validated updates ``BATCH_CHUNK`` at a time, each chunk in one pipeline, while
        the chunk is recorded in one outbox write on a thread of its own.

        An entry is due for the relay's look no sooner than ``PUBLISH_DEADLINE_S`` after it
        was written: by then its publish has ended, and if the broker refused it the entry
        was turned spooled.

        Returns:
            What became of each, by job id: queued; spooled (from the chunk the broker refused
            on); or, where the outbox could not record it either, an ``error``.

        Raises:
            TypeError, kombu's EncodeError: an update does not fit the task; its chunk and the
                ones after it are not kept, the ones before it were queued.
        """
        sent: dict[str, Sent] = {}
        if not jobs:
            return sent
        waits_s = self._waits_s(len(jobs))
        with ThreadPoolExecutor(max_workers=1) as recorder:
            recording: list[tuple[Sequence[Job], Future[set[str]]]] = []
            for start in range(0, len(jobs), BATCH_CHUNK):
                chunk = jobs[start : start + BATCH_CHUNK]
                written = recorder.submit(self._record, chunk, waits_s[start : start + BATCH_CHUNK])
                try:
                    self.publish_all(chunk)
                except Exception as exc:
                    sent.update(self._after_refusal(jobs[start:], written.result(), exc))
                    break
                recording.append((chunk, written))
            for chunk, written in recording:
                done = written.result()
                sent.update({job.job_id: Sent(recorded=job.job_id in done) for job in chunk})
        return sent

    def _after_refusal(self, jobs: Sequence[Job], recorded: set[str], exc: Exception) -> dict[str, Sent]:
        """A publish failed: spool the updates if the broker is down (a recorded one turns
        spooled), else forget the recorded ones and re-raise."""
        if not is_outage(exc):
            if recorded:  # a mistake at the call site: never relay what can never be sent
                outbox.forget(sorted(recorded), self.outbox_collection())
            raise exc
        return self._spool(jobs, mask_secrets(f"{type(exc).__name__}: {exc}"))

    def _record(self, jobs: Sequence[Job], waits_s: Sequence[float]) -> set[str]:
        """Record updates as sent; the job ids the outbox now holds (none with ``MES_JOURNAL=0``)."""
        if not self.settings.journal:
            return set()
        if time.monotonic() < self._outbox_down_until:
            self._unrecorded(jobs, "it was unreachable a moment ago")
            return set()
        try:
            recorded = outbox.record_all(self.outbox_collection(), jobs, waits_s)
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

    def _waits_s(self, n: int) -> list[float]:
        """The expected wait in their queue (s) of ``n`` updates about to be queued, in their order,
        after the publish deadline: the relay looks for an update the broker lost once its turn
        has passed. Estimated as answers are, on the queue state last read (no round trip here,
        so a silent Redis adds no wait)."""
        length, per_update_ms = self._seen
        after = None if length is None else length + n
        waits_ms = [estimated_delay_ms(after, per_update_ms, n - 1 - i) or 0 for i in range(n)]
        return [PUBLISH_DEADLINE_S + wait_ms / 1000 for wait_ms in waits_ms]

    def _spool(self, jobs: Sequence[Job], reason: str) -> dict[str, Sent]:
        """Broker down: record the updates as spooled in the outbox, or tell that nothing was recorded."""
        try:
            outbox.spool_all(self.outbox_collection(), jobs, reason)
        except MesError as exc:
            error = QueueError(
                f"nothing was recorded: the broker refused it ({reason}) "
                f"and the outbox is unreachable ({exc.message})"
            )
            log.error("could not enqueue nor spool %s: %s", _which(jobs), error.message)
            return {job.job_id: Sent(recorded=False, error=error) for job in jobs}
        log.warning("broker down, spooled %s to the outbox: %s", _which(jobs), reason)
        return {job.job_id: Sent(spooled=reason) for job in jobs}

    def publish(
        self, job_id: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any] | None = None
    ) -> AsyncResult:
        """Send one update to the broker, unrecorded, within the deadline; see the module's ``publish``."""
        args, kwargs = bind_update(args, kwargs)  # TypeError: an entry that can never be sent
        given = {"ignore_result": True} if options is None else options
        job = Job(job_id, args, kwargs)
        return _within_deadline(lambda: self._publish_one(job, given))

    def publish_all(self, jobs: Sequence[Job]) -> None:
        """Send validated updates on one pooled producer, in one Redis pipeline, within the deadline.

        kombu (5.7 and later) buffers each message's LPUSH in a pipeline (``Producer.batch``),
        flushed here and checked: the pipeline's replies are read, so a return means the
        broker took every message. Without it, or on a transport that cannot batch, the
        messages go one by one, still on one producer and connection.

        Raises:
            The last broker error when every attempt failed: then no message was sent or, when
            the pipeline itself failed (kombu's ``BatchPublishError``), some may have been.
        """
        _within_deadline(lambda: self._publish_batch(jobs))

    def _publish_one(self, job: Job, options: dict[str, Any]) -> AsyncResult:
        pool, events = self._publishing()
        with pool.acquire(block=True) as producer:
            return _send_task(
                job, {**options, "retry": False, "producer": producer, "event_dispatcher": events}
            )

    def _publish_batch(self, jobs: Sequence[Job]) -> None:
        pool, events = self._publishing()
        with pool.acquire(block=True) as producer:
            options = {**BATCH_OPTIONS, "producer": producer, "event_dispatcher": events}
            if not producer.supports_batch_publish:
                for job in jobs:
                    _send_task(job, options)
                return
            with producer.batch(max_size=BATCH_OPS_PER_UPDATE * len(jobs)) as batch:
                for job in jobs:
                    _send_task(job, options)
                batch.flush()  # raises where leaving the context could skip an aborted batch

    def _publishing(self) -> tuple[Any, Any]:
        """This producer's broker connections and task-sent event dispatcher (made on first use)."""
        with self._lock:
            if self._publishers is None:
                self._publishers = _publishers(self.settings)
            return self._publishers

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
            asked = ask_waiting(pipe, queues)
            pipe.get(apply_ms_key(self.settings.key_prefix))
            replies = pipe.execute()
        except redis.RedisError:
            return None, None
        lengths, apply_ms = waiting_from(queues, replies[:asked]).values(), replies[asked]
        self._seen = round(sum(lengths) / len(queues)), float(apply_ms) if apply_ms else DEFAULT_APPLY_MS
        return self._seen


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


def _listed(items: Iterable[Any]) -> list[Any]:
    if isinstance(items, str | bytes | dict):
        raise TypeError(f"submit_quantity_updates takes a list of items, not a {type(items).__name__}")
    return list(items)


def _too_large(n: int) -> list[dict[str, Any]]:
    """Every item's answer to a batch of ``n`` items, more than ``MAX_BATCH_ITEMS``."""
    refusal = refused(ValidationError(
        f"a batch takes at most {MAX_BATCH_ITEMS:,} items and this one has {n:,}: nothing was sent; "
        "send it as several batches", code="BATCH_TOO_LARGE"))  # fmt: skip
    return [dict(refusal) for _ in range(n)]


def _slots(items: list[Any]) -> list[Job | int | dict[str, Any]]:
    """Per item: its job, the index of an earlier item with the same update, or its refusal."""
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


def _which(jobs: Sequence[Job]) -> str:
    """Updates as a log line names them: the request id of one, the number of several."""
    return str(jobs[0].kwargs["request_id"]) if len(jobs) == 1 else f"{len(jobs)} updates"


def publish(
    job_id: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any] | None = None
) -> AsyncResult:
    """Send one update to the broker under ``job_id``, by task name, unrecorded (the relay's way).

    On this process's producer (``default_producer``): a broker that refuses or has gone
    silent is given up within about ``PUBLISH_DEADLINE_S``, and the error raised.

    ``options``: ``apply_async`` options of a ``.delay()`` caller, passed on; a caller cannot
    switch on kombu's own publish retry, nor choose the producer.

    ``ignore_result``: with a Redis result backend every ``apply_async`` otherwise
    subscribes the producer to the task's result channel, a subscription that only a
    ``.get()`` ever clears (a leak in a main app that never waits), and a Redis outage
    then blocks the call for the backend's ~20 s of reconnect retries. The outcome of an
    update is its ``QuantityLog`` or ``FailedUpdate``.
    """
    return default_producer().publish(job_id, args, kwargs, options)


def _within_deadline(call: Callable[[], T]) -> T:
    """``call``, tried again after a broker outage while ``PUBLISH_DEADLINE_S`` allows.

    Raises:
        The last error: not an outage, the attempts spent, or the deadline passed.
    """
    deadline, attempt = time.monotonic() + PUBLISH_DEADLINE_S, 1
    while True:
        try:
            return call()
        except Exception as exc:
            late = time.monotonic() + PUBLISH_RETRY_WAIT_S + PUBLISH_TIMEOUT_S > deadline
            if late or attempt >= PUBLISH_ATTEMPTS or not is_outage(exc):
                raise
        attempt += 1
        time.sleep(PUBLISH_RETRY_WAIT_S)


def _publishers(settings: Settings) -> tuple[Any, Any]:
    """Broker connections for publishing only, every wait on them bounded (``PUBLISH_TIMEOUT_S``),
    and the dispatcher of the task-sent events that go out with the updates.

    An event that cannot go out fails its update's publish, and so spools the update, instead
    of waiting in a buffer of Celery's that nothing ever sends.
    """
    conn = app.connection_for_write(settings.redis_transport_url, transport_options=PUBLISH_TRANSPORT_OPTIONS)
    pool = ProducerPool(  # type: ignore[no-untyped-call]
        conn.Pool(limit=PUBLISH_POOL_LIMIT), limit=PUBLISH_POOL_LIMIT, Producer=app.amqp.Producer
    )
    return pool, app.events.Dispatcher(connection=conn, enabled=False, buffer_while_offline=False)


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
