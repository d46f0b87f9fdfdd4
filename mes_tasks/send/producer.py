"""The producer: validate, publish, record in the outbox, and answer with a result dict, never an exception.

``submit_quantity_update(s)`` and ``update_quantity.delay()`` (``send.delay``) come here;
binding a call is ``send.binding``'s, the broker's side ``send.publish``'s, the answer's
shape ``send.answers``'s, and the record ``send.outbox``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import redis
from celery.result import AsyncResult
from pymongo.collection import Collection

from mes_tasks import db
from mes_tasks.broker import is_outage
from mes_tasks.errors import MesError, QueueError, ValidationError
from mes_tasks.keys import apply_ms_key, sent_key, unrecorded_key
from mes_tasks.models import OutboxMessage
from mes_tasks.partitions import queue_names
from mes_tasks.queues import ask_waiting, waiting_from
from mes_tasks.send import outbox
from mes_tasks.send.answers import Sent, answer, estimated_delay_ms, refused
from mes_tasks.send.binding import MAX_BATCH_ITEMS, job_of, listed, slots, too_large
from mes_tasks.send.outbox import Job
from mes_tasks.send.publish import PUBLISH_DEADLINE_S, PUBLISH_TIMEOUT_S, Publisher
from mes_tasks.settings import Settings, get_settings, mask_secrets
from mes_tasks.validation import UpdateRequest, bind_update, check_update_size, validate_update

log = logging.getLogger(__name__)

DEFAULT_APPLY_MS = 10.0  # estimate per queued update until the worker has measured one
OUTBOX_DOWN_BACKOFF_S = 1.0  # after the outbox failed, submissions skip it this long
BATCH_CHUNK = 500  # updates of a batch published in one pipeline, then recorded in one write
# How long a request id the caller gave stays marked as sent (``sent_before``): a repeat within
# it is looked up in the log by the gateway; a later one is sent again, and the log counts it once.
SENT_MARK_S = 600
# When each of ARGV was marked as sent (nil if not), in one command however many they are
# (ZMSCORE would need Redis 6.2).
_SENT_AT = (
    "local at = {} for i, rid in ipairs(ARGV) do at[i] = redis.call('ZSCORE', KEYS[1], rid) or false end "
    "return at"
)


class Producer:
    """Submits quantity updates; holds its Redis client for queue statistics."""

    def __init__(self, settings: Settings | None = None, redis_client: redis.Redis | None = None):
        self.settings = settings or get_settings()
        bounded = replace(
            self.settings,
            connect_timeout_s=min(self.settings.connect_timeout_s, PUBLISH_TIMEOUT_S),
            redis_timeout_s=min(self.settings.redis_timeout_s, PUBLISH_TIMEOUT_S),
        )
        self.redis = redis_client or db.redis_client(bounded)
        # The sent marks are read once, never tried again: a silent Redis then costs the
        # gateway's submission one timeout before its publish gives up, not two.
        self._marks = redis_client or db.redis_client(bounded, retry=False)
        self._outbox: Collection[dict[str, Any]] | None = None
        self._outbox_down_until = 0.0
        self.unrecorded = 0  # submissions sent without an outbox record, in this process
        self.publisher = Publisher(self.settings)
        self._seen: tuple[int | None, float | None] = (None, None)  # the queue state last read

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
            req = validate_update(work_order_id, kind, quantity, request_id, context)
        except ValidationError as exc:
            return refused(exc)
        return self.submit_valid(req)

    def submit_valid(self, req: UpdateRequest) -> dict[str, Any]:
        """Enqueue one update that ``validate_update`` (or ``validate_item``) passed; see ``submit``."""
        try:
            job = job_of(req)
            sent = self.send(*job)
        except (ValidationError, QueueError) as exc:
            return refused(exc)
        return self._answers([job], {job.job_id: sent})[job.job_id]

    def submit_many(self, items: Iterable[Any]) -> list[dict[str, Any]]:
        """Validate and enqueue a batch; see ``submit_quantity_updates``."""
        given = listed(items)
        if len(given) > MAX_BATCH_ITEMS:
            return too_large(len(given))
        judged = slots(given)
        jobs = [slot for slot in judged if isinstance(slot, Job)]
        answers = self._answers(jobs, self.send_many(jobs))
        results: list[dict[str, Any]] = []
        for slot in judged:
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
            result = self.publisher.publish(job, _publish_options(options))
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
        return self.publisher.publish(Job(job_id, args, kwargs), _publish_options(options))

    def publish_all(self, jobs: Sequence[Job]) -> None:
        """Send validated updates in one Redis pipeline, within the deadline (``Publisher.publish_all``)."""
        self.publisher.publish_all(jobs)

    def _answers(self, jobs: Sequence[Job], sent: dict[str, Sent]) -> dict[str, dict[str, Any]]:
        """Each update's result dict, by job id; the queue is read once, if any was queued, and
        the request ids the callers gave to the queued ones marked as sent in the same round trip."""
        queued = [job for job in jobs if sent[job.job_id].queued]
        given = [rid for job in queued if (rid := job.kwargs["request_id"]) != job.job_id]  # not defaulted
        length, per_update_ms = self.queue_state(marking=given) if queued else (None, None)
        behind = {job.job_id: len(queued) - 1 - i for i, job in enumerate(queued)}  # queued after it
        return {job.job_id: answer(job, sent[job.job_id], length, per_update_ms, behind.get(job.job_id, 0))
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

    def queue_state(self, marking: Sequence[str] = ()) -> tuple[int | None, float | None]:
        """Messages waiting per workorder queue (the mean, over partitions) and the worker's
        average time per update (ms); ``marking``: request ids to mark as sent on the way."""
        queues = queue_names(self.settings.partitions)
        try:
            pipe = self.redis.pipeline(transaction=False)
            asked = ask_waiting(pipe, queues)
            pipe.get(apply_ms_key(self.settings.key_prefix))
            if marking:
                now, sent = time.time(), sent_key(self.settings.key_prefix)
                pipe.zadd(sent, dict.fromkeys(marking, now))
                pipe.zremrangebyscore(sent, "-inf", now - SENT_MARK_S)
                pipe.expire(sent, SENT_MARK_S)
            replies = pipe.execute()
        except redis.RedisError:
            return None, None
        lengths, apply_ms = waiting_from(queues, replies[:asked]).values(), replies[asked]
        self._seen = round(sum(lengths) / len(queues)), float(apply_ms) if apply_ms else DEFAULT_APPLY_MS
        return self._seen

    def sent_before(self, request_ids: Sequence[str]) -> set[str] | None:
        """Those of ``request_ids`` that a submission queued within ``SENT_MARK_S``, in one read;
        None when Redis cannot say.

        A request id in the log was sent before, and lately if its repeat is an HTTP retry: a
        caller that answers repeats from the log (the gateway) looks up these only. A request
        id sent by ``.delay()``, or longer ago, is not marked.
        """
        if not request_ids:
            return set()
        try:
            sent_at = self._marks.eval(_SENT_AT, 1, sent_key(self.settings.key_prefix), *request_ids)
        except redis.RedisError:
            return None
        since = time.time() - SENT_MARK_S
        lately = [at is not None and float(at) > since for at in sent_at]
        return {rid for rid, marked in zip(request_ids, lately, strict=True) if marked}


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


def _publish_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """A ``.delay()`` caller's ``apply_async`` options, else no result subscription (see ``publish``)."""
    return {"ignore_result": True} if options is None else options


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
