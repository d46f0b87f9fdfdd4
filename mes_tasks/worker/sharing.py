"""Partition sharing: one view of the workorder queues that every worker agrees on.

Each ``workorder`` worker writes itself into the members hash every tick (``roster``):
``owner id -> {"until": epoch ms, "n": its MES_PARTITIONS, "pinned": [queues]}``. Every
automatic worker derives the same view from the live members and the queues that hold
messages, whatever its own ``MES_PARTITIONS``:

    queues = the current queues of every live member's N
             + every workorder queue with messages waiting or in flight (a leftover)
             - the queues a live pinned worker (``-Q workorder.{i}``) was started on
    share  = ceil(len(queues) / live automatic workers)

so during a rolling change of N (a mixed fleet) nobody computes its share over its own
queues alone. A worker above its share hands one queue over only while another automatic
worker holds fewer than its share, so a queue is never handed to nobody; a queue with
messages that has had no holder for ``ORPHAN_GRACE_S`` is taken by anyone, above share.
``Share`` is one worker's part in it: its entry, and each tick's look and moves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mes_tasks.apply.owners import holder_is_dead, owner_id, owner_of, text
from mes_tasks.broker import routing_keys
from mes_tasks.keys import lease_key, members_key
from mes_tasks.partitions import every_queue, index_of, queue_names
from mes_tasks.queues import UNACKED_KEY, ask_waiting, waiting_from

# A queue with messages and no holder for this long is taken by any worker, above its share:
# two ticks, time for a worker under its share to take it first.
ORPHAN_GRACE_S = 1.0
IN_FLIGHT_EVERY = 4  # ticks between reads of kombu's unacked hash for queues with messages in flight


@dataclass(frozen=True)
class Member:
    """A live worker as its members-hash entry says."""

    owner: str
    until_ms: int
    partitions: int | None = None  # None: an entry of an older release
    pinned: tuple[str, ...] = ()

    @property
    def automatic(self) -> bool:
        return not self.pinned

    def encode(self) -> str:
        return json.dumps({"until": self.until_ms, "n": self.partitions, "pinned": list(self.pinned)})


def decode(owner: str, raw: str | bytes) -> Member | None:
    """A members-hash entry; the bare expiry of an older release too; None if unreadable."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, int):
        return Member(owner, value)
    if not isinstance(value, dict) or not isinstance(value.get("until"), int):
        return None
    n = value.get("n")
    pinned = tuple(q for q in value.get("pinned") or () if isinstance(q, str) and index_of(q) is not None)
    return Member(owner, value["until"], n if isinstance(n, int) and n >= 1 else None, pinned)


@dataclass(frozen=True)
class View:
    """The queues the automatic workers share, and how many each holds at most."""

    queues: tuple[str, ...]
    share: int
    automatic: tuple[str, ...]  # owner ids of the live automatic workers

    def __contains__(self, queue: object) -> bool:
        return queue in self.queues


def view_of(members: Iterable[Member], busy: Iterable[str]) -> View:
    """The one view every automatic worker derives from the live ``members`` and ``busy`` queues."""
    live = list(members)
    current = {q for m in live if m.partitions is not None for q in queue_names(m.partitions)}
    pinned = {q for m in live for q in m.pinned}
    wanted = (current | set(busy)) - pinned
    queues = tuple(q for q in every_queue() if q in wanted)
    automatic = tuple(sorted(m.owner for m in live if m.automatic))
    return View(queues, fair_share(len(queues), len(automatic)), automatic)


def fair_share(queues: int, members: int) -> int:
    """How many of ``queues`` each of ``members`` live workers holds at most."""
    return max(1, math.ceil(queues / max(1, members)))


@dataclass
class Plan:
    """What one automatic worker does this tick: queues to try to take, at most one to hand over."""

    take: list[str] = field(default_factory=list)
    give: str | None = None


def plan(
    view: View,
    me: str,
    holders: dict[str, str | None],
    orphaned: set[str],
    order: Sequence[str],
) -> Plan:
    """This worker's moves, from the view and who holds each queue now.

    Args:
        view: the shared view (``view_of``).
        me: this worker's owner id.
        holders: queue -> owner id of its lease holder (None: free), for ``view.queues``.
        orphaned: free queues with messages that have had no holder for ``ORPHAN_GRACE_S``.
        order: this worker's preference among the queues (held first, then a ring of its own).
    """
    mine = [q for q in order if holders.get(q) == me]
    result = Plan()
    if len(mine) > view.share and _someone_below_share(view, holders, me):
        result.give = mine[-1]
    room = view.share - len(mine) + (result.give is not None)
    for queue in order:
        if holders.get(queue) is None and queue in view and (room > 0 or queue in orphaned):
            result.take.append(queue)
            room -= 1
    return result


def _someone_below_share(view: View, holders: dict[str, str | None], me: str) -> bool:
    held: dict[str, int] = dict.fromkeys(view.automatic, 0)
    for queue in view.queues:
        owner = holders.get(queue)
        if owner in held:
            held[owner] += 1
    return any(n < view.share for owner, n in held.items() if owner != me)


