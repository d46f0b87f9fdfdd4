"""Exactly one active ``workorder`` consumer: a Redis lease, and recovery of a dead holder's work.

Every worker runs the ``SingleActiveConsumer`` consumer step. Of those started on
``workorder``, the one that holds the lease (``{prefix}lease:workorder``, token-owned,
``MES_LEASE_TTL_S``, extended by the lock watchdog thread) consumes; any other stays
standby with its ``workorder`` consumer cancelled and tries to take the lease every
``LEASE_POLL_S``. A worker not started on ``workorder`` never consumes it, even after an
``add_consumer``.

A holder that dies lets its lease expire after ``MES_LEASE_TTL_S``; one on this host
that is no longer running (or a previous incarnation of this very process id, as in a
restarted container) is recognised and replaced at once. The worker that takes the
lease over, before it consumes:

1. ends the predecessor's MongoDB sessions (``sessions.end_others``), which aborts a
   transaction it left open and frees that work order at once, instead of after
   MongoDB's 60 s transaction lifetime;
2. deletes the work-order locks the predecessor kept (``clear_predecessor_locks``);
3. puts the predecessor's unacknowledged ``workorder`` messages back in the queue, at
   once instead of after the visibility timeout: with one consumer, nothing else can be
   processing them. A predecessor that is this very process (its broker connection was
   lost, with Redis down, while it held a retry on its countdown) counts too.

With partitions, a worker that hands a partition over (``_hand_over``) may still hold
retries of it, waiting on their countdown: it notes them in the handed record
(``keys.handed_key``) before it lets go. Its successor restores nothing of it; each
noted message is restored later, checked against its delivery time so that a later
delivery of it is never taken, by whoever can tell that nobody runs it any more: the
worker itself once it no longer holds it (its connection was lost), or the partition's
holder once that worker is dead (``handed_due``). A take-over keeps what live workers
hold in the same way.

A holder that was only paused (SIGSTOP) and comes back is fenced out by the work-order
epochs; its heartbeat fails and it goes back to standby.

``queue pause`` (``status.pause``) is a Redis key that the active worker checks on every
tick, and when it takes the lease: while it is set, nobody consumes ``workorder``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Collection
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps

from mes_tasks import db
from mes_tasks.apply import sessions
from mes_tasks.apply.locks import RELEASE_IF_HELD, RedisLock
from mes_tasks.apply.owners import TOKEN_SEP, holder_is_dead, owner_id, owner_of
from mes_tasks.broker import delivered_tags, delivery_times, restore_delivery, unacked_of
from mes_tasks.errors import LockBusy, MesError, RedisUnavailable
from mes_tasks.keys import handed_key, lease_key, lease_owner_key, lock_key, pause_key, takeovers_key
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.partitions import index_of, is_workorder_queue
from mes_tasks.settings import get_settings
from mes_tasks.worker.handover import handed_due, handed_entries, liveness, note_handed
from mes_tasks.worker.sharing import ORPHAN_GRACE_S, Member, Roster, View, plan, ring, view_of

log = logging.getLogger(__name__)

QUEUE = WORKORDER_QUEUE
LEASE_POLL_S = 0.5  # how often a standby tries to take the lease (and the active checks it)
IN_FLIGHT_EVERY = 4  # ticks between reads of kombu's unacked hash for queues with messages in flight
_STEP: list[SingleActiveConsumer] = []  # this worker's step, once it started on workorder


def may_apply(queue: str | None = None) -> bool:
    """False in a ``workorder`` worker that does not hold ``queue``'s lease right now.

    A worker resumed after SIGSTOP may take a message before its tick sees that the lease
    is gone (or run a retry whose partition it has since handed over); it must hand the
    message back rather than take work-order locks the queue's active worker needs. Other
    processes (no lease step) may always apply.
    """
    return not _STEP or _STEP[0].holds(queue or QUEUE)


class Lease(RedisLock):
    """The active consumer's lease: a lock with no wait whose extensions a heartbeat verifies."""

    def try_acquire(self) -> bool:
        try:
            try:
                self.acquire()
            except LockBusy:
                if not self._drop_if_holder_dead():
                    return False
                self.acquire()
        except Exception:  # busy, or Redis down: stay standby
            return False
        self.start_watchdog()
        return True

    def _drop_if_holder_dead(self) -> bool:
        """Delete the lease if its holder is a process of this host that no longer runs."""
        token = self.client.get(self.key)
        if not token or not holder_is_dead(str(token)):
            return False
        log.warning("the %s lease holder %s is not running any more: taking over", QUEUE, owner_of(token))
        return bool(self.client.eval(RELEASE_IF_HELD, 1, self.key, token))

    @property
    def held(self) -> bool:
        return self.watchdog.watching(self) and self.lost_reason is None and self.fresh()


