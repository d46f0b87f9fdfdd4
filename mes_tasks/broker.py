"""What the Celery broker (kombu's Redis transport) still holds for a queue.

Read straight from kombu's own keys: the queue's lists (one per priority step) and
the ``unacked`` hash of delivered, unacknowledged messages (with their ETA retries).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import kombu.exceptions
import redis
from kombu.exceptions import OperationalError

SCAN_CHUNK = 1000  # list entries read per LRANGE

# What a publish raises when the broker (or the result store) is down or refuses: an outage,
# worth spooling and retrying. Anything else (a TypeError from Celery's argument check, an
# EncodeError) is the caller's mistake: retrying it can never succeed.
BROKER_ERRORS: tuple[type[Exception], ...] = (OperationalError, redis.RedisError, OSError)
# What wraps such an error: Celery's Redis result consumer reports a failed reconnect as a
# RuntimeError, and kombu (5.7 and later) a Redis pipeline of a publish batch that failed
# while it ran as a BatchPublishError (delivery uncertain).
WRAPPED_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    getattr(kombu.exceptions, "BatchPublishError", RuntimeError),
)


def is_outage(exc: BaseException) -> bool:
    """Whether a publish failed because a store is down (spool it), not because of its arguments.

    A ``WRAPPED_ERRORS`` one counts when raised from a connection error.
    """
    if isinstance(exc, BROKER_ERRORS):
        return True
    return isinstance(exc, WRAPPED_ERRORS) and isinstance(exc.__cause__, BROKER_ERRORS)


def held_task_ids(channel: Any, queues: str | Sequence[str]) -> set[str]:
    """Task ids of every message of ``queues`` that is waiting or delivered but unacknowledged."""
    names = [queues] if isinstance(queues, str) else list(queues)
    ids: set[str] = set()
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        for queue in names:
            for pri in channel.priority_steps:
                ids.update(_task_id(raw) for raw in _list_items(client, channel._q_for_pri(queue, pri)))
        ids.update(
            message.get("headers", {}).get("id", "") for _, message in unacked_of(client, channel, *names)
        )
    ids.discard("")
    return ids


def in_flight_by_queue(client: Any, unacked_key: str = "unacked") -> dict[str, int]:
    """Delivered, unacknowledged messages per queue (their routing key)."""
    counts: dict[str, int] = {}
    for raw in client.hvals(unacked_key):
        try:
            _, _, routing_key = json.loads(raw)
        except ValueError:
            continue
        counts[str(routing_key)] = counts.get(str(routing_key), 0) + 1
    return counts


def unacked_of(client: Any, channel: Any, *queues: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(delivery tag, message) of each delivered, unacknowledged message of ``queues``."""
    wanted = set(queues)
    for tag, raw in client.hgetall(channel.unacked_key).items():  # kombu's hash, all queues
        message, exchange, routing_key = json.loads(raw)
        if wanted & {exchange, routing_key}:
            yield tag, message


def take_waiting(channel: Any, queue: str) -> list[str]:
    """Remove every waiting message of ``queue`` (each list read and deleted atomically); their task ids."""
    taken: list[bytes] = []
    with channel.conn_or_acquire() as client:
        for pri in channel.priority_steps:
            pipe = client.pipeline(transaction=True)
            key = channel._q_for_pri(queue, pri)
            items, _ = pipe.lrange(key, 0, -1).delete(key).execute()
            taken.extend(items)
    return [_task_id(raw) for raw in taken]


def _list_items(client: Any, key: str) -> Iterator[bytes]:
    start = 0
    while True:
        chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
        yield from chunk
        if len(chunk) < SCAN_CHUNK:
            return
        start += SCAN_CHUNK


def task_id_of(raw: bytes | str) -> str:
    """The task id of a raw queued message (empty if it is not one)."""
    return _task_id(raw)


def _task_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw).get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""
