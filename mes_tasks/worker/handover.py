"""Hand-overs: what a worker still holds of a partition it gives up, and who restores it.

A hand-over clears the partition's owner record, so the next holder restores nothing
while its predecessor lives. That predecessor may still hold retries of the partition on
their countdown; it notes them first, in ``{prefix}handed:workorder`` (``keys``): tag ->
``[queue, holder owner id, kombu's delivery time]``. Each tick a worker restores the noted
messages nobody runs any more (``handed_due``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import redis

from mes_tasks.apply.owners import holder_is_dead, owner_id
from mes_tasks.keys import handed_key, members_key
from mes_tasks.worker.sharing import decode


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
            entries[_text(tag)] = Handed(str(queue), str(holder), float(at))
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
            entries = (decode(_text(m), raw) for m, raw in members.items())
            live.append({e.owner for e in entries if e is not None and e.until_ms > now_ms})
        return owner in live[0] and not holder_is_dead(owner)

    return alive
