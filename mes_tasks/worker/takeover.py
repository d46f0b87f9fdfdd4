"""A take-over: what the new holder of a queue's lease does before it consumes the queue.

It takes over from the previous holder, which died, was fenced out, or is this very
process (its broker connection was lost, with Redis down, while it held a retry on its
countdown). Before it consumes, it:

1. ends the predecessor's MongoDB sessions (``sessions.end_others``), which aborts a
   transaction it left open and frees that work order at once, instead of after
   MongoDB's 60 s transaction lifetime;
2. deletes the work-order locks the predecessor kept (``clear_predecessor_locks``);
3. puts the predecessor's unacknowledged messages of the queue back in it, at once
   instead of after the visibility timeout: with one consumer, nothing else can be
   processing them.

It keeps what live workers hold: its own deliveries and, with partitions, what a live
worker noted in the handed record as it handed the queue over (``handover``). After a
hand-over (the queue's owner record, ``keys.lease_owner_key``, was cleared) it takes
nothing over: the predecessor lives.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection
from contextlib import suppress
from typing import Any

import redis

from mes_tasks.apply import sessions
from mes_tasks.apply.owners import TOKEN_SEP, owner_id, text
from mes_tasks.broker import delivered_tags, unacked_of
from mes_tasks.db import Mongo
from mes_tasks.errors import MesError
from mes_tasks.keys import lease_owner_key, lock_key, takeovers_key
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.worker.handover import handed_entries, liveness
from mes_tasks.worker.lease import Slot

log = logging.getLogger(__name__)

# Delete a lock whose token names the given owner ("<owner_id>/...").
_DEL_IF_OWNED_BY = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class TakeOver:
    """Take a queue's lease, and its previous holder's work with it."""

    def __init__(self, client: redis.Redis, prefix: str, mongo: Mongo, partitions: int) -> None:
        self.client, self.prefix, self.mongo, self.partitions = client, prefix, mongo, partitions

    def try_take(self, c: Any, slot: Slot) -> None:
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

    def _take_over(self, c: Any, slot: Slot) -> None:
        sessions.forget_recorded()  # a successor may have ended ours while we were standby
        channel = c.connection.default_channel
        if slot.queue == WORKORDER_QUEUE and self.partitions == 1:  # the one active consumer: as ever
            ended = self._end_sessions()
            cleared = clear_predecessor_locks(self.client, self.prefix)
            restored = restore_unacked(channel, keep=delivered_tags(channel))
        else:
            ended, cleared, restored = self._take_from_previous(channel, slot.queue)
        slot.active = True
        with suppress(redis.RedisError):  # a count for `metrics`, not a guarantee
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
        previous = record_owner(self.client, self.prefix, queue)
        if previous is None:
            return 0, 0, 0
        ended, cleared = 0, 0
        if previous != owner_id():
            ended = self._end_sessions(previous)
            cleared = clear_locks_of(self.client, self.prefix, previous)
        return ended, cleared, restore_unacked(channel, queue, keep=self._held_by_the_living(channel, queue))

    def _end_sessions(self, owner: str | None = None) -> int:
        try:
            return sessions.end_others(self.mongo, self.client, self.prefix, owner=owner)
        except MesError as exc:  # their transactions then time out on the server
            log.warning("could not end the previous holder's MongoDB sessions: %s", exc.message)
            return 0

    def _held_by_the_living(self, channel: Any, queue: str) -> set[str]:
        """Tags of ``queue`` live workers hold: this one's, and what a live one kept as it handed it over."""
        me, alive = owner_id(), liveness(self.client, self.prefix)
        kept = handed_entries(self.client, self.prefix).items()
        others = {tag for tag, e in kept if e.queue == queue and e.holder != me and alive(e.holder)}
        return delivered_tags(channel) | others


def restore_unacked(channel: Any, queue: str = WORKORDER_QUEUE, keep: Collection[str] = ()) -> int:
    """Put every unacknowledged message of ``queue`` back in the queue, but those in ``keep``.

    Only safe for a queue with a single consumer, about to be this one: ``keep`` names the
    deliveries live workers still hold (this one's own, and what others noted as handed).
    """
    restored = 0
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        for tag, _message in list(unacked_of(client, channel, queue)):  # one consumer's worth
            if text(tag) not in keep:
                channel.qos.restore_by_tag(tag, client, leftmost=True)
                restored += 1
    return restored


def clear_predecessor_locks(client: redis.Redis, prefix: str, queue: str = WORKORDER_QUEUE) -> int:
    """Record this process as ``queue``'s active consumer; delete the locks the previous one kept.

    The previous holder is dead or paused past its lease: the epochs we bump fence it
    out, so its locks (kept between updates, see ``keptlocks``) only delay us.
    """
    previous = record_owner(client, prefix, queue)
    return 0 if previous in (None, owner_id()) else clear_locks_of(client, prefix, previous)


def record_owner(client: redis.Redis, prefix: str, queue: str) -> str | None:
    """Name this process ``queue``'s holder; the previous holder (this process too), if any."""
    answer = client.set(lease_owner_key(prefix, queue), owner_id(), get=True)
    return text(answer) if answer else None


def clear_locks_of(client: redis.Redis, prefix: str, owner: str) -> int:
    """Delete every work-order lock whose token names ``owner``."""
    mine = f"{owner}{TOKEN_SEP}"
    keys = list(client.scan_iter(match=lock_key(prefix, "*"), count=500))
    return sum(int(client.eval(_DEL_IF_OWNED_BY, 1, key, mine)) for key in keys)
