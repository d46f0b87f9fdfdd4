"""Exactly one active ``workorder`` consumer: a Redis lease, and recovery of a dead holder's messages.

Every worker started on ``workorder`` runs the ``SingleActiveConsumer`` consumer step.
The one that holds the lease (``{prefix}lease:workorder``, token-owned, ``MES_LEASE_TTL_S``,
extended by the lock watchdog thread) consumes; any other stays standby with its ``workorder``
consumer cancelled and tries to take the lease every ``LEASE_POLL_S``. A worker that
takes the lease over first puts the previous holder's unacknowledged ``workorder``
messages back at the head of the queue, at once instead of after the visibility
timeout: with one consumer, nothing else can be processing them. A holder that was
only paused (SIGSTOP) and comes back is fenced out by the work-order locks and
epochs; its heartbeat fails and it goes back to standby.
"""

from __future__ import annotations

import logging
import socket
from contextlib import suppress
from typing import Any

import redis
from celery import bootsteps

from mes_tasks.broker import unacked_of
from mes_tasks.errors import RedisUnavailable
from mes_tasks.keys import lease_key, lease_owner_key, lock_key
from mes_tasks.locks import TOKEN_SEP, RedisLock, owner_id

log = logging.getLogger(__name__)

QUEUE = "workorder"
LEASE_POLL_S = 1.0  # how often a standby tries to take the lease (and the active checks it)


class Lease(RedisLock):
    """The active consumer's lease: a lock with no wait whose extensions a heartbeat verifies."""

    def try_acquire(self) -> bool:
        try:
            self.acquire()
        except Exception:  # busy, or Redis down: stay standby
            return False
        self.start_watchdog()
        return True

    @property
    def held(self) -> bool:
        return self.watchdog.watching(self) and self.lost_reason is None


def restore_unacked(channel: Any, queue: str = QUEUE) -> int:
    """Put every unacknowledged message of ``queue`` back at the head of the queue.

    Only safe for a queue with a single consumer that holds none of them itself.
    """
    restored = 0
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        for tag, _message in list(unacked_of(client, channel, queue)):  # one consumer's worth
            channel.qos.restore_by_tag(tag, client, leftmost=True)
            restored += 1
    return restored


# Delete a lock whose token names the given owner ("<owner_id>/...").
_DEL_IF_OWNED_BY = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def clear_predecessor_locks(client: redis.Redis, prefix: str) -> int:
    """Record this process as the active consumer; delete the locks the previous one kept.

    The previous holder is dead or paused past its lease: the epochs we bump fence it
    out, so its locks (kept between updates, see ``keptlocks``) only delay us.
    """
    me = owner_id()
    answer = client.set(lease_owner_key(prefix), me, get=True)
    previous = answer.decode() if isinstance(answer, bytes) else answer
    if not previous or previous == me:
        return 0
    mine = f"{previous}{TOKEN_SEP}"
    keys = list(client.scan_iter(match=lock_key(prefix, "*"), count=500))
    return sum(int(client.eval(_DEL_IF_OWNED_BY, 1, key, mine)) for key in keys)


def _consuming(c: Any) -> bool:
    return QUEUE in {q.name for q in c.task_consumer.queues}


class SingleActiveConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: consume ``workorder`` only while holding the lease."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.lease: Lease | None = None
        self.prefix = ""
        self.active = False
        self.timer_entry: Any = None

    def start(self, c: Any) -> None:
        if not _consuming(c):
            return
        from mes_tasks import db
        from mes_tasks.settings import get_settings

        settings = get_settings()
        client: redis.Redis = db.redis_client(settings)
        self.lease = Lease(client, lease_key(settings.key_prefix), settings.lease_ttl_s)
        self.prefix = settings.key_prefix
        c.cancel_task_queue(QUEUE)  # until the lease is ours
        self.tick(c)
        self.timer_entry = c.timer.call_repeatedly(LEASE_POLL_S, self.tick, (c,), priority=10)

    def tick(self, c: Any) -> None:
        """Run in the worker's event loop, between tasks."""
        assert self.lease is not None
        if self.active and not self.lease.held:
            log.error("lost the %s lease (%s): standby now", QUEUE, self.lease.lost_reason)
            c.cancel_task_queue(QUEUE)
            self.active = False
        if not self.active and _consuming(c):  # someone ran add_consumer on a standby
            log.warning("standby: not consuming %s without the lease", QUEUE)
            c.cancel_task_queue(QUEUE)
        if not self.active and self.lease.try_acquire():
            cleared = clear_predecessor_locks(self.lease.client, self.prefix)
            restored = restore_unacked(c.connection.default_channel)
            c.add_task_queue(QUEUE)
            self.active = True
            log.warning("took the %s lease on %s; restored %d in-flight message(s), cleared %d lock(s)",
                        QUEUE, socket.gethostname(), restored, cleared)  # fmt: skip

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        if self.lease is not None and self.active:
            with suppress(RedisUnavailable):
                self.lease.release()  # a standby can take over at once
            self.active = False

    shutdown = stop
