"""The outbox relay: publish what was spooled, drop what has an outcome, re-send what the broker lost.

``relay`` (beat, every ``MES_OUTBOX_RELAY_INTERVAL_S``) works a page (``RELAY_PAGE``) at a time,
and starts no new page once ``RELAY_BUDGET_SHARE`` of the interval has passed, so runs never
pile up however much is waiting:

1. publishes spooled entries, oldest first, with their original job id and request id, and marks
   each page sent in one write; an entry that can never be published (its payload does not fit
   the task) is set aside as a dead letter (``UNPUBLISHABLE``), where ``failed
   list/show/discard`` see it, so it never holds up the entries behind it;
2. looks at overdue entries only: sent, with ``sent_at`` more than ``grace_s`` ago (the
   ``state_sent`` index reads them and nothing else), oldest first. It settles those whose
   request id has an outcome: a ``QuantityLog``, or a ``FailedUpdate`` that is not ``retried``
   (a retried update stays protected until it is applied or fails again); a settled entry is
   pruned by the next continuous-verification pass once it has accounted for it (or deleted
   at once while verification is off, and after ``SETTLED_KEEP_S`` in any case). It re-publishes those
   still without one that the broker no longer holds (queued, or delivered and unacknowledged).
   Those the broker still holds wait before they are looked at again, each in proportion to
   the messages its queue delivers before it (``RELAY_SNOOZE_PER_HELD_S`` each, or the
   worker's own pace), all at least until the next run and ``RELAY_SNOOZE_PER_READ_S`` per
   message the broker holds, at most ``RELAY_SNOOZE_MAX_S``: one broker read per run at most,
   none while nothing is overdue, and a read of N messages at most every N x
   ``RELAY_SNOOZE_PER_READ_S``. An
   update near the head of a long queue that the broker then loses (its ``BRPOP``'s reply
   never read) is re-sent seconds later, not after the whole queue's drain;
3. if the broker refused step 1 and then answered step 2's read, tries step 1 once more: a
   spooled count that a correction overtook then waits one run less.

Step 2's re-publish covers what the broker itself can lose: kombu's Redis transport pops a
message (BRPOP) and records it as unacknowledged in a second step, so a worker killed or a
connection dropped between the two loses it. The request id makes a re-publish a duplicate at
worst, never a second count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import UpdateOne

from mes_tasks.app import app
from mes_tasks.apply.deadletter import Failure, record_failure
from mes_tasks.broker import held_task_ids, is_outage
from mes_tasks.db import mongo_errors
from mes_tasks.errors import PermanentError
from mes_tasks.keys import apply_ms_key
from mes_tasks.models import utcnow
from mes_tasks.names import UPDATE_QUANTITY, WORKORDER_QUEUE
from mes_tasks.queues import in_use
from mes_tasks.send.outbox import (
    SENT,
    SETTLED_KEEP_S,
    SPOOLED,
    WAITING,
    Doc,
    outbox_collection,
    prune_settled,
    settle,
    settled_request_ids,
)
from mes_tasks.send.producer import publish
from mes_tasks.settings import get_settings

log = logging.getLogger(__name__)

RELAY_PAGE = 200  # entries per MongoDB read and per write of a relay run
RELAY_BUDGET_SHARE = 0.5  # of MES_OUTBOX_RELAY_INTERVAL_S: a run starts no new page after that
# An overdue update the broker still holds is looked at again after this much per message its
# queue delivers before it (a drain of 100 updates a second will not reach it sooner), or the
# worker's own mean time per update when it is longer ...
RELAY_SNOOZE_PER_HELD_S = 0.01
# ... and at least this much per message the broker holds, so that reading them all (what a
# look costs) takes a small share of the relay's time however long the queues ...
RELAY_SNOOZE_PER_READ_S = 0.001
# ... and at most this long; a lost update is then re-sent that much later at most.
RELAY_SNOOZE_MAX_S = 300.0
SETTLED_PRUNE_EVERY_S = 600.0


class Unpublishable(PermanentError):
    """An outbox entry that can never be published: its payload does not fit the task."""

    code = "UNPUBLISHABLE"


Publish = Callable[[str, list[Any], dict[str, Any]], None]


@dataclass
class RelayResult:
    """What one relay run did."""

    published: int = 0  # spooled entries handed to the broker
    settled: int = 0  # entries settled (or removed) because their update has an outcome
    republished: int = 0  # sent entries the broker no longer held, sent again
    set_aside: int = 0  # entries that can never be published, moved to the dead letters

    def __bool__(self) -> bool:
        return bool(self.published or self.settled or self.republished or self.set_aside)


def relay(
    publish: Publish,
    held: Callable[[], dict[str, int]],
    grace_s: float,
    limit: int = RELAY_PAGE,
    budget_s: float | None = None,
    pace: Callable[[], float] | None = None,
) -> RelayResult:
    """Publish what was spooled, then look at what is overdue: drop it if it has an outcome,
    re-send it if the broker lost it, look again later if the broker still holds it.

    Args:
        publish: sends one update to the broker under its job id.
        held: the task ids the broker still holds, each with the messages ahead of it
            (``broker.held_task_ids``).
        grace_s: how long past its ``sent_at`` an update may go without an outcome before it is
            looked at.
        limit: entries per page.
        budget_s: no new page after this long; default ``RELAY_BUDGET_SHARE`` of the interval.
        pace: how long a queue takes per message (the worker's mean), read with the broker
            on first need, to look at a held update again once its queue may have reached
            it; ``RELAY_SNOOZE_PER_HELD_S`` when not given.
    """
    result = RelayResult()
    share = get_settings().outbox_relay_interval_s * RELAY_BUDGET_SHARE
    until = time.monotonic() + (share if budget_s is None else budget_s)
    broker = _Broker(held, pace)
    refused = not _publish_spooled(publish, limit, until, result)
    _check_overdue(publish, broker, grace_s, limit, until, result)
    if refused and broker.ids is not None:  # it answered since: spooled counts wait one run less
        _publish_spooled(publish, limit, until, result)
    _prune_now_and_then()
    return result


_pruned_at = [float("-inf")]  # monotonic time of this process's last safety prune


def _prune_now_and_then() -> None:
    """Settled entries no verification pass accounted for in ``SETTLED_KEEP_S`` (passes off,
    or failing): deleted, a look every ``SETTLED_PRUNE_EVERY_S`` at most."""
    if time.monotonic() - _pruned_at[0] < SETTLED_PRUNE_EVERY_S:
        return
    _pruned_at[0] = time.monotonic()
    gone = prune_settled(utcnow() - timedelta(seconds=SETTLED_KEEP_S))
    if gone:
        log.warning("outbox: %d settled entries no verification pass accounted for in a day, deleted", gone)


def _publish_spooled(publish: Publish, limit: int, until: float, result: RelayResult) -> bool:
    """Spooled entries, oldest first, a page at a time, until the broker refuses one or time is
    up; False if the broker refused one."""
    while True:
        with mongo_errors():
            page = list(outbox_collection().find({"state": {"$in": WAITING}}).sort("sent_at", 1).limit(limit))
        if not page:
            return True
        sent, complete = _send_all(publish, page, result)
        _mark_sent(sent, {"$inc": {"attempts": 1}})
        result.published += len(sent)
        if not complete or time.monotonic() >= until:
            return complete


def _send_all(publish: Publish, page: list[Doc], result: RelayResult) -> tuple[list[Any], bool]:
    """Publish each entry: the ``_id`` of each the broker took, and False if a broker failure
    stopped it (the rest wait for the next run). An entry that fails for any other reason is set
    aside and the others go on."""
    sent: list[Any] = []
    for doc in page:
        try:
            payload = json.loads(doc["payload"])
            publish(doc["job_id"], payload["args"], payload["kwargs"])
        except Exception as exc:
            if is_outage(exc):
                _mark_failed(doc, exc)
                log.warning("outbox relay stopped: %s", type(exc).__name__)
                return sent, False
            set_aside(doc, exc)
            result.set_aside += 1
            continue
        sent.append(doc["_id"])
    return sent, True


def _mark_sent(ids: list[Any], update: Doc) -> None:
    if ids:
        with mongo_errors():
            outbox_collection().update_many(
                {"_id": {"$in": ids}}, {"$set": {"state": SENT, "sent_at": utcnow()}, **update}
            )


def set_aside(doc: Doc, exc: Exception) -> None:
    """Move an entry that can never be published to the dead letters, and out of the outbox."""
    reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    payload = _loaded(doc.get("payload"))
    args: list[Any] = payload["args"] if isinstance(payload.get("args"), list) else []
    kwargs: dict[str, Any] = payload["kwargs"] if isinstance(payload.get("kwargs"), dict) else {}
    failure = Failure(
        task_name=UPDATE_QUANTITY,
        task_id=doc.get("job_id"),
        request_id=str(doc.get("request_id") or doc["job_id"]),
        work_order_id=args[0] if args and isinstance(args[0], str) else None,
        args=args,
        kwargs=kwargs,
        error=Unpublishable(f"the outbox entry cannot be published: {reason}"),
        attempts=1,
    )
    record_failure(failure)
    with mongo_errors():
        outbox_collection().delete_one({"_id": doc["_id"]})
    log.error("outbox: %s (job %s) can never be published, set aside as a dead letter: %s",
              doc.get("request_id"), doc.get("job_id"), reason)  # fmt: skip


def _loaded(raw: Any) -> Doc:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _mark_failed(doc: Doc, exc: Exception) -> None:
    with mongo_errors():
        outbox_collection().update_one(
            {"_id": doc["_id"]},
            {"$set": {"state": SPOOLED, "last_error": str(exc)[:500], "last_attempt_at": utcnow()},
             "$inc": {"attempts": 1}},
        )  # fmt: skip


class _Broker:
    """What the broker holds, read once per relay run, on first need, and when it was read."""

    def __init__(self, held: Callable[[], dict[str, int]], pace: Callable[[], float] | None) -> None:
        self._held = held
        self._pace = pace
        self.per_update_s = RELAY_SNOOZE_PER_HELD_S
        self.read_at: datetime | None = None
        self.ids: dict[str, int] | None = None

    def holds(self) -> dict[str, int] | None:
        """The task ids the broker holds, each with the messages ahead of it; None when it
        cannot be read (nothing is taken for lost)."""
        if self.read_at is None:
            self.read_at = utcnow()
            try:
                self.ids = self._held()
                self.per_update_s = self._pace() if self._pace else RELAY_SNOOZE_PER_HELD_S
            except Exception as exc:
                log.warning(
                    "outbox: cannot read the broker (%s); lost updates are checked next run",
                    type(exc).__name__,
                )
        return self.ids


def _check_overdue(
    publish: Publish, broker: _Broker, grace_s: float, limit: int, until: float, result: RelayResult
) -> None:
    """Overdue entries, oldest first, a page at a time, until none is left or time is up.

    Once the broker was read, only entries due before that read are looked at: a message
    published after it would look lost.
    """
    while True:
        due = utcnow() - timedelta(seconds=grace_s)
        if broker.read_at is not None:
            due = min(due, broker.read_at)
        with mongo_errors():
            page = list(
                outbox_collection()
                .find({"state": SENT, "sent_at": {"$lt": due}})
                .sort("sent_at", 1)
                .limit(limit)
            )
        if not page or not _check_page(publish, broker, page, result) or time.monotonic() >= until:
            return


def _check_page(publish: Publish, broker: _Broker, page: list[Doc], result: RelayResult) -> bool:
    """Settle, re-send or postpone each overdue entry of ``page``; False if the broker cannot be read."""
    done = settled_request_ids(d["request_id"] for d in page)
    result.settled += _settle([d for d in page if d["request_id"] in done])
    waiting = [d for d in page if d["request_id"] not in done]
    if not waiting:
        return True
    in_broker = broker.holds()
    if in_broker is None:
        return False
    absent = [d for d in waiting if d["job_id"] not in in_broker]
    done = settled_request_ids(d["request_id"] for d in absent)  # applied and acknowledged meanwhile
    result.settled += _settle([d for d in absent if d["request_id"] in done])
    _postpone([d for d in waiting if d["job_id"] in in_broker], in_broker, broker.per_update_s)
    return _resend(publish, [d for d in absent if d["request_id"] not in done], result)


def _settle(docs: list[Doc]) -> int:
    return settle([d["_id"] for d in docs], keep=get_settings().verify_interval_s > 0)


def _postpone(docs: list[Doc], held: dict[str, int], per_update_s: float) -> None:
    """Look at these again later, each when its queue may have reached it (``held``: what the
    broker holds, each with the messages ahead of it; ``per_update_s``: a queue's pace)."""
    if not docs:
        return
    # Not before the next run, nor sooner than reading everything again should cost.
    now = utcnow()
    floor_s = max(get_settings().outbox_relay_interval_s, len(held) * RELAY_SNOOZE_PER_READ_S)

    def later(doc: Doc) -> datetime:
        ahead = held.get(doc["job_id"], 0)
        return now + timedelta(seconds=min(RELAY_SNOOZE_MAX_S, max(floor_s, (ahead + 1) * per_update_s)))

    with mongo_errors():
        outbox_collection().bulk_write(
            [UpdateOne({"_id": d["_id"]}, {"$set": {"sent_at": later(d)}}) for d in docs], ordered=False
        )


def _resend(publish: Publish, lost: list[Doc], result: RelayResult) -> bool:
    """Re-publish updates the broker lost; False if the broker refused one (the rest wait)."""
    for doc in lost:
        log.warning("outbox: %s (job %s) has no outcome and is not in the broker; re-sending",
                    doc["request_id"], doc["job_id"])  # fmt: skip
    sent, complete = _send_all(publish, lost, result)
    _mark_sent(sent, {"$inc": {"republished": 1}})
    result.republished += len(sent)
    return complete


def resend(job_ids: list[str]) -> int:
    """Send these outbox entries again, each with its own job id and request id: an
    operator's answer to an unexplained update (safe: a second arrival is a duplicate).
    Returns how many the broker took."""
    with mongo_errors():
        docs = list(outbox_collection().find({"job_id": {"$in": job_ids}, "state": SENT}))
    result = RelayResult()
    _resend(publish, docs, result)
    return result.republished


def _relayed(channel: Any) -> list[str]:
    """Every workorder queue that may hold an update: ``workorder``, the current N's, and
    any leftover of another N (a producer or worker on another ``MES_PARTITIONS``)."""
    with channel.conn_or_acquire() as client:  # the channel's own connection may be in BRPOP
        queues = in_use(client, get_settings().partitions)
    return [*dict.fromkeys([WORKORDER_QUEUE, *queues])]


def relay_now(grace_s: float | None = None) -> RelayResult:
    """One relay run against this process's broker (the ``relay_outbox`` beat task's body).

    ``grace_s`` defaults to ``MES_OUTBOX_GRACE_S``.
    """
    with app.connection_for_read() as conn:

        def held() -> dict[str, int]:
            return _held(conn)

        settings = get_settings()
        grace = settings.outbox_grace_s if grace_s is None else grace_s
        return relay(publish, held, grace, pace=lambda: _pace_s(conn, settings.key_prefix))


def _held(conn: Any) -> dict[str, int]:
    conn.ensure_connection(max_retries=1)  # Redis down: fail now, the next run tries again
    return held_task_ids(conn.default_channel, _relayed(conn.default_channel))


def broker_holds() -> dict[str, int] | None:
    """What the broker holds now in every workorder queue, as the relay reads it (job id:
    messages ahead of it); None when the broker cannot be read."""
    try:
        with app.connection_for_read() as conn:
            return _held(conn)
    except Exception as exc:
        if is_outage(exc):
            return None
        raise


def _pace_s(conn: Any, prefix: str) -> float:
    """Seconds a queue takes per message: the worker's mean time per update if longer than
    ``RELAY_SNOOZE_PER_HELD_S`` (it publishes its estimate, see ``worker.state``). Read right
    after the broker, on the same connection."""
    with conn.default_channel.conn_or_acquire() as client:
        apply_ms = client.get(apply_ms_key(prefix))
    return max(RELAY_SNOOZE_PER_HELD_S, float(apply_ms or 0) / 1000)
