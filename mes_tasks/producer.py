"""The producer side: validate, enqueue, and answer with a result dict, never an exception."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery.result import AsyncResult
from pymongo.collection import Collection

from mes_tasks import db, outbox
from mes_tasks.app import app
from mes_tasks.broker import is_outage
from mes_tasks.errors import MesError, QueueError, ValidationError
from mes_tasks.keys import apply_ms_key, unrecorded_key
from mes_tasks.models import OutboxMessage
from mes_tasks.names import UPDATE_QUANTITY, WORKORDER_QUEUE
from mes_tasks.settings import Settings, get_settings, mask_secrets
from mes_tasks.validation import UPDATE_FIELDS, check_update_size, validate_update

log = logging.getLogger(__name__)

DEFAULT_APPLY_MS = 10.0  # estimate per queued update until the worker has measured one
OUTBOX_DOWN_BACKOFF_S = 1.0  # after the outbox failed, submissions skip it this long
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.3}
# Every publish, a .delay() from the main app included, fails over to the outbox within
# about a second; a caller's own options win, except these two.
PUBLISH_OPTIONS = {"retry": True, "retry_policy": PUBLISH_RETRY_POLICY}
REQUIRED_PARAMS = 3


@dataclass
class Sent:
    """What became of one update: taken by the broker (``result``), or ``spooled`` for this reason.

    ``recorded``: whether the outbox holds it (False when MongoDB was down at the producer).
    """

    result: AsyncResult | None = None
    spooled: str | None = None
    recorded: bool = True


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
    unknown = sorted(str(k) for k in named if k not in UPDATE_FIELDS)
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
            req = validate_update(work_order_id, kind, quantity, request_id, context)
        except ValidationError as exc:
            return {"success": False, "job_id": None, "code": exc.code, "error": exc.message}
        job_id = str(uuid.uuid4())
        rid = req.request_id or job_id
        try:
            sent = self.send(job_id, [req.work_order_id, req.kind, req.quantity],
                                {"request_id": rid, "context": req.context or None})  # fmt: skip
        except QueueError as exc:
            return {
                "success": False,
                "job_id": None,
                "code": exc.code,
                "recorded": False,
                "error": exc.message,
            }
        if sent.spooled is not None:
            return {"success": True, "job_id": job_id, "request_id": rid, "code": "SPOOLED", "recorded": True,
                    "queue_length": None, "estimated_delay_ms": None, "error": sent.spooled}  # fmt: skip
        length, delay_ms = self.queue_stats()
        return {
            "success": True,
            "job_id": job_id,
            "request_id": rid,
            "code": "QUEUED",
            "recorded": sent.recorded,
            "queue_length": length,
            "estimated_delay_ms": delay_ms,
        }

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
        recorded = self._record(job_id, args, kwargs)
        try:
            return Sent(result=publish(job_id, args, kwargs, options), recorded=recorded)
        except Exception as exc:
            if not is_outage(exc):
                if recorded:  # a mistake at the call site: never relay what can never be sent
                    outbox.forget([job_id], self.outbox_collection())
                raise
            reason = mask_secrets(f"{type(exc).__name__}: {exc}")  # an outage: spooled or reported
            self._spool(job_id, args, kwargs, reason, recorded)
            return Sent(spooled=reason)

    def _record(self, job_id: str, args: list[Any], kwargs: dict[str, Any]) -> bool:
        if not self.settings.journal:
            return False
        if time.monotonic() < self._outbox_down_until:
            self._unrecorded(kwargs["request_id"], "it was unreachable a moment ago")
            return False
        try:
            outbox.record(self.outbox_collection(), job_id, args, kwargs)
        except MesError as exc:
            # Skip the outbox for a while rather than make every submission wait for a timeout.
            self._outbox_down_until = time.monotonic() + OUTBOX_DOWN_BACKOFF_S
            self._unrecorded(kwargs["request_id"], exc.message)
            return False
        return True

    def _unrecorded(self, request_id: str, why: str) -> None:
        """Say, and count, that an update goes to the broker without the outbox's protection."""
        self.unrecorded += 1
        log.warning("outbox unreachable, sending %s unrecorded: %s", request_id, mask_secrets(why))
        try:
            self.redis.incr(unrecorded_key(self.settings.key_prefix))
        except redis.RedisError:
            log.debug("could not count an unrecorded submission", exc_info=True)

    def _spool(
        self, job_id: str, args: list[Any], kwargs: dict[str, Any], reason: str, recorded: bool
    ) -> None:
        """Broker down: mark the update spooled in the outbox, or say that nothing was recorded."""
        rid = kwargs["request_id"]
        try:
            outbox.spool(self.outbox_collection(), job_id, args, kwargs, reason)
        except MesError as exc:
            if recorded:  # kept as "sent": the relay re-sends it after the grace period
                log.warning("broker down, %s stays in the outbox as sent: %s", rid, reason)
                return
            error = (
                f"nothing was recorded: the broker refused it ({reason}) "
                f"and the outbox is unreachable ({exc.message})"
            )
            log.error("could not enqueue nor spool %s: %s", rid, error)
            raise QueueError(error) from exc
        log.warning("broker down, spooled %s to the outbox: %s", rid, reason)

    def outbox_collection(self) -> Collection[dict[str, Any]]:
        """The outbox, through a client of the producer's own (made on first use)."""
        if self._outbox is None:
            client = db.mongo_client(self.settings)
            self._outbox = client[self.settings.mongodb_db][OutboxMessage._meta["collection"]]
        return self._outbox

    def queue_stats(self) -> tuple[int | None, int | None]:
        """Messages waiting in ``workorder`` and the estimated wait for a new one (ms)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.llen(WORKORDER_QUEUE)
            pipe.get(apply_ms_key(self.settings.key_prefix))
            length, apply_ms = pipe.execute()
        except redis.RedisError:
            return None, None
        per_update = float(apply_ms) if apply_ms else DEFAULT_APPLY_MS
        return int(length), round((int(length) + 1) * per_update)


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
    sent_with = {**given, **PUBLISH_OPTIONS}
    result: AsyncResult = app.send_task(UPDATE_QUANTITY, args, kwargs, task_id=job_id, **sent_with)
    return result


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
