"""Group commit on the worker: the updates waiting behind the one being run are applied with it.

With ``MES_GROUP_MAX`` > 1, ``update_quantity`` takes up to ``MES_GROUP_MAX - 1`` more
updates from its queue (``take_waiting``; ``waiting`` takes, hands back and acknowledges
them on the broker, each in one atomic step) and applies them together (``apply.group``).
Only what is already waiting is taken: a lone update is applied at once, as before.

* Each taken message is acknowledged only after the transaction that holds its outcome has
  committed. A SIGKILL before that leaves it in kombu's unacknowledged records, and it comes
  back at the lease take-over or the visibility timeout: a duplicate, answered as one.
* An update the group did not settle, and a message that is not a plain update (a retry
  waiting on its countdown, a message of another task, one that does not decode), goes
  back to the head of its queue in its place (``waiting.hand_back``): the worker's next deliveries
  are those messages, in their order, and each takes Celery's one-at-a-time way, with its
  refusal, wait, retry or dead letter.
* Flower, the worker log and the result store see each grouped update as a task of its
  own: its task-received, task-started and task-succeeded events, its received and
  succeeded log lines and its result, as Celery would send, write and store them; the
  metrics count each update. A message that asks for more than an update (callbacks, a
  chain, a chord) takes Celery's way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.app import trace
from celery.utils.saferepr import saferepr
from kombu.serialization import loads

from mes_tasks.apply import faults
from mes_tasks.apply.group import GroupItem, apply_group
from mes_tasks.apply.ledger import ApplyResult
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.tally import GROUP_SERIES
from mes_tasks.validation import UpdateRequest, bind_update, validate_update
from mes_tasks.worker import waiting
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
    waiting.recover(channel)  # what an earlier group could not hand back goes first
    started = time.monotonic()
    taken, entries = take_waiting(channel, queue, limit)
    if not entries:
        return None
    own_id = req.request_id or task.request.id
    items = [GroupItem(req, own_id, task.request.id)]
    items += [GroupItem(w.req, w.req.request_id or w.task_id, w.task_id) for w in entries]
    outcomes: list[ApplyResult | None] = [None] * len(items)
    try:
        outcomes = apply_group(task.ledger, items)
        faults.at(faults.COMMITTED)
    finally:  # whatever happens after the commit: the settled are acknowledged, the rest go back
        settled = [(w, r) for w, r in zip(entries, outcomes[1:], strict=True) if r is not None]
        left = [w.message for w, r in zip(entries, outcomes[1:], strict=True) if r is None]
        waiting.hand_back(channel, queue, left)
        try:
            _finish_all(task, settled, started, len(items))
        finally:
            waiting.acknowledge(channel, taken, [entry.message for entry, _ in settled])
    applied = len(settled) + (outcomes[0] is not None)
    STATE.record_duration(started, updates=len(items))
    if applied > 1:
        STATE.tally.observe(applied, GROUP_SERIES)
    if outcomes[0] is not None:
        count(outcomes[0].status, apply_ms=(time.monotonic() - started) * 1000 / len(items))
    return outcomes[0]


def take_waiting(channel: Any, queue: str, limit: int) -> tuple[waiting.Take, list[Waiting]]:
    """Up to ``limit`` plain updates waiting at the head of ``queue`` (its default-priority
    list, the one the consumer serves first), each recorded as unacknowledged; from the
    first message that is not one, they go back in their place."""
    taken = waiting.take(channel, queue, limit)
    entries: list[Waiting] = []
    for n, message in enumerate(taken.messages):
        entry = _plain_update(message)
        if entry is None:
            waiting.hand_back(channel, queue, taken.messages[n:])
            break
        entries.append(entry)
    return taken, entries


def _finish_all(
    task: LedgerTask, settled: list[tuple[Waiting, ApplyResult]], started: float, size: int
) -> None:
    per_update_ms = (time.monotonic() - started) * 1000 / size
    results = _Results(task)
    logged = trace.logger.isEnabledFor(logging.INFO)
    with _events_batched() as dispatcher:
        for entry, result in settled:
            _finish(entry, result, per_update_ms, results, dispatcher, logged)


class _Results:
    """Stores grouped updates' results where their caller asked for one (as Celery would);
    after one failure (Redis unwell) stores no more for this group, rather than block the
    worker on each in turn."""

    def __init__(self, task: LedgerTask) -> None:
        self.backend = task.backend
        self.failed = False

    def store(self, entry: Waiting, value: dict[str, Any]) -> None:
        if self.failed or entry.headers.get("ignore_result"):  # a submission's result is its log
            return
        try:
            self.backend.store_result(entry.task_id, value, states.SUCCESS)
        except Exception as exc:  # the outcome is committed; a result is a convenience
            self.failed = True
            log.warning("group: results not stored from %s on: %r", entry.task_id, exc)


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
        args, kwargs, embed = body
        if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
            return None
        positional, named = bind_update(args, kwargs)
        req = validate_update(*positional, **named)
    except Exception:
        return None
    return Waiting(message, headers["id"], req, headers)


def _finish(
    entry: Waiting, result: ApplyResult, apply_ms: float, results: _Results, dispatcher: Any, logged: bool
) -> None:
    """A grouped update's aftermath, as Celery gives a task's: its result, its events, its log
    lines and its count (its acknowledgement is the group's: ``waiting.acknowledge``)."""
    value = result.to_dict()
    results.store(entry, value)
    shown = saferepr(value) if dispatcher is not None or logged else ""  # one repr, both uses
    if dispatcher is not None:
        _events(dispatcher, entry, shown, apply_ms / 1000)
    _log(entry, shown if logged else None, apply_ms / 1000)
    count(result.status, apply_ms=apply_ms)


def _log(entry: Waiting, shown: str | None, runtime_s: float) -> None:
    """The worker log's two lines of a task, as Celery writes them: received, succeeded."""
    context = {"id": entry.task_id, "name": UPDATE_QUANTITY}
    if _received_log.isEnabledFor(logging.INFO):
        _received_log.info(trace.LOG_RECEIVED, context, extra={"data": context})
    if shown is not None:
        done = {**context, "return_value": shown, "runtime": runtime_s}
        trace.logger.info(trace.LOG_SUCCESS, done, extra={"data": done})


def _dispatcher() -> Any:
    """The worker's event dispatcher, when it sends events."""
    consumer = STATE.consumer
    dispatcher = None if consumer is None else getattr(consumer, "event_dispatcher", None)
    return dispatcher if dispatcher is not None and dispatcher.enabled else None


@contextmanager
def _events_batched() -> Iterator[Any]:
    """The group's task events go out together, as one ``task.multi`` message (Celery's own
    buffered form, which Flower and every event receiver read), not one publish each. Yields
    the worker's event dispatcher, or None when it sends no events."""
    dispatcher = _dispatcher()
    if dispatcher is None:
        yield None
        return
    group, limit = dispatcher.buffer_group, dispatcher.buffer_limit
    dispatcher.buffer_group, dispatcher.buffer_limit = frozenset({*group, "task"}), EVENTS_BUFFER_LIMIT
    try:
        yield dispatcher
    finally:
        dispatcher.buffer_group, dispatcher.buffer_limit = group, limit
        try:
            dispatcher.flush(errors=False, groups=True)
        except Exception as exc:
            log.debug("group: events not sent: %r", exc)


def _events(dispatcher: Any, entry: Waiting, shown: str, runtime_s: float) -> None:
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
        dispatcher.send("task-succeeded", uuid=entry.task_id, result=shown, runtime=runtime_s)
    except Exception as exc:
        log.debug("group: events of %s not sent: %r", entry.task_id, exc)


def _channel() -> Any:
    consumer = STATE.consumer
    task_consumer = None if consumer is None else getattr(consumer, "task_consumer", None)
    return None if task_consumer is None else getattr(task_consumer, "channel", None)


def _recover_between_tasks() -> None:
    channel = _channel()
    if channel is not None and waiting.has_pending():
        waiting.recover(channel)


STATE.between_tasks.append(_recover_between_tasks)
