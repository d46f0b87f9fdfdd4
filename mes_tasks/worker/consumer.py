"""The worker's consumer: back on the broker within about a second after Redis comes back,
and off a broker that stopped answering its consume (``BrokerWatchdog``).

Celery's consumer retries a lost broker connection after 2, 4, 6 ... seconds, then
spends a second on mingle (asking other workers for revoked tasks, which mes_tasks
never uses); after a two-second Redis restart the worker was idle for seven. This
consumer retries every ``RECONNECT_MAX_S`` at most, forever (a service waits for its
broker), and runs without mingle and gossip.

It also survives losing the broker while it holds a retry waiting on its countdown
(``restore_or_leave``): kombu would restore that message only as the broken connection
closes, after Celery has let go of the transport, and the worker exited on the error.
"""

from __future__ import annotations

import functools
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport.virtual import QoS as VirtualQoS

from mes_tasks.settings import get_settings
from mes_tasks.worker import silence

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.2
RECONNECT_STEP_S = 0.3
RECONNECT_MAX_S = 1.0
WATCHDOG_CHECK_S = 0.5
SWEPT_GRACE_S = 0.25  # see BrokerWatchdog.check


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """``worker_consumer``: Celery's consumer with a quick reconnect and no mingle or gossip."""

    def __init__(self, *args: Any, worker_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        silence.install()  # a Redis gone silent is left at its first read timeout, not one by one
        options = {**(worker_options or {}), "without_mingle": True, "without_gossip": True}
        super().__init__(*args, worker_options=options, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_FIRST_S,
            interval_step=RECONNECT_STEP_S,
            interval_max=RECONNECT_MAX_S,
        )
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        restore_or_leave(self.connection)
        super().on_connection_error_after_connected(exc)


def restore_or_leave(connection: Any) -> None:
    """Put back what the lost connection's channels were given and had not acknowledged, or
    leave it in kombu's ``unacked`` hash; never raise.

    Celery's handler for a lost connection first collects it: the channel's close fails
    on the dead socket (it reads the pending ``BRPOP`` reply first) and stays open, and the
    transport's ``client`` is set to None. It then closes the connection again; the
    channel's close now restores its unacknowledged messages (a retry on its countdown is
    one) through a new client pool built from that ``client``: an ``AttributeError``, not a
    connection error, so nothing catches it and the worker exits. Restored here first,
    while the transport is whole (a silent broker costs a socket timeout), and kombu's own
    attempt switched off. With Redis down they stay in ``unacked``: the worker restores
    them as it takes its lease back (``lease``); a queue without a lease waits for the
    visibility timeout.
    """
    for channel in list(getattr(connection.transport, "channels", None) or ()):
        qos = getattr(channel, "_qos", None)  # None: never consumed, nothing delivered
        if qos is None:
            continue
        try:
            qos.restore_unacked_once()
        except Exception as exc:  # a dead broker, or whatever else: never a reason to exit
            log.warning("left the lost connection's unacknowledged messages in the broker: %r", exc)
        finally:
            qos.restore_at_shutdown = False  # its close must not try again, without a transport


class BrokerWatchdog(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: reconnect a consume whose ``BRPOP`` has gone unanswered, and keep an
    ack or a reject that fails from holding the prefetch slot (``_free_slot_on_failed_ack``).

    kombu reads the reply to its ``BRPOP`` (a 1 s timeout) only once the socket is
    readable, and sends the next one only after that reply: if the master stops answering
    without closing the connection (frozen, or cut off by a partition), the consume waits
    for good, although the Sentinels have promoted a replica and every other connection
    has moved on (seen in the chaos run: a worker that lost and retook its lease went on
    waiting for the frozen master). This step notes when each ``BRPOP`` goes out; one still
    unanswered ``MES_REDIS_TIMEOUT_S`` after its own timeout gets its connection closed. kombu
    then sends the next ``BRPOP`` on a new connection, through the Sentinels when
    ``REDIS_URL`` names them. A message the silent master had popped for it never arrives;
    its update is still in the outbox, which sends it again. (kombu 5.7 has a check of its
    own, after the BRPOP timeout plus ``health_check_interval``: 31 s here; earlier
    releases, which ``kombu>=5.5`` admits, have none.)
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry: Any = None
        self.channel: Any = None
        self.sent_at = 0.0
        self.silence_s = get_settings().redis_timeout_s  # past the BRPOP's own timeout: gone

    def start(self, c: Any) -> None:
        channel: Any = getattr(c.task_consumer, "channel", None)
        brpop_start = getattr(channel, "_brpop_start", None)
        if brpop_start is None:  # not kombu's Redis transport
            return

        def timed_brpop_start(*args: Any, **kwargs: Any) -> Any:
            self.sent_at = time.monotonic()
            return brpop_start(*args, **kwargs)

        channel._brpop_start = timed_brpop_start
        _free_slot_on_failed_ack(channel)
        self.channel, self.sent_at = channel, time.monotonic()
        self.timer_entry = c.timer.call_repeatedly(WATCHDOG_CHECK_S, self.check, priority=10)

    def check(self) -> None:
        """Run in the worker's event loop, between tasks."""
        channel = self.channel
        waiting_on = getattr(channel, "_in_poll", None)
        if channel is None or not waiting_on:
            return
        now = time.monotonic()
        silent_s = now - self.sent_at
        # Shortly after a sweep (a read timed out on another connection: Redis has gone
        # silent), the BRPOP's own timeout and a little grace: its answer would have come.
        swept = now - silence.swept_at() < channel.brpop_timeout + self.silence_s
        grace_s = SWEPT_GRACE_S if swept else self.silence_s
        if silent_s <= channel.brpop_timeout + grace_s or _has_reply(waiting_on):
            return  # on time, or answered while the loop was busy: kombu reads it next
        log.warning("the broker has not answered the consume for %.1f s: reconnecting it", silent_s)
        waiting_on.disconnect()  # kombu forgets it, and sends the next BRPOP on a new connection

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        self.channel = None

    shutdown = stop


def _free_slot_on_failed_ack(channel: Any) -> None:
    """Make an ack or a reject that fails on the connection (a silent or lost Redis) free its
    prefetch slot.

    kombu's Redis ack deletes the message's unacked record, then frees the slot; its reject
    (a message handed back, ``requeue=True``) first moves the record back to its queue. When
    that Redis step fails, Celery logs "Couldn't ack" / "Couldn't reject" and goes on, but the
    slot stays taken, and with a prefetch of one the worker never fetches again (seen in the
    chaos run for an ack, and when a Sentinel master froze while a retry was handed back).
    The step is tried once more, on a connection of its own from the pool; if that fails too,
    the slot is freed anyway. The unacked record stays, and the broker delivers the message
    again once its visibility timeout (or the next lease take-over) restores it: a
    duplicate, answered as one, or the outbox sends it again if the record is lost with it.
    """
    qos = channel.qos
    # A late ack on a channel its consumer restart already closed finds no client: an
    # AttributeError that Celery, which catches connection errors only, would let end the worker.
    errors = (*channel.connection_errors, AttributeError)

    def or_free(settle: Callable[..., None]) -> Callable[..., None]:
        def settle_or_free(delivery_tag: Any, *args: Any, **kwargs: Any) -> None:
            try:
                settle(delivery_tag, *args, **kwargs)
                return
            except errors:
                pass
            try:
                settle(delivery_tag, *args, **kwargs)
            except errors as exc:
                VirtualQoS.ack(qos, delivery_tag)  # type: ignore[no-untyped-call]  # the slot only
                if isinstance(exc, AttributeError):
                    raise redis.ConnectionError(f"settled on a closed channel: {exc}") from exc
                raise

        return settle_or_free

    qos.ack, qos.reject = or_free(qos.ack), or_free(qos.reject)


def _has_reply(connection: Any) -> bool:
    """Whether a reply waits on ``connection``'s socket, without reading it.

    Not redis-py's ``can_read``: that moves the reply into the parser's buffer, where the
    event loop, which waits for the socket, never sees it (a message popped and lost).
    """
    sock = getattr(connection, "_sock", None)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):  # closed meanwhile
        return False
    return bool(readable)