def ring(queues: Sequence[str], me: str, held: Iterable[str]) -> list[str]:
    """``queues`` in this worker's order: the ones it holds, then the rest from its own offset.

    Different workers start at different queues, so they do not all race for the first.
    """
    kept = [q for q in queues if q in set(held)]
    if not queues:
        return []
    start = sum(map(ord, me)) % len(queues)
    rest = [q for q in [*queues[start:], *queues[:start]] if q not in kept]
    return [*kept, *rest]


@dataclass(frozen=True)
class Look:
    """What one tick read: the live members, and per workorder queue its messages and holder."""

    members: list[Member]
    waiting: set[str]  # queues with messages waiting
    in_flight: set[str] | None  # queues with messages delivered, unacknowledged (None: not read)
    holders: dict[str, str | None]  # every workorder queue -> owner id of its lease holder


class Roster:
    """The members hash, the queues and the leases, as one worker writes and reads them each tick."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def look(self, me: Member, in_flight: bool = False) -> Look:
        """Renew this worker's entry and read everything a tick decides on, in one round trip.

        One round trip, not one per question: a Redis gone silent costs a tick one socket
        timeout, not one per read.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        key, now_ms, queues = members_key(self.prefix), int(time.time() * 1000), every_queue()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, me.owner, me.encode())
        pipe.hgetall(key)
        pipe.mget([lease_key(self.prefix, q) for q in queues])
        asked = ask_waiting(pipe, queues)
        if in_flight:
            pipe.hvals(UNACKED_KEY)
        _, raw, tokens, *rest = pipe.execute()
        waiting, delivered = waiting_from(queues, rest[:asked]), rest[asked:]
        return Look(
            members=self._live(raw, now_ms),
            waiting={q for q, n in waiting.items() if n},
            in_flight=set(routing_keys(delivered[0])) if delivered else None,
            holders={q: None if t is None else owner_of(t) for q, t in zip(queues, tokens, strict=True)},
        )

    def _live(self, raw: dict[Any, Any], now_ms: int) -> list[Member]:
        entries = {text(owner): decode(text(owner), value) for owner, value in raw.items()}
        expired = [o for o, m in entries.items() if m is None or m.until_ms < now_ms]
        if expired:
            self.client.hdel(members_key(self.prefix), *expired)
        return [m for m in entries.values() if m is not None and m.until_ms >= now_ms]

    def renew(self, me: Member) -> None:
        """Renew this worker's entry only (a pinned worker reads nothing of the others)."""
        self.client.hset(members_key(self.prefix), me.owner, me.encode())

    def leave(self, owner: str) -> None:
        self.client.hdel(members_key(self.prefix), owner)


@dataclass(frozen=True)
class Seen:
    """What an automatic worker decides a tick on: the view, and each of its queues' holder."""

    view: View
    holders: dict[str, str | None]  # view queue -> owner id of its lease holder (None: free)
    waiting: set[str]  # queues with messages waiting


class Share:
    """This worker's part in the sharing: its members-hash entry, and each tick's moves."""

    def __init__(self, roster: Roster, ttl_s: float, partitions: int, pinned: tuple[str, ...] = ()) -> None:
        self.roster, self.ttl_s, self.partitions, self.pinned = roster, ttl_s, partitions, pinned
        self.in_flight: set[str] = set()  # workorder queues with messages in flight, as last read
        self.free_since: dict[str, float] = {}  # free queue with messages -> monotonic time first seen

    def member(self) -> Member:
        until_ms = int((time.time() + self.ttl_s) * 1000)
        return Member(owner_id(), until_ms, self.partitions, self.pinned)

    def look(self, tick: int) -> Seen:
        """The shared view, who holds each of its queues, and which queues have messages waiting.

        Args:
            tick: the step's tick count; one in ``IN_FLIGHT_EVERY`` reads the queues in flight too.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        look = self.roster.look(self.member(), in_flight=tick % IN_FLIGHT_EVERY == 1)
        if look.in_flight is not None:
            self.in_flight = look.in_flight
        members = [m for m in look.members if not holder_is_dead(m.owner)]
        view = view_of(members, look.waiting | self.in_flight)
        # A holder whose process on this host has ended holds nothing: try_acquire takes it at once.
        holders = {
            q: None if o is None or holder_is_dead(o) else o for q, o in look.holders.items() if q in view
        }
        return Seen(view, holders, look.waiting)

    def moves(self, seen: Seen, held: list[str]) -> Plan:
        """This tick's moves (``plan``); ``held``: the queues this worker consumes under their lease."""
        me = owner_id()
        orphaned = self._orphans(seen.holders, seen.waiting)
        return plan(seen.view, me, seen.holders, orphaned, ring(seen.view.queues, me, held))

    def _orphans(self, holders: dict[str, str | None], waiting: set[str]) -> set[str]:
        """Queues with messages waiting that have had no holder for ``ORPHAN_GRACE_S``."""
        now = time.monotonic()
        free = {q for q, owner in holders.items() if owner is None and q in waiting}
        self.free_since = {q: self.free_since.get(q, now) for q in free}
        return {q for q, since in self.free_since.items() if now - since >= ORPHAN_GRACE_S}

    def renew(self) -> None:
        """Renew this worker's entry only: a pinned worker reads nothing of the others."""
        self.roster.renew(self.member())

    def leave(self) -> None:
        self.roster.leave(owner_id())