def restore_unacked(channel: Any, queue: str = QUEUE, keep: Collection[str] = ()) -> int:
    """Put every unacknowledged message of ``queue`` back in the queue, but those in ``keep``.

    Only safe for a queue with a single consumer, about to be this one: ``keep`` names the
    deliveries live workers still hold (this one's own, and what others noted as handed).
    """
    restored = 0
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        for tag, _message in list(unacked_of(client, channel, queue)):  # one consumer's worth
            if _text(tag) not in keep:
                channel.qos.restore_by_tag(tag, client, leftmost=True)
                restored += 1
    return restored


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Delete a lock whose token names the given owner ("<owner_id>/...").
_DEL_IF_OWNED_BY = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def clear_predecessor_locks(client: redis.Redis, prefix: str, queue: str = QUEUE) -> int:
    """Record this process as ``queue``'s active consumer; delete the locks the previous one kept.

    The previous holder is dead or paused past its lease: the epochs we bump fence it
    out, so its locks (kept between updates, see ``keptlocks``) only delay us.
    """
    previous = record_owner(client, prefix, queue)
    return 0 if previous in (None, owner_id()) else clear_locks_of(client, prefix, previous)


def record_owner(client: redis.Redis, prefix: str, queue: str) -> str | None:
    """Name this process ``queue``'s holder; the previous holder (this process too), if any."""
    answer = client.set(lease_owner_key(prefix, queue), owner_id(), get=True)
    return _text(answer) if answer else None


def clear_locks_of(client: redis.Redis, prefix: str, owner: str) -> int:
    """Delete every work-order lock whose token names ``owner``."""
    mine = f"{owner}{TOKEN_SEP}"
    keys = list(client.scan_iter(match=lock_key(prefix, "*"), count=500))
    return sum(int(client.eval(_DEL_IF_OWNED_BY, 1, key, mine)) for key in keys)


def _consumed(c: Any) -> set[str]:
    return {q.name for q in c.task_consumer.queues}


def _consuming(c: Any, queue: str = QUEUE) -> bool:
    return queue in _consumed(c)


