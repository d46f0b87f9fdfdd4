"""The messages a group takes from its queue, on kombu's Redis transport: taken, handed back
and acknowledged each in one atomic step, in queue order.

* ``take``: pops up to N messages from the head of a queue and records each as
  unacknowledged exactly as kombu records the one it delivers (its delivery tag in the
  index, ``[payload, exchange, routing key]`` in the hash), in one Lua step. Only messages
  that decode as kombu messages are taken: the first one that does not stays at the head,
  where Celery's consumer answers it. The tags taken are also listed under a take key, so
  that a take whose reply was lost (the connection failed after the script ran) is found
  and handed back (``recover``), not left for the visibility timeout.
* ``hand_back``: puts messages back at the head of their queue in their order (the last
  one first: the consumer pops from the head), each only if its unacknowledged record is
  still there, and removes the records, in one Lua step. One that fails is kept and tried
  again (``recover``) before the next take and between tasks.
* ``acknowledge``: deletes committed messages' records in one pipeline.

Each frees the messages' prefetch slots in kombu's QoS, whatever Redis answered: a record
left behind gives its message back at the lease take-over or the visibility timeout.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu.transport.virtual import QoS as VirtualQoS

from mes_tasks.keys import take_key
from mes_tasks.settings import get_settings

log = logging.getLogger(__name__)

TAKE_KEY_TTL_S = 300  # a lost take's tags are kept this long for ``recover``

_TAKE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local taken, tags = {}, {}
for i = #items, 1, -1 do
  local ok, payload = pcall(cjson.decode, items[i])
  if not ok or type(payload) ~= 'table' or type(payload['properties']) ~= 'table' then break end
  local tag, info = payload['properties']['delivery_tag'], payload['properties']['delivery_info']
  if type(tag) ~= 'string' or type(info) ~= 'table' or type(info['exchange']) ~= 'string'
     or type(info['routing_key']) ~= 'string' then break end
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  local route = cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key'])
  redis.call('HSET', KEYS[3], tag, '[' .. items[i] .. ',' .. route .. ']')
  taken[#taken + 1] = items[i]
  tags[#tags + 1] = tag
end
if #taken > 0 then
  redis.call('LTRIM', KEYS[1], 0, -#taken - 1)
  redis.call('RPUSH', KEYS[4], unpack(tags))
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
return taken
"""

_HAND_BACK = """
local restored = 0
for i = #ARGV - 1, 1, -2 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i + 1])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    restored = restored + 1
  end
end
return restored
"""


@dataclass
class Take:
    """Messages taken from ``queue`` in one step; ``key`` lists their tags until acknowledged."""

    queue: str
    key: str
    messages: list[Any]


@dataclass
class _Pending:
    """A hand-back still to do: the tags (or the take key listing them) of one queue."""

    queue: str
    key: str | None
    tags: list[str] | None


_pending: list[_Pending] = []


def take(channel: Any, queue: str, limit: int) -> Take:
    """Up to ``limit`` messages from the head of ``queue``, recorded as unacknowledged."""
    key = take_key(get_settings().key_prefix, uuid.uuid4().hex)
    keys = (queue, channel.unacked_index_key, channel.unacked_key, key)
    try:
        with channel.conn_or_acquire() as client:
            raw = client.eval(_TAKE, len(keys), *keys, limit, time.time(), TAKE_KEY_TTL_S)
    except Exception as exc:  # the script may have run: its tags are under the take key
        log.info("group: no answer taking from %s (%r); handing back what was taken", queue, exc)
        _pending.append(_Pending(queue, key, None))
        recover(channel)
        return Take(queue, key, [])
    messages = [channel.Message(json.loads(item), channel=channel) for item in raw or ()]
    for message in messages:
        VirtualQoS.append(channel.qos, message, message.delivery_tag)  # type: ignore[no-untyped-call]
    return Take(queue, key, messages)


def hand_back(channel: Any, queue: str, messages: Sequence[Any]) -> None:
    """Put ``messages`` (in queue order) back at the head of ``queue``; never raises."""
    if not messages:
        return
    for message in messages:
        VirtualQoS.ack(channel.qos, message.delivery_tag)  # type: ignore[no-untyped-call]  # the slot only
    pairs = [(m.delivery_tag, json.dumps(_redelivered(m._raw))) for m in messages]
    try:
        _run_hand_back(channel, queue, pairs)
    except Exception as exc:
        log.warning("group: %d message(s) not handed back yet (%r); trying again", len(pairs), exc)
        _pending.append(_Pending(queue, None, [tag for tag, _ in pairs]))


def acknowledge(channel: Any, taken: Take, messages: Sequence[Any]) -> None:
    """Acknowledge committed ``messages`` of ``taken`` in one pipeline; never raises."""
    qos = channel.qos
    try:
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for message in messages:
                qos._remove_from_indices(message.delivery_tag, pipe)
            pipe.delete(taken.key)
            pipe.execute()
    except Exception as exc:  # they come back at the take-over or the visibility timeout: duplicates
        log.warning("group: %d message(s) left unacknowledged: %r", len(messages), exc)
    for message in messages:
        VirtualQoS.ack(qos, message.delivery_tag)  # type: ignore[no-untyped-call]  # the slot only


def has_pending() -> bool:
    return bool(_pending)


def recover(channel: Any) -> None:
    """Hand back what a lost take or a failed hand-back left in the unacknowledged records,
    in their order; what still fails stays pending. Never raises."""
    while _pending:
        pending = _pending[0]
        try:
            with channel.conn_or_acquire() as client:
                tags = pending.tags
                if tags is None:
                    listed = client.lrange(pending.key, 0, -1)
                    tags = [t.decode() if isinstance(t, bytes) else t for t in listed]
                records = client.hmget(channel.unacked_key, tags) if tags else []
                pairs = [
                    (tag, json.dumps(_redelivered(json.loads(record)[0])))
                    for tag, record in zip(tags, records, strict=True)
                    if record is not None
                ]
                _run_hand_back(channel, pending.queue, pairs)
                if pending.key is not None:
                    client.delete(pending.key)
        except Exception as exc:
            log.info("group: hand-back still pending (%r)", exc)
            return
        _pending.pop(0)
        if pairs:
            log.warning("group: handed back %d message(s) of an unanswered take", len(pairs))


def _run_hand_back(channel: Any, queue: str, pairs: list[tuple[str, str]]) -> None:
    if not pairs:
        return
    keys = (queue, channel.unacked_index_key, channel.unacked_key)
    with channel.conn_or_acquire() as client:
        client.eval(_HAND_BACK, len(keys), *keys, *(x for pair in pairs for x in pair))


def _redelivered(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload marked redelivered, as kombu marks a message it restores."""
    payload = json.loads(json.dumps(payload))
    payload.setdefault("headers", {})["redelivered"] = True
    payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return payload
