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
3. puts the predecessor's unacknowledged ``workorder`` messages back at the head of the
   queue, at once instead of after the visibility timeout: with one consumer, nothing
   else can be processing them.

A holder that was only paused (SIGSTOP) and comes back is fenced out by the work-order
epochs; its heartbeat fails and it goes back to standby.

``queue pause`` (``status.pause``) is a Redis key that the active worker checks on every
tick, and when it takes the lease: while it is set, nobody consumes ``workorder``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from mes_tasks import db, sessions
from mes_tasks.broker import unacked_of
from mes_tasks.errors import LockBusy, MesError, RedisUnavailable
from mes_tasks.keys import lease_key, lease_owner_key, lock_key, pause_key, takeovers_key
from mes_tasks.locks import _RELEASE, TOKEN_SEP, RedisLock, owner_id
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.settings import get_settings

log = logging.getLogger(__name__)

QUEUE = WORKORDER_QUEUE
LEASE_POLL_S = 0.5  # how often a standby tries to take the lease (and the active checks it)
_STEP: list[SingleActiveConsumer] = []  # this worker's step, once it started on workorder


def may_apply() -> bool:
    """False in a ``workorder`` worker that does not hold the lease right now.

    A worker resumed after SIGSTOP may take a message before its tick sees that the lease
    is gone; it must hand the message back rather than take work-order locks the new
    active worker needs. Other processes (no lease step) may always apply.
    """
    return not _STEP or (_STEP[0].active and _STEP[0].lease is not None and _STEP[0].lease.held)


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
        log.warning("the %s lease holder %s is not running any more: taking over", QUEUE, _owner_of(token))
        return bool(self.client.eval(_RELEASE, 1, self.key, token))

    @property
    def held(self) -> bool:
        return self.watchdog.watching(self) and self.lost_reason is None and self.fresh()


def holder_is_dead(token: str) -> bool:
    """Whether a token's owner (``host:pid:tag``) is a process of this host that has ended.

    The same pid with another tag is a previous incarnation (a container restarted with
    the same pid); a pid that was reused by an unrelated process only costs the wait for
    the lease to expire.
    """
    owner = _owner_of(token)
    host, _, pid = owner.rpartition(":")[0].rpartition(":")  # "host:pid:tag"
    if not host or not pid.isdigit() or host != socket.gethostname() or owner == owner_id():
        return False
    return int(pid) == os.getpid() or not _running(int(pid))


def _owner_of(token: Any) -> str:
    return str(token).split(TOKEN_SEP, 1)[0]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # a zombie has ended


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
    """Consumer step: consume ``workorder`` only while holding the lease and not paused."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.lease: Lease | None = None
        self.eligible = False  # started on workorder: may hold the lease
        self.prefix = ""
        self.active = False
        self.paused: bool | None = None  # as last seen, for the log
        self.timer_entry: Any = None
        self.mongo: db.Mongo | None = None

    def start(self, c: Any) -> None:
        self.eligible = self.eligible or _consuming(c)  # a restarted consumer keeps its role
        if self.eligible:
            settings = get_settings()
            client: redis.Redis = db.redis_client(settings)
            self.lease = self.lease or Lease(client, lease_key(settings.key_prefix), settings.lease_ttl_s)
            self.prefix = settings.key_prefix
            self.mongo = self.mongo or db.mongo_client(settings)
            _STEP[:] = [self]
            if _consuming(c):
                c.cancel_task_queue(QUEUE)  # until the lease is ours and no pause is in force
        self.tick(c)
        self.timer_entry = c.timer.call_repeatedly(LEASE_POLL_S, self.tick, (c,), priority=10)

    def tick(self, c: Any) -> None:
        """Run in the worker's event loop, between tasks."""
        if self.lease is None:
            if _consuming(c):
                log.warning("not started on %s: not consuming it", QUEUE)
                c.cancel_task_queue(QUEUE)
            return
        if self.active and not self.lease.held:
            log.error("lost the %s lease (%s): standby now", QUEUE, self.lease.lost_reason)
            c.cancel_task_queue(QUEUE)
            self.active = False
        if not self.active and _consuming(c):  # someone ran add_consumer on a standby
            log.warning("standby: not consuming %s without the lease", QUEUE)
            c.cancel_task_queue(QUEUE)
        if not self.active and self.lease.try_acquire():
            self._take_over(c)
        if self.active:
            self._honour_pause(c)

    def _take_over(self, c: Any) -> None:
        assert self.lease is not None and self.mongo is not None
        ended = 0
        sessions.forget_recorded()  # a successor may have ended ours while we were standby
        try:
            ended = sessions.end_others(self.mongo, self.lease.client, self.prefix)
        except MesError as exc:  # their transactions then time out on the server
            log.warning("could not end the previous holder's MongoDB sessions: %s", exc.message)
        cleared = clear_predecessor_locks(self.lease.client, self.prefix)
        restored = restore_unacked(c.connection.default_channel)
        self.active = True
        with contextlib.suppress(redis.RedisError):  # a count for `metrics`, not a guarantee
            self.lease.client.incr(takeovers_key(self.prefix))
        log.warning("took the %s lease on %s; restored %d in-flight message(s), cleared %d lock(s), "
                    "ended %d session(s)", QUEUE, socket.gethostname(), restored, cleared, ended)  # fmt: skip

    def _honour_pause(self, c: Any) -> None:
        assert self.lease is not None
        try:
            paused = self.lease.client.exists(pause_key(self.prefix)) > 0
        except redis.RedisError:
            return  # unknown: keep things as they are until Redis answers
        if paused != self.paused:
            log.warning(
                "%s is paused: not consuming it until `queue resume`" if paused else "consuming %s", QUEUE
            )
            self.paused = paused
        if paused and _consuming(c):
            c.cancel_task_queue(QUEUE)
        elif not paused and not _consuming(c):
            c.add_task_queue(QUEUE)

    def stop(self, c: Any) -> None:
        """Worker shutdown, or a consumer restart (broker connection lost): let go of the lease.

        A restarted consumer takes it again through ``tick`` like any standby, restoring
        the messages its previous connection left unacknowledged.
        """
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.lease is not None and self.active:
            with suppress(RedisUnavailable):
                self.lease.release()  # a standby can take over at once
        self.active = False
        self.paused = None

    shutdown = stop
