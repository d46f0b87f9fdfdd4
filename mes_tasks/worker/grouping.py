"""Group commit on the worker: the updates waiting behind the one being run are applied with it.

With ``MES_GROUP_MAX`` > 1, ``update_quantity`` takes up to ``MES_GROUP_MAX - 1`` more
updates from its queue (``take_waiting``: each one recorded as unacknowledged, as kombu
records the one it delivers) and applies them together (``apply.group``). Only what is
already waiting is taken: a lone update is applied at once, as before.

* Each taken message is acknowledged only after the transaction that holds its outcome has
  committed. A SIGKILL before that leaves it in kombu's unacknowledged records, and it comes
  back at the lease take-over or the visibility timeout: a duplicate, answered as one.
* An update the group did not settle, and a message that is not a plain update (a retry
  waiting on its countdown, a message of another task, one that does not decode), goes
  back to the head of its queue in its place (``hand_back``): the worker's next deliveries
  are those messages, in their order, and each takes Celery's one-at-a-time way, with its
  refusal, wait, retry or dead letter.
* Flower and the result store see each grouped update as a task of its own: its
  task-received, task-started and task-succeeded events and its result, as Celery would
  send and store them; the metrics count each update.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.app import trace
from celery.utils.saferepr import saferepr
from kombu.serialization import loads
from kombu.transport.virtual import QoS as VirtualQoS

from mes_tasks.apply import faults
from mes_tasks.apply.group import GroupItem, apply_group
from mes_tasks.apply.ledger import ApplyResult
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.tally import GROUP_SERIES, GROUPS
from mes_tasks.validation import UpdateRequest, bind_update, validate_update
from mes_tasks.worker.retries import count
from mes_tasks.worker.state import STATE, LedgerTask

log = logging.getLogger(__name__)
_received_log = logging.getLogger("celery.worker.strategy")  # where Celery logs a task's receipt

JSON = "application/json"
EVENTS_BUFFER_LIMIT = 3 * 1000 + 1  # a group's events (three per update) never flush part-way


@dataclass(frozen=True)
class Waiting:
    """A message taken from the queue for a group, and its update."""

    message: Any  # kombu's virtual Message
    task_id: str
    req: UpdateRequest
    headers: dict[str, Any]


def apply_with_waiting(task: LedgerTask, req: UpdateRequest, queue: str | None) -> ApplyResult | None:
    """Apply ``req`` (the task's own update) with the updates waiting behind it.

    Returns:
        ``req``'s result, or None: nothing was waiting, or the group did not settle ``req``;
        the task applies it alone.
    """
    limit = task.ledger.settings.group_max - 1
    channel = _channel()
    if limit <= 0 or channel is None or queue is None:
        return None
    started = time.monotonic()
    waiting = take_waiting(channel, queue, limit)
    if not waiting:
        return None
    own_id = req.request_id or task.request.id
    items = [GroupItem(req, own_id, task.request.id)]
    items += [GroupItem(w.req, w.req.request_id or w.task_id, w.task_id) for w in waiting]
    try:
        outcomes = apply_group(task.ledger, items)
    except BaseException:
        hand_back(channel, [w.message for w in waiting])
        raise
    faults.at(faults.COMMITTED)
    settled = [(w, r) for w, r in zip(waiting, outcomes[1:], strict=True) if r is not None]
    hand_back(channel, [w.message for w, r in zip(waiting, outcomes[1:], strict=True) if r is None])
    group_ms = (time.monotonic() - started) * 1000
    per_update_ms = group_ms / len(items)
    with _events_batched():
        for entry, result in settled:
            _finish(task, entry, result, per_update_ms)
    acknowledge(channel, [entry.message for entry, _ in settled])
    STATE.record_duration(started, updates=len(items))
    STATE.tally.count(GROUPS, len(items), series=GROUP_SERIES)
    if outcomes[0] is not None:
        count(outcomes[0].status, apply_ms=per_update_ms)
    return outcomes[0]


# Pop up to ARGV[1] messages from the head of the queue and record each as unacknowledged,
# as kombu records the one it delivers (the index scored by ARGV[2], the hash holding
# [payload, exchange, routing key]), in one step: no message is ever out of both.
_TAKE = """
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
for _, item in ipairs(items) do
  local properties = cjson.decode(item)['properties']
  local tag, info = properties['delivery_tag'], properties['delivery_info']
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  redis.call('HSET', KEYS[3], tag,
    '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
end
return items
"""


def take_waiting(channel: Any, queue: str, limit: int) -> list[Waiting]:
    """Up to ``limit`` plain updates waiting at the head of ``queue`` (its default-priority
    list, the one the consumer serves first), each recorded as unacknowledged; from the
    first message that is not one, they go back in their place."""
    try:
        with channel.conn_or_acquire() as client:
            keys = (queue, channel.unacked_index_key, channel.unacked_key)
            raw = client.eval(_TAKE, len(keys), *keys, limit, time.time())
    except Exception as exc:  # the broker failed: nothing was taken, or all of it is recorded
        log.info("group: could not take from %s: %r", queue, exc)
        return []
    messages = [channel.Message(json.loads(item), channel=channel) for item in raw or ()]
    for message in messages:
        VirtualQoS.append(channel.qos, message, message.delivery_tag)  # type: ignore[no-untyped-call]
    taken: list[Waiting] = []
    for n, message in enumerate(messages):
        entry = _plain_update(message)
        if entry is None:
            hand_back(channel, messages[n:])
            break
        taken.append(entry)
    return taken


def _plain_update(message: Any) -> Waiting | None:
    """The message's update, or None: not an update to apply now (another task, a countdown,
    an expiry, a body that does not decode or validate; Celery's way answers each)."""
    headers = dict(message.headers or {})
    if headers.get("task") != UPDATE_QUANTITY or headers.get("eta") or headers.get("expires"):
        return None
    if message.content_type != JSON or not isinstance(headers.get("id"), str):
        return None
    try:
        body = loads(message.body, message.content_type, message.content_encoding, accept=[JSON])  # type: ignore[no-untyped-call]
        args, kwargs = body[0], body[1]
        positional, named = bind_update(args, kwargs)
        req = validate_update(*positional, **named)
    except Exception:
        return None
    return Waiting(message, headers["id"], req, headers)


def hand_back(channel: Any, messages: Sequence[Any]) -> None:
    """Put ``messages`` back at the head of their queue, in their order (the last one first:
    the consumer pops from the head), and free their prefetch slots; never raises.

    A message that cannot be put back (the broker failed) stays in the unacknowledged
    records, which give it back at the lease take-over or the visibility timeout.
    """
    qos = channel.qos
    for message in reversed(messages):
        try:
            qos.restore_by_tag(message.delivery_tag, leftmost=False)
        except Exception as exc:
            log.warning("group: left %s in the unacknowledged records: %r", message.delivery_tag, exc)
        VirtualQoS.ack(qos, message.delivery_tag)  # type: ignore[no-untyped-call]  # the slot only


def _finish(task: LedgerTask, entry: Waiting, result: ApplyResult, apply_ms: float) -> None:
    """A grouped update's aftermath, as Celery gives a task's: its result, its events and its
    count (its acknowledgement is the group's: ``acknowledge``)."""
    value = result.to_dict()
    try:
        if not entry.headers.get("ignore_result"):  # as Celery: a submission's result is its log
            task.backend.store_result(entry.task_id, value, states.SUCCESS)
    except Exception as exc:  # the outcome is committed; a result is a convenience
        log.warning("group: could not store the result of %s: %r", entry.task_id, exc)
    _events(entry, value, apply_ms / 1000)
    _log(entry, value, apply_ms / 1000)
    count(result.status, apply_ms=apply_ms)


def _log(entry: Waiting, value: dict[str, Any], runtime_s: float) -> None:
    """The worker log's two lines of a task, as Celery writes them: received, succeeded."""
    context = {"id": entry.task_id, "name": UPDATE_QUANTITY}
    if _received_log.isEnabledFor(logging.INFO):
        _received_log.info(trace.LOG_RECEIVED, context, extra={"data": context})
    if trace.logger.isEnabledFor(logging.INFO):
        done = {**context, "return_value": saferepr(value), "runtime": runtime_s}
        trace.logger.info(trace.LOG_SUCCESS, done, extra={"data": done})


def acknowledge(channel: Any, messages: Sequence[Any]) -> None:
    """Acknowledge committed messages: their unacknowledged records deleted in one round
    trip, their prefetch slots freed; never raises. A record that stays (the broker failed)
    gives its message back at the take-over or the visibility timeout: a duplicate."""
    qos = channel.qos
    try:
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for message in messages:
                qos._remove_from_indices(message.delivery_tag, pipe)
            pipe.execute()
    except Exception as exc:
        log.warning("group: %d message(s) left unacknowledged: %r", len(messages), exc)
    for message in messages:
        VirtualQoS.ack(qos, message.delivery_tag)  # type: ignore[no-untyped-call]  # the slot only


def _dispatcher() -> Any:
    """The worker's event dispatcher, when it sends events."""
    consumer = STATE.consumer
    dispatcher = None if consumer is None else getattr(consumer, "event_dispatcher", None)
    return dispatcher if dispatcher is not None and dispatcher.enabled else None


@contextmanager
def _events_batched() -> Iterator[None]:
    """The group's task events go out together, as one ``task.multi`` message (Celery's own
    buffered form, which Flower and every event receiver read), not one publish each."""
    dispatcher = _dispatcher()
    if dispatcher is None:
        yield
        return
    group, limit = dispatcher.buffer_group, dispatcher.buffer_limit
    dispatcher.buffer_group, dispatcher.buffer_limit = frozenset({*group, "task"}), EVENTS_BUFFER_LIMIT
    try:
        yield
    finally:
        dispatcher.buffer_group, dispatcher.buffer_limit = group, limit
        try:
            dispatcher.flush(errors=False, groups=True)
        except Exception as exc:
            log.debug("group: events not sent: %r", exc)


def _events(entry: Waiting, value: dict[str, Any], runtime_s: float) -> None:
    dispatcher = _dispatcher()
    if dispatcher is None:
        return
    h = entry.headers
    try:
        dispatcher.send(
            "task-received",
            uuid=entry.task_id,
            name=UPDATE_QUANTITY,
            args=h.get("argsrepr"),
            kwargs=h.get("kwargsrepr"),
            root_id=h.get("root_id"),
            parent_id=h.get("parent_id"),
            retries=h.get("retries", 0),
            eta=None,
            expires=None,
        )
        dispatcher.send("task-started", uuid=entry.task_id)
        dispatcher.send("task-succeeded", uuid=entry.task_id, result=saferepr(value), runtime=runtime_s)
    except Exception as exc:
        log.debug("group: events of %s not sent: %r", entry.task_id, exc)


def _channel() -> Any:
    consumer = STATE.consumer
    task_consumer = None if consumer is None else getattr(consumer, "task_consumer", None)
    return None if task_consumer is None else getattr(task_consumer, "channel", None)
