"""The workorder queues that hold updates: the current N's, and any leftover of another N.

A worker, a producer or the relay on another ``MES_PARTITIONS`` (a rolling change, a
mixed fleet) fills queues outside this process's N. Whoever counts, re-sends, shows or
purges updates must see those too, or it re-sends what the broker holds and shows a
queue as empty while it waits.
"""

from __future__ import annotations

from typing import Any

from mes_tasks.broker import in_flight_by_queue
from mes_tasks.db import redis_errors
from mes_tasks.partitions import every_queue, queue_names

UNACKED_KEY = "unacked"  # kombu's hash of delivered, unacknowledged messages (all queues)


def holding(client: Any) -> list[str]:
    """Every workorder queue, whatever N, with messages waiting or in flight."""
    names = every_queue()
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        for queue in names:
            pipe.llen(queue)
        lengths = pipe.execute()
        delivered = in_flight_by_queue(client, UNACKED_KEY)
    return [q for q, n in zip(names, lengths, strict=True) if n or delivered.get(q)]


def leftovers(client: Any, partitions: int) -> list[str]:
    """Workorder queues outside ``partitions`` with messages waiting or in flight."""
    current = set(queue_names(partitions))
    return [q for q in holding(client) if q not in current]


def in_use(client: Any, partitions: int) -> list[str]:
    """The current queues for ``partitions``, then every leftover that holds updates."""
    return [*queue_names(partitions), *leftovers(client, partitions)]
