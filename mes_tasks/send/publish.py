"""Publishing updates to the broker: every send of an update goes through here.

A submission, a batch, a ``.delay()`` from the main app and the relay's sends all publish on a
``Publisher``'s own broker connections, by task name, to the update's partition, giving up on
a broker that refuses or has gone silent within about a second (``PUBLISH_DEADLINE_S``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from celery.result import AsyncResult
from kombu.pools import ProducerPool

from mes_tasks.app import app
from mes_tasks.broker import is_outage
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.partitions import queue_for
from mes_tasks.send.outbox import Job
from mes_tasks.settings import Settings, get_settings
from mes_tasks.validation import readable

T = TypeVar("T")

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
# kombu's publish retry stays off: the retry is ours, of the whole publish, under the deadline.
BATCH_OPTIONS = {"ignore_result": True, "retry": False}
# Redis commands one update may buffer: its LPUSH, its task-sent event's PUBLISH, and a
# PEXPIRE per priority step for a queue that expires. A bound, so that the pipeline runs
# once per chunk, when the chunk is flushed.
BATCH_OPS_PER_UPDATE = 8


def within_deadline(call: Callable[[], T]) -> T:
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


def _connections(settings: Settings) -> tuple[Any, Any]:
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


def send_task(job: Job, options: dict[str, Any], where: dict[str, str] | None = None) -> AsyncResult:
    """Every publish of an update; Flower and the logs show it as ``readable`` puts it.

    With ``MES_PARTITIONS`` > 1 the update goes to its work order's partition, whatever
    queue the caller named: one work order's updates must share one queue. ``where``: its
    ``route``, if the caller has it already.
    """
    reprs = readable(job.args, job.kwargs)
    where = route(job) if where is None else where
    result: AsyncResult = app.send_task(
        UPDATE_QUANTITY, job.args, job.kwargs, task_id=job.job_id, **{**reprs, **options, **where}
    )
    return result


def route(job: Job) -> dict[str, str]:
    partitions = get_settings().partitions
    if partitions == 1:
        return {}  # task_routes: workorder
    return {"queue": queue_for(str(job.args[0]), partitions)}


class Publisher:
    """One process's way to the broker for updates: its own connections, every wait bounded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connections: tuple[Any, Any] | None = None  # kombu ProducerPool, EventDispatcher
        self._lock = threading.Lock()

    def publish(self, job: Job, options: dict[str, Any]) -> AsyncResult:
        """Send one update within the deadline (``within_deadline``)."""
        return within_deadline(lambda: self._publish_one(job, options))

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
        within_deadline(lambda: self._publish_batch(jobs))

    def _publish_one(self, job: Job, options: dict[str, Any]) -> AsyncResult:
        pool, events = self._opened()
        with pool.acquire(block=True) as producer:
            return send_task(
                job, {**options, "retry": False, "producer": producer, "event_dispatcher": events}
            )

    def _publish_batch(self, jobs: Sequence[Job]) -> None:
        pool, events = self._opened()
        with pool.acquire(block=True) as producer:
            options = {**BATCH_OPTIONS, "producer": producer, "event_dispatcher": events}
            if not producer.supports_batch_publish:
                for job in jobs:
                    send_task(job, options)
                return
            with producer.batch(max_size=BATCH_OPS_PER_UPDATE * len(jobs)) as batch:
                declared: set[str | None] = set()
                for job in jobs:
                    # A queue is declared by its first message of the batch only: kombu's own
                    # check that it is declared already costs each message a copy of the queue
                    # (about a sixth of a batch's publish).
                    where = route(job)
                    queue = where.get("queue")
                    send_task(job, options if queue not in declared else {**options, "declare": []}, where)
                    declared.add(queue)
                batch.flush()  # raises where leaving the context could skip an aborted batch

    def _opened(self) -> tuple[Any, Any]:
        """The broker connections and task-sent event dispatcher (made on first use)."""
        with self._lock:
            if self._connections is None:
                self._connections = _connections(self.settings)
            return self._connections
