"""What the Celery broker (kombu's Redis transport) still holds for a queue.

Read straight from kombu's own keys: the queue's lists (one per priority step) and
the ``unacked`` hash of delivered, unacknowledged messages (with their ETA retries),
and ``unacked_index``, the time each of those was delivered. A message restored and
delivered again keeps its delivery tag; that time tells one delivery from the next.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Sequence
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


def held_task_ids(channel: Any, queues: str | Sequence[str]) -> dict[str, int]:
    """The task id of every message of ``queues`` that is waiting or delivered but
    unacknowledged, with how many messages its queue delivers before it (0 once delivered).

    kombu pushes on a list's left and pops from its right, the highest priority step's
    list first.
    """
    names = [queues] if isinstance(queues, str) else list(queues)
    held: dict[str, int] = {}
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        for queue in names:
            ahead = 0
            for pri in channel.priority_steps:
                waiting = list(_list_items(client, channel._q_for_pri(queue, pri)))
                for i, raw in enumerate(reversed(waiting)):
                    held[task_id_of(raw)] = ahead + i
                ahead += len(waiting)
        for _, message in unacked_of(client, channel, *names):
            held[message.get("headers", {}).get("id", "")] = 0
    held.pop("", None)
    return held


def in_flight_by_queue(client: Any, unacked_key: str = "unacked") -> dict[str, int]:
    """Delivered, unacknowledged messages per queue (their routing key)."""
    counts: dict[str, int] = {}
    for routing_key in routing_keys(client.hvals(unacked_key)):
        counts[routing_key] = counts.get(routing_key, 0) + 1
    return counts


def routing_keys(unacked_values: Iterable[Any]) -> Iterator[str]:
    """The routing key (queue) of each of kombu's ``unacked`` hash values; unreadable ones left out."""
    for raw in unacked_values:
        try:
            _, _, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        yield str(routing_key)


def unacked_of(client: Any, channel: Any, *queues: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(delivery tag, message) of each delivered, unacknowledged message of ``queues``."""
    wanted = set(queues)
    for tag, raw in client.hgetall(channel.unacked_key).items():  # kombu's hash, all queues
        message, exchange, routing_key = json.loads(raw)
        if wanted & {exchange, routing_key}:
            yield tag, message


def delivered_tags(channel: Any, *queues: str) -> set[str]:
    """Tags of the messages this channel was given and has not acknowledged (of ``queues``, if named).

    A retry waiting on its countdown is one of them. kombu keeps them in its QoS, less
    the tags acknowledged since it last tidied up.
    """
    qos, wanted = channel.qos, set(queues)
    acked = set(qos._dirty)
    return {
        str(tag)
        for tag, message in list(qos._delivered.items())
        if tag not in acked and (not wanted or wanted & _destination(message))
    }


def delivery_times(client: Any, channel: Any, tags: Collection[str]) -> dict[str, float]:
    """When each of ``tags`` was delivered, as kombu recorded it; tags not in flight are left out."""
    if not tags:
        return {}
    ordered = list(tags)
    scores = client.zmscore(channel.unacked_index_key, ordered)
    return {tag: float(at) for tag, at in zip(ordered, scores, strict=True) if at is not None}


def restore_delivery(client: Any, channel: Any, tag: str, delivered_at: float) -> bool:
    """Put one unacknowledged message back in its queue if it is still the delivery of ``delivered_at``.

    kombu's ``restore_by_tag`` would take whatever delivery has the tag now: a later one,
    to another worker, of the same message. Checked and restored in one transaction
    (``WATCH``), as kombu restores; behind what waits, as a lease take-over restores.
    """
    qos, restored = channel.qos, False

    def restore(pipe: Any) -> None:
        nonlocal restored
        restored = False  # run again if a watched key changed
        if pipe.zscore(qos.unacked_index_key, tag) != delivered_at:
            return
        raw = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        pipe.zrem(qos.unacked_index_key, tag).hdel(qos.unacked_key, tag)
        if raw:
            payload, exchange, routing_key = json.loads(raw)
            channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost=True)
            restored = True

    client.transaction(restore, qos.unacked_key, qos.unacked_index_key)
    return restored


def _destination(message: Any) -> set[str]:
    info = getattr(message, "delivery_info", None) or {}
    return {str(info.get("exchange", "")), str(info.get("routing_key", ""))}


def take_waiting(channel: Any, queue: str) -> list[str]:
    """Remove every waiting message of ``queue`` (each list read and deleted atomically); their task ids."""
    taken: list[bytes] = []
    with channel.conn_or_acquire() as client:
        for pri in channel.priority_steps:
            pipe = client.pipeline(transaction=True)
            key = channel._q_for_pri(queue, pri)
            items, _ = pipe.lrange(key, 0, -1).delete(key).execute()
            taken.extend(items)
    return [task_id_of(raw) for raw in taken]


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
    try:
        return str(json.loads(raw).get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""
