"""A workorder queue's lease, and the slot through which this worker consumes the queue under it.

The lease (``{prefix}lease:{queue}``, ``keys``) is token-owned and lives ``MES_LEASE_TTL_S``;
the lock watchdog thread extends it. A holder that dies lets it expire; one on this host
that is no longer running (or a previous incarnation of this very process id, as in a
restarted container) is recognised and replaced at once. A holder that was only paused
(SIGSTOP) and comes back is fenced out by the work-order epochs; its heartbeat fails and it
goes back to standby.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from mes_tasks.apply.locks import RELEASE_IF_HELD, RedisLock
from mes_tasks.apply.owners import holder_is_dead, owner_of
from mes_tasks.errors import LockBusy
from mes_tasks.keys import lease_key
from mes_tasks.names import WORKORDER_QUEUE

log = logging.getLogger(__name__)


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
        log.warning(
            "the %s lease holder %s is not running any more: taking over", WORKORDER_QUEUE, owner_of(token)
        )
        return bool(self.client.eval(RELEASE_IF_HELD, 1, self.key, token))

    @property
    def held(self) -> bool:
        return self.watchdog.watching(self) and self.lost_reason is None and self.fresh()


@dataclass
class Slot:
    """A workorder queue this worker may consume, and its lease."""

    queue: str
    lease: Lease
    active: bool = False  # consuming it (or paused on it) under its lease
    paused: bool | None = None  # as last seen, for the log

    @property
    def held(self) -> bool:
        """Active under a lease surely held: what ``may_apply`` asks."""
        return self.active and self.lease.held

    def drop_if_lost(self, c: Any) -> None:
        """Stop consuming the queue if its lease is no longer surely held, and let that lease go.

        Merely late (a slow Redis, a failover), the watchdog would go on extending a lease
        this worker no longer consumes under, and nobody else could take the queue.
        """
        if self.active and not self.lease.held:
            log.error("lost the %s lease (%s): standby now", self.queue, self.lease.lost_reason or "late")
            c.cancel_task_queue(self.queue)
            self.active = False
            self.lease.let_go()


class Slots(dict[str, Slot]):
    """This worker's slots by queue; a queue's slot, with its lease, is made on first use."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float) -> None:
        super().__init__()
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def __missing__(self, queue: str) -> Slot:
        slot = self[queue] = Slot(queue, Lease(self.client, lease_key(self.prefix, queue), self.ttl_s))
        return slot

    def active(self) -> list[str]:
        """The queues consumed (or paused on) under their lease, in the order first taken."""
        return [queue for queue, slot in self.items() if slot.active]


def consumed(c: Any) -> set[str]:
    """The queues Celery's consumer ``c`` consumes now."""
    return {q.name for q in c.task_consumer.queues}


def consuming(c: Any, queue: str) -> bool:
    return queue in consumed(c)
