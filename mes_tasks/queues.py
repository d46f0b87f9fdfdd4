"""The workorder queues that hold updates: the current N's, and any leftover of another N.

A worker, a producer or the relay on another ``MES_PARTITIONS`` (a rolling change, a
mixed fleet) fills queues outside this process's N. Whoever counts, re-sends, shows or
purges updates must see those too, or it re-sends what the broker holds and shows a
queue as empty while it waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kombu.transport.redis import PRIORITY_STEPS, Channel

from mes_tasks.broker import in_flight_by_queue
from mes_tasks.db import redis_errors
from mes_tasks.partitions import every_queue, queue_names

UNACKED_KEY = "unacked"  # kombu's hash of delivered, unacknowledged messages (all queues)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for ``queue``, one per priority step."""
    return [f"{queue}{Channel.sep}{pri}" if pri else queue for pri in PRIORITY_STEPS]


def ask_waiting(pipe: Any, queues: Sequence[str]) -> int:
    """Queue on ``pipe`` the reads of what waits in ``queues``; the number of replies it adds.

    What waits in a queue is the length of all its lists: every reader (the producer's
    estimate, the workers' sharing, ``queue status``, the metrics) counts it this one way.
    """
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    return len(queues) * len(PRIORITY_STEPS)


def waiting_from(queues: Sequence[str], replies: Sequence[Any]) -> dict[str, int]:
    """What waits in each queue, from the replies ``ask_waiting`` added (in its order)."""
    n = len(PRIORITY_STEPS)
    return {q: sum(int(r) for r in replies[i * n : (i + 1) * n]) for i, q in enumerate(queues)}


def holding(client: Any) -> list[str]:
    """Every workorder queue, whatever N, with messages waiting or in flight."""
    names = every_queue()
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        ask_waiting(pipe, names)
        waiting = waiting_from(names, pipe.execute())
        delivered = in_flight_by_queue(client, UNACKED_KEY)
    return [q for q in names if waiting[q] or delivered.get(q)]


def leftovers(client: Any, partitions: int) -> list[str]:
    """Workorder queues outside ``partitions`` with messages waiting or in flight."""
    current = set(queue_names(partitions))
    return [q for q in holding(client) if q not in current]


def in_use(client: Any, partitions: int) -> list[str]:
    """The current queues for ``partitions``, then every leftover that holds updates."""
    return [*queue_names(partitions), *leftovers(client, partitions)]