@dataclass
class Slot:
    """A workorder queue this worker may consume, and its lease."""

    queue: str
    lease: Lease
    active: bool = False  # consuming it (or paused on it) under its lease
    paused: bool | None = None  # as last seen, for the log


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
        self.slots: dict[str, Slot] = {}
        self.client: redis.Redis | None = None
        self.prefix = ""
        self.ttl_s = 0.0
        self.partitions = 1
        self.timer_entry: Any = None
        self.mongo: db.Mongo | None = None
        self.ticks = 0
        self.roster: Roster | None = None
        self.in_flight: set[str] = set()  # workorder queues with messages in flight, as last read
        self.free_since: dict[str, float] = {}  # free queue with messages -> monotonic time first seen

    # -- compatibility: the one slot of MES_PARTITIONS=1 ------------------------------------

    @property
    def lease(self) -> Lease | None:
        slot = self.slots.get(QUEUE)
        return None if slot is None else slot.lease

    @property
    def active(self) -> bool:
        return any(slot.active for slot in self.slots.values())

    def holds(self, queue: str) -> bool:
        slot = self.slots.get(queue)
        return slot is not None and slot.active and slot.lease.held

    # -- the step ----------------------------------------------------------------------------

    def start(self, c: Any) -> None:
        self.eligible = self.eligible or {q for q in _consumed(c) if is_workorder_queue(q)}
        if self.eligible:  # a restarted consumer keeps its role
            settings = get_settings()
            self.client = self.client or db.redis_client(settings)
            self.prefix, self.ttl_s, self.partitions = (
                settings.key_prefix,
                settings.lease_ttl_s,
                settings.partitions,
            )
            self.mongo = self.mongo or db.mongo_client(settings)
            self.roster = Roster(self.client, self.prefix)
            _STEP[:] = [self]
            for queue in _consumed(c) & self.eligible:
                c.cancel_task_queue(queue)  # until its lease is ours and no pause is in force
        self.tick(c)
        self.timer_entry = c.timer.call_repeatedly(LEASE_POLL_S, self.tick, (c,), priority=10)

    def tick(self, c: Any) -> None:
        """Run in the worker's event loop, between tasks."""
        self.ticks += 1
        if not self.eligible:
            for queue in _consumed(c):
                if is_workorder_queue(queue):
                    log.warning("not started on %s: not consuming it", queue)
                    c.cancel_task_queue(queue)
            return
        self._drop_lost(c)
        for queue in _consumed(c):
            if is_workorder_queue(queue) and not self.holds(queue):  # add_consumer on a standby
                log.warning("standby: not consuming %s without the lease", queue)
                c.cancel_task_queue(queue)
        if self._pinned():
            self._hold_pinned(c)
        else:
            self._share(c)
        for slot in self.slots.values():
            if slot.active:
                self._honour_pause(c, slot)
        self._restore_handed(c)

    def _drop_lost(self, c: Any) -> None:
        """Stop consuming each queue whose lease is no longer surely held, and let that lease go.

        Merely late (a slow Redis, a failover), the watchdog would go on extending a lease
        this worker no longer consumes under, and nobody else could take the queue.
        """
        for slot in self.slots.values():
            if slot.active and not slot.lease.held:
                log.error("lost the %s lease (%s): standby now", slot.queue, slot.lease.lost_reason or "late")
                c.cancel_task_queue(slot.queue)
                slot.active = False
                slot.lease.let_go()

    def _pinned(self) -> bool:
        return QUEUE not in self.eligible

    def _slot(self, queue: str) -> Slot:
        if queue not in self.slots:
            assert self.client is not None
            self.slots[queue] = Slot(queue, Lease(self.client, lease_key(self.prefix, queue), self.ttl_s))
        return self.slots[queue]

    def _member(self) -> Member:
        until_ms = int((time.time() + self.ttl_s) * 1000)
        pinned = tuple(sorted(self.eligible, key=lambda q: index_of(q) or 0)) if self._pinned() else ()
        return Member(owner_id(), until_ms, self.partitions, pinned)

    def _hold_pinned(self, c: Any) -> None:
        """A worker started on ``workorder.{i}`` queues holds those, and says so to the others."""
        assert self.roster is not None
        with suppress(redis.RedisError):
            self.roster.renew(self._member())  # the automatic workers leave its queues to it
        for queue in sorted(self.eligible, key=lambda q: index_of(q) or 0):
            self._try_take(c, self._slot(queue))

    def _share(self, c: Any) -> None:
        """Take and give queues by the view every automatic worker shares (``sharing``)."""
        try:
            view, holders, waiting = self._look()
        except (redis.RedisError, RedisUnavailable) as exc:
            self._drop_idle_connections(exc)
            return  # keep what we hold until Redis answers
        for slot in [s for s in self.slots.values() if s.active and s.queue not in view]:
            self._hand_over(c, slot)  # pinned by another worker, or a leftover that drained
        me, held = owner_id(), [q for q, s in self.slots.items() if s.active]
        moves = plan(view, me, holders, self._orphans(holders, waiting), ring(view.queues, me, held))
        if moves.give is not None:
            self._hand_over(c, self.slots[moves.give])  # one a tick: the others take it as they look
        for queue in moves.take:
            self._try_take(c, self._slot(queue))

    def _try_take(self, c: Any, slot: Slot) -> None:
        """Take ``slot``'s lease and its predecessor's work; let the lease go if that fails.

        A take-over that fails half-way (Redis or MongoDB gone silent) would otherwise
        leave the lease held, and extended, by a worker that does not consume the queue.
        """
        if slot.active or not slot.lease.try_acquire():
            return
        try:
            self._take_over(c, slot)
        except Exception as exc:  # the next tick tries again, this worker or another
            log.warning("could not take %s over (%s: %s): letting its lease go", slot.queue,
                        type(exc).__name__, exc)  # fmt: skip
            slot.active = False
            with suppress(Exception):
                slot.lease.release()

    def _look(self) -> tuple[View, dict[str, str | None], set[str]]:
        """The shared view, who holds each of its queues, and which queues have messages waiting."""
        assert self.roster is not None
        look = self.roster.look(self._member(), in_flight=self.ticks % IN_FLIGHT_EVERY == 1)
        if look.in_flight is not None:
            self.in_flight = look.in_flight
        members = [m for m in look.members if not holder_is_dead(m.owner)]
        view = view_of(members, look.waiting | self.in_flight)
        # A holder whose process on this host has ended holds nothing: try_acquire takes it at once.
        holders = {
            q: None if o is None or holder_is_dead(o) else o for q, o in look.holders.items() if q in view
        }
        return view, holders, look.waiting

    def _drop_idle_connections(self, exc: Exception) -> None:
        """After a read timed out, close the idle pooled connections: a Redis gone silent leaves
        every one of them silent, and each would cost the next ticks one more socket timeout."""
        if isinstance(exc, redis.TimeoutError | RedisUnavailable) and self.client is not None:
            with suppress(Exception):
                self.client.connection_pool.disconnect(inuse_connections=False)

    def _orphans(self, holders: dict[str, str | None], waiting: set[str]) -> set[str]:
        """Queues with messages waiting that have had no holder for ``ORPHAN_GRACE_S``."""
        now = time.monotonic()
        free = {q for q, owner in holders.items() if owner is None and q in waiting}
        self.free_since = {q: self.free_since.get(q, now) for q in free}
        return {q for q, since in self.free_since.items() if now - since >= ORPHAN_GRACE_S}

    def _take_over(self, c: Any, slot: Slot) -> None:
        assert self.client is not None
        sessions.forget_recorded()  # a successor may have ended ours while we were standby
        channel = c.connection.default_channel
        if slot.queue == QUEUE and self.partitions == 1:  # the one active consumer: as ever
            ended = self._end_sessions()
            cleared = clear_predecessor_locks(self.client, self.prefix)
            restored = restore_unacked(channel, keep=delivered_tags(channel))
        else:
            ended, cleared, restored = self._take_from_previous(channel, slot.queue)
        slot.active = True
        with contextlib.suppress(redis.RedisError):  # a count for `metrics`, not a guarantee
            self.client.incr(takeovers_key(self.prefix))
        log.warning("took the %s lease on %s; restored %d in-flight message(s), cleared %d lock(s), "
                    "ended %d session(s)",
                    slot.queue, socket.gethostname(), restored, cleared, ended)  # fmt: skip

    def _take_from_previous(self, channel: Any, queue: str) -> tuple[int, int, int]:
        """Sessions ended, locks cleared and messages restored of ``queue``'s previous holder.

        None after a hand-over (the owner record was cleared): what that holder kept is in
        the handed record. Another process died or was fenced out holding it; this process
        lost its broker connection (or its lease) holding it. Either way, what it was given
        is nobody's any more, but for what live workers hold (``_held_by_the_living``).
        """
        assert self.client is not None
        previous = record_owner(self.client, self.prefix, queue)
        if previous is None:
            return 0, 0, 0
        ended, cleared = 0, 0
        if previous != owner_id():
            ended = self._end_sessions(previous)
            cleared = clear_locks_of(self.client, self.prefix, previous)
        return ended, cleared, restore_unacked(channel, queue, keep=self._held_by_the_living(channel, queue))

    def _end_sessions(self, owner: str | None = None) -> int:
        assert self.client is not None and self.mongo is not None
        try:
            return sessions.end_others(self.mongo, self.client, self.prefix, owner=owner)
        except MesError as exc:  # their transactions then time out on the server
            log.warning("could not end the previous holder's MongoDB sessions: %s", exc.message)
            return 0

    def _held_by_the_living(self, channel: Any, queue: str) -> set[str]:
        """Tags of ``queue`` live workers hold: this one's, and what a live one kept as it handed it over."""
        assert self.client is not None
        me, alive = owner_id(), liveness(self.client, self.prefix)
        kept = handed_entries(self.client, self.prefix).items()
        others = {tag for tag, e in kept if e.queue == queue and e.holder != me and alive(e.holder)}
        return delivered_tags(channel) | others

    def _restore_handed(self, c: Any) -> None:
        """Restore the handed-over messages that nobody runs any more (``handed_due``)."""
        assert self.client is not None
        channel = c.connection.default_channel
        try:
            entries = handed_entries(self.client, self.prefix)
            if not entries:
                return
            held = {slot.queue for slot in self.slots.values() if slot.active}
            due = handed_due(
                entries, owner_id(), delivered_tags(channel), held, liveness(self.client, self.prefix)
            )
            if not due:
                return
            with channel.conn_or_acquire() as broker:
                restored = sum(
                    restore_delivery(broker, channel, tag, entries[tag].delivered_at) for tag in due
                )
            self.client.hdel(handed_key(self.prefix), *due)
        except (redis.RedisError, OSError) as exc:  # the next tick tries again
            log.warning("could not look after the handed-over messages: %s", exc)
            return
        if restored:
            log.warning("restored %d message(s) held of a handed-over partition by a worker that no longer "
                        "runs them", restored)  # fmt: skip

    def _hand_over(self, c: Any, slot: Slot) -> None:
        """Give a partition back to the others: stop consuming it, then let go of its lease.

        What this worker still holds of it (retries on their countdown) is noted in the
        handed record first; if that fails, it keeps the partition this tick. Its owner
        record goes next, while the lease is still ours, so the next holder knows this was
        a hand-over (nothing to end, clear or restore now), not a death.
        """
        assert self.client is not None
        if _consuming(c, slot.queue):
            c.cancel_task_queue(slot.queue)
        try:
            self._note_handed(c, slot.queue)
        except (redis.RedisError, OSError) as exc:  # consumed again at the end of the tick
            log.warning("kept %s: could not note what this worker holds of it: %s", slot.queue, exc)
            return
        with contextlib.suppress(redis.RedisError):
            self.client.delete(lease_owner_key(self.prefix, slot.queue))
        with suppress(RedisUnavailable):
            slot.lease.release()
        slot.active, slot.paused = False, None
        log.warning("handed %s over (more workers share the partitions, or a leftover drained)", slot.queue)

    def _note_handed(self, c: Any, queue: str) -> None:
        assert self.client is not None
        channel = c.connection.default_channel
        tags = delivered_tags(channel, queue)
        if tags:
            with channel.conn_or_acquire() as broker:
                times = delivery_times(broker, channel, tags)
            note_handed(self.client, self.prefix, queue, times)

    def _honour_pause(self, c: Any, slot: Slot) -> None:
        assert self.client is not None
        try:
            paused = self.client.exists(pause_key(self.prefix), pause_key(self.prefix, slot.queue)) > 0
        except redis.RedisError:
            return  # unknown: keep things as they are until Redis answers
        if paused != slot.paused:
            log.warning(
                "%s is paused: not consuming it until `queue resume`" if paused else "consuming %s",
                slot.queue,
            )
            slot.paused = paused
        if paused and _consuming(c, slot.queue):
            c.cancel_task_queue(slot.queue)
        elif not paused and not _consuming(c, slot.queue):
            c.add_task_queue(slot.queue)

    def stop(self, c: Any) -> None:
        """Worker shutdown, or a consumer restart (broker connection lost): let go of the leases.

        A restarted consumer takes them again through ``tick`` like any standby, restoring
        the messages its previous connection left unacknowledged.
        """
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        for slot in self.slots.values():
            if slot.active:
                with suppress(RedisUnavailable):
                    slot.lease.release()  # a standby can take over at once
            slot.active, slot.paused = False, None
        if self.roster is not None:
            with contextlib.suppress(redis.RedisError):
                self.roster.leave(owner_id())

    shutdown = stop
