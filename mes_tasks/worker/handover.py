"""Hand-overs: a worker gives a partition back, and what it still held of it is restored later.

A worker above its fair share (or holding a queue that left the shared view) hands one
over (``HandOver.give``): it stops consuming it, notes what it still holds of it, clears
the partition's owner record and releases the lease. The cleared owner record tells the
next holder that its predecessor lives, so it restores nothing (``takeover``).

What the worker still holds are retries of the partition on their countdown. It notes
them first, in ``{prefix}handed:workorder`` (``keys``): tag -> ``[queue, holder owner id,
kombu's delivery time]``. Each noted message is restored later, checked against its
delivery time so that a later delivery of it is never taken, by whoever can tell that
nobody runs it any more (``handed_due``): the worker itself once it no longer holds it (its
connection was lost), or the partition's holder once that worker is dead.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis

from mes_tasks.apply.owners import holder_is_dead, owner_id, text
from mes_tasks.broker import delivered_tags, delivery_times, restore_delivery
from mes_tasks.errors import RedisUnavailable
from mes_tasks.keys import handed_key, lease_owner_key, members_key
from mes_tasks.worker.lease import Slot, consuming
from mes_tasks.worker.sharing import decode

log = logging.getLogger(__name__)


class HandOver:
    """Give a partition back to the others; restore what was handed over once nobody runs it."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def give(self, c: Any, slot: Slot) -> None:
        """Give a partition back to the others: stop consuming it, then let go of its lease.

        What this worker still holds of it (retries on their countdown) is noted in the
        handed record first; if that fails, it keeps the partition this tick. Its owner
        record goes next, while the lease is still ours, so the next holder knows this was
        a hand-over (nothing to end, clear or restore now), not a death.
        """
        if consuming(c, slot.queue):
            c.cancel_task_queue(slot.queue)
        try:
            self._note(c, slot.queue)
        except (redis.RedisError, OSError) as exc:  # consumed again at the end of the tick
            log.warning("kept %s: could not note what this worker holds of it: %s", slot.queue, exc)
            return
        with suppress(redis.RedisError):
            self.client.delete(lease_owner_key(self.prefix, slot.queue))
        with suppress(RedisUnavailable):
            slot.lease.release()
        slot.active, slot.paused = False, None
        log.warning("handed %s over (more workers share the partitions, or a leftover drained)", slot.queue)

    def _note(self, c: Any, queue: str) -> None:
        channel = c.connection.default_channel
        tags = delivered_tags(channel, queue)
        if tags:
            with channel.conn_or_acquire() as broker:
                times = delivery_times(broker, channel, tags)
            note_handed(self.client, self.prefix, queue, times)

    def restore_due(self, c: Any, held: Collection[str]) -> None:
        """Restore the handed-over messages that nobody runs any more (``handed_due``).

        Args:
            c: Celery's consumer.
            held: the queues this worker holds the lease of.
        """
        channel = c.connection.default_channel
        try:
            entries = handed_entries(self.client, self.prefix)
            if not entries:
                return
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


@dataclass(frozen=True)
class Handed:
    """A message its holder still held of a queue it handed over (``keys.handed_key``)."""

    queue: str
    holder: str  # owner id
    delivered_at: float  # kombu's delivery time: this delivery, not a later one


def note_handed(client: redis.Redis, prefix: str, queue: str, times: dict[str, float]) -> None:
    """Record that this process still holds the deliveries ``times`` (tag -> time) of ``queue``."""
    if times:
        me = owner_id()
        fields = {tag: json.dumps([queue, me, at]) for tag, at in times.items()}
        client.hset(handed_key(prefix), mapping=fields)  # type: ignore[arg-type]


def handed_entries(client: redis.Redis, prefix: str) -> dict[str, Handed]:
    """The handed record, tag -> entry; unreadable entries are left out."""
    entries: dict[str, Handed] = {}
    for tag, raw in client.hgetall(handed_key(prefix)).items():
        try:
            queue, holder, at = json.loads(raw)
            entries[text(tag)] = Handed(str(queue), str(holder), float(at))
        except (ValueError, TypeError):
            continue
    return entries


def handed_due(
    entries: dict[str, Handed],
    me: str,
    mine: Collection[str],
    held: Collection[str],
    alive: Callable[[str], bool],
) -> list[str]:
    """The handed-over deliveries nobody runs any more, to be restored now (and forgotten).

    Args:
        entries: the handed record.
        me: this worker's owner id.
        mine: the tags this worker holds now (delivered, unacknowledged).
        held: the queues this worker holds the lease of.
        alive: whether a worker (owner id) is alive.

    Returns:
        This worker's own entries that it no longer holds (acknowledged, handed back, or
        dropped with a lost connection), and another worker's entries of a queue this one
        holds once that worker is dead.
    """
    return [
        tag
        for tag, entry in entries.items()
        if (entry.holder == me and tag not in mine)
        or (entry.holder != me and entry.queue in held and not alive(entry.holder))
    ]


def liveness(client: redis.Redis, prefix: str) -> Callable[[str], bool]:
    """Whether a worker (owner id) is alive: an unexpired member, and not a process of this host
    that has ended. The members hash is read once, on first use."""
    live: list[set[str]] = []

    def alive(owner: str) -> bool:
        if not live:
            now_ms = time.time() * 1000
            members = client.hgetall(members_key(prefix))
            entries = (decode(text(m), raw) for m, raw in members.items())
            live.append({e.owner for e in entries if e is not None and e.until_ms > now_ms})
        return owner in live[0] and not holder_is_dead(owner)

    return alive
