"""Exactly one active consumer per workorder queue: the consumer step, and ``may_apply``.

Every worker runs the ``SingleActiveConsumer`` consumer step. Of the workers started on a
workorder queue, the one holding its lease (``lease``) consumes it; any other stays standby,
that queue's consumer cancelled, and tries to take the lease every ``LEASE_POLL_S``. The
new holder takes its predecessor's work over before it consumes (``takeover``). A worker
not started on a workorder queue never consumes one, even after an ``add_consumer``. With
partitions, the automatic workers share the queues (``sharing``) and give one back as
others join (``handover``).

``queue pause`` (``status.pause``) is a Redis key that the active worker checks on every
tick, and when it takes the lease: while it is set, nobody consumes the paused queue.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps

from mes_tasks import db
from mes_tasks.errors import RedisUnavailable
from mes_tasks.keys import pause_key
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.partitions import index_of, is_workorder_queue
from mes_tasks.settings import Settings, get_settings
from mes_tasks.worker.handover import HandOver
from mes_tasks.worker.lease import Slot, Slots, consumed, consuming
from mes_tasks.worker.sharing import Roster, Share
from mes_tasks.worker.takeover import TakeOver

log = logging.getLogger(__name__)

LEASE_POLL_S = 0.5  # how often a standby tries to take the lease (and the active checks it)
_STEP: list[SingleActiveConsumer] = []  # this worker's step, once it started on workorder


def may_apply(queue: str | None = None) -> bool:
    """False in a ``workorder`` worker that does not hold ``queue``'s lease right now.

    A worker resumed after SIGSTOP may take a message before its tick sees that the lease
    is gone (or run a retry whose partition it has since handed over); it must hand the
    message back rather than take work-order locks the queue's active worker needs. Other
    processes (no lease step) may always apply.
    """
    return not _STEP or _STEP[0].holds(queue or WORKORDER_QUEUE)


@dataclass
class Parts:
    """What the step composes, made on its first start on a workorder queue."""

    client: redis.Redis
    prefix: str
    slots: Slots
    share: Share
    take_over: TakeOver
    hand_over: HandOver

    @classmethod
    def of(cls, settings: Settings, eligible: set[str]) -> Parts:
        client, prefix, ttl_s = db.redis_client(settings), settings.key_prefix, settings.lease_ttl_s
        share = Share(Roster(client, prefix), ttl_s, settings.partitions, _pinned(eligible))
        take_over = TakeOver(client, prefix, db.mongo_client(settings), settings.partitions)
        return cls(client, prefix, Slots(client, prefix, ttl_s), share, take_over, HandOver(client, prefix))


def _pinned(eligible: set[str]) -> tuple[str, ...]:
    """The queues of a worker started on ``workorder.{i}`` queues, in order; none if on ``workorder``."""
    return () if WORKORDER_QUEUE in eligible else tuple(sorted(eligible, key=lambda q: index_of(q) or 0))


class SingleActiveConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: consume each workorder queue only while holding its lease and not paused.

    ``MES_PARTITIONS`` = 1: one slot, ``workorder``. N > 1: a worker started on
    ``workorder`` takes its fair share of the partitions (and of any leftover queue) it can
    get, hands one back each tick while it holds more than its share (a worker joined),
    and takes a dead holder's over; one started on ``workorder.{i}`` queues holds only those.
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.eligible: set[str] = set()  # the workorder queues it was started on
        self.parts: Parts | None = None  # made once it starts on one of them
        self.timer_entry: Any = None
        self.ticks = 0

    def holds(self, queue: str) -> bool:
        slot = None if self.parts is None else self.parts.slots.get(queue)
        return slot is not None and slot.held

    def start(self, c: Any) -> None:
        self.eligible = self.eligible or {q for q in consumed(c) if is_workorder_queue(q)}
        if self.eligible:  # a restarted consumer keeps its role
            self.parts = self.parts or Parts.of(get_settings(), self.eligible)
            _STEP[:] = [self]
            for queue in consumed(c) & self.eligible:
                c.cancel_task_queue(queue)  # until its lease is ours and no pause is in force
        self.tick(c)
        self.timer_entry = c.timer.call_repeatedly(LEASE_POLL_S, self.tick, (c,), priority=10)

    def tick(self, c: Any) -> None:
        """Run in the worker's event loop, between tasks."""
        self.ticks += 1
        parts = self.parts
        if parts is None:
            for queue in consumed(c):
                if is_workorder_queue(queue):
                    log.warning("not started on %s: not consuming it", queue)
                    c.cancel_task_queue(queue)
            return
        for slot in parts.slots.values():
            slot.drop_if_lost(c)
        for queue in consumed(c):
            if is_workorder_queue(queue) and not self.holds(queue):  # add_consumer on a standby
                log.warning("standby: not consuming %s without the lease", queue)
                c.cancel_task_queue(queue)
        if parts.share.pinned:
            self._hold_pinned(c, parts)
        else:
            self._share(c, parts)
        for slot in parts.slots.values():
            if slot.active:
                self._honour_pause(c, parts, slot)
        parts.hand_over.restore_due(c, parts.slots.active())

    def _hold_pinned(self, c: Any, parts: Parts) -> None:
        """A worker started on ``workorder.{i}`` queues holds those, and says so to the others."""
        with suppress(redis.RedisError):
            parts.share.renew()  # the automatic workers leave its queues to it
        for queue in parts.share.pinned:
            parts.take_over.try_take(c, parts.slots[queue])

    def _share(self, c: Any, parts: Parts) -> None:
        """Take and give queues by the view every automatic worker shares (``sharing``)."""
        try:
            seen = parts.share.look(self.ticks)
        except (redis.RedisError, RedisUnavailable) as exc:
            _drop_idle_connections(parts.client, exc)
            return  # keep what we hold until Redis answers
        for slot in [s for s in parts.slots.values() if s.active and s.queue not in seen.view]:
            parts.hand_over.give(c, slot)  # pinned by another worker, or a leftover that drained
        moves = parts.share.moves(seen, parts.slots.active())
        if moves.give is not None:
            parts.hand_over.give(c, parts.slots[moves.give])  # one a tick: the others take it as they look
        for queue in moves.take:
            parts.take_over.try_take(c, parts.slots[queue])

    def _honour_pause(self, c: Any, parts: Parts, slot: Slot) -> None:
        try:
            paused = parts.client.exists(pause_key(parts.prefix), pause_key(parts.prefix, slot.queue)) > 0
        except redis.RedisError:
            return  # unknown: keep things as they are until Redis answers
        if paused != slot.paused:
            log.warning(
                "%s is paused: not consuming it until `queue resume`" if paused else "consuming %s",
                slot.queue,
            )
            slot.paused = paused
        if paused and consuming(c, slot.queue):
            c.cancel_task_queue(slot.queue)
        elif not paused and not consuming(c, slot.queue):
            c.add_task_queue(slot.queue)

    def stop(self, c: Any) -> None:
        """Worker shutdown, or a consumer restart (broker connection lost): let go of the leases.

        A restarted consumer takes them again through ``tick`` like any standby, restoring
        the messages its previous connection left unacknowledged.
        """
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.parts is None:
            return
        for slot in self.parts.slots.values():
            if slot.active:
                with suppress(RedisUnavailable):
                    slot.lease.release()  # a standby can take over at once
            slot.active, slot.paused = False, None
        with suppress(redis.RedisError):
            self.parts.share.leave()

    shutdown = stop


def _drop_idle_connections(client: redis.Redis, exc: Exception) -> None:
    """After a read timed out, close the idle pooled connections: a Redis gone silent leaves
    every one of them silent, and each would cost the next ticks one more socket timeout."""
    if isinstance(exc, redis.TimeoutError | RedisUnavailable):
        with suppress(Exception):
            client.connection_pool.disconnect(inuse_connections=False)
