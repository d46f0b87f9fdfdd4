"""Group commit: the updates waiting in a partition's queue, applied in one transaction.

``apply_group`` takes updates in queue order and commits as many of them as it can
together, with every guarantee of the single apply (``ledger``):

* **exactly once**: request ids already logged are found before any write (one query) and
  answered as duplicates; a request id repeated inside the group counts once, at its first
  place. The log inserts and the counter writes go in one ``bulkWrite`` in one transaction,
  so a request id logged meanwhile by someone else (a unique-key error) aborts the whole
  group: nothing moved, and its updates are applied one by one;
* **lock and fence of every work order**: each is held (kept or taken) with its epoch before
  the group is planned; each counter write matches the epoch and the counters and version
  this holder knows, so a fenced-out holder matches nothing and the group is aborted; every
  lock is checked (the checks sent before the write, their answers read after it) before
  the commit, so a lock lost before the commit point stops the whole group;
* **order per work order**: each update's ``value`` is the counter right after it, in queue
  order, and its log carries the work order's version right after it;
* **never below zero**, judged update by update in queue order: the one update that would go
  below zero is left out, and the others commit.

An update the group cannot settle (below zero, a work order that is unknown or cannot be
held, a request id used for another payload, a group that failed as a whole) is left to the
single apply, which gives it its own outcome: a refusal, a wait, a retry or a dead letter.
The caller applies it alone, after the group. Nothing is left half done: a group commits
whole or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.client_session import ClientSession

from mes_tasks.apply import faults
from mes_tasks.apply.ledger import ApplyResult, Ledger, _ident
from mes_tasks.apply.locks import RedisLock
from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError
from mes_tasks.models import COUNTER_FIELDS, VERSION, utcnow
from mes_tasks.validation import UpdateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupItem:
    """One update of a group: validated, with the request id it counts under."""

    req: UpdateRequest
    request_id: str
    task_id: str | None = None


@dataclass
class _Holder:
    lock: RedisLock
    epoch: int
    start: dict[str, int]  # the counters and version this holder knows, before the group
    now: dict[str, int]  # ...and after the updates planned so far


def apply_group(ledger: Ledger, items: Sequence[GroupItem]) -> list[ApplyResult | None]:
    """Apply ``items`` (in queue order) together; one outcome per item.

    Returns:
        Per item, its ``ApplyResult`` (``applied``, committed; or ``duplicate``), or None:
        not settled by the group; the caller applies it alone (``Ledger.apply``), which
        answers it as it would any update.
    """
    outcomes: list[ApplyResult | None] = [None] * len(items)
    if not items:
        return outcomes
    try:
        with mongo_errors():
            ids = list(dict.fromkeys(item.request_id for item in items))
            logged = {d["request_id"]: d for d in ledger.logs.find({"request_id": {"$in": ids}})}
    except Exception as exc:  # the single applies meet the same failure and answer it
        log.info("group: could not read the log (%s); applying one by one", exc)
        return outcomes
    holders = _hold(ledger, [i.req.work_order_id for i in items if i.request_id not in logged])
    planned: dict[int, ApplyResult] = {}
    repeats: list[tuple[int, int]] = []  # (index, index of the first with its request id)
    first_at: dict[str, int] = {}
    inserts: list[dict[str, Any]] = []  # the logs, in queue order
    for index, item in enumerate(items):
        if item.request_id in logged:
            outcomes[index] = _duplicate(ledger, item, logged[item.request_id])
            continue
        if item.request_id in first_at:
            repeats.append((index, first_at[item.request_id]))
            continue
        first_at[item.request_id] = index
        holder = holders.get(item.req.work_order_id)
        after = None if holder is None else _plan(holder, item.req)
        if holder is None or after is None:
            continue
        inserts.append(ledger._log_doc(item.req, item.request_id, holder.epoch, after, item.task_id))
        ident = _ident(item.req, item.request_id)
        planned[index] = ApplyResult("applied", *ident, value=after[0], epoch=holder.epoch, version=after[1])
    committed = not planned or _commit(ledger, inserts, holders)
    _keep_or_let_go(ledger, holders, committed)
    if not committed:
        return outcomes  # the duplicates of logged ones stand; the rest go one by one
    for index, result in planned.items():
        outcomes[index] = result
    for index, first in repeats:
        outcomes[index] = _repeat(items[index], planned.get(first))
    return outcomes


def _hold(ledger: Ledger, work_order_ids: list[str]) -> dict[str, _Holder]:
    """The lock, epoch and known counters of each work order (kept, or taken now); a work
    order that cannot be held is left out (its updates go one by one, and meet the error)."""
    holders: dict[str, _Holder] = {}
    for work_order_id in dict.fromkeys(work_order_ids):
        kept = None if ledger.kept is None else ledger.kept.reuse(work_order_id)
        if kept is not None:
            lock, epoch, known = kept.lock, kept.epoch, kept.known
        else:
            try:
                # No wait: a group holding some locks never waits for another (two workers
                # of a change of MES_PARTITIONS would wait on each other); the single apply waits.
                lock, epoch, known = ledger.take(work_order_id, wait_s=0)
            except Exception as exc:
                log.info("group: %s not held (%s); its updates go one by one", work_order_id, exc)
                continue
        holders[work_order_id] = _Holder(lock, epoch, dict(known), dict(known))
    return holders


def _plan(holder: _Holder, req: UpdateRequest) -> tuple[int, int] | None:
    """The counter's value and the version right after ``req``, or None when it cannot be
    planned (below zero, or counters this holder does not know)."""
    field = COUNTER_FIELDS[req.kind]
    value, version = holder.now.get(field), holder.now.get(VERSION)
    if value is None or version is None or value + req.quantity < 0:
        return None
    holder.now[field], holder.now[VERSION] = value + req.quantity, version + 1
    return value + req.quantity, version + 1


def _commit(ledger: Ledger, inserts: list[dict[str, Any]], holders: dict[str, _Holder]) -> bool:
    """The logs and one counter write per work order in one transaction, every lock checked
    before the commit. False, with nothing written, when anything is not as planned.

    MongoDB 8.0 and later take them in one ``bulkWrite``; earlier servers in one
    ``insert_many`` and one update per work order, in the same transaction.
    """
    moved = {wo: h for wo, h in holders.items() if h.now != h.start}
    updates = [_counter_write(wo, h) for wo, h in moved.items()]
    try:
        with ledger._transaction() as session:
            faults.at(faults.BEGUN)
            with ExitStack() as stack:
                checks = [stack.enter_context(h.lock.check_sent(ledger.check_line)) for h in moved.values()]
                matched = _write(ledger, session, inserts, updates)
                for check in checks:
                    check.confirm()
            if matched != len(updates):
                session.abort_transaction()  # a counter or an epoch moved without us
                log.info("group: a work order changed under its holder; applying one by one")
                return False
            faults.at(faults.WRITTEN)
    except Exception as exc:  # a duplicate key, a lost lock, an outage: nothing committed
        log.info("group of %d not committed (%s); applying one by one", len(inserts), _short(exc))
        return False
    return True


def _write(
    ledger: Ledger, session: ClientSession, inserts: list[dict[str, Any]], updates: list[_CounterWrite]
) -> int:
    """The group's writes inside its transaction; how many counter writes matched."""
    if ledger._has_bulk_write():
        logs, work_orders = ledger.logs.full_name, ledger.work_orders.full_name
        writes: list[InsertOne[dict[str, Any]] | UpdateOne] = [InsertOne(d, namespace=logs) for d in inserts]
        writes += [UpdateOne(match, change, namespace=work_orders) for match, change in updates]
        return int(ledger.mongo.bulk_write(writes, session=session, ordered=True).matched_count)
    ledger.logs.insert_many(inserts, ordered=True, session=session)
    return sum(ledger.work_orders.update_one(m, c, session=session).matched_count for m, c in updates)


_CounterWrite = tuple[dict[str, Any], dict[str, Any]]  # the match and the change


def _counter_write(work_order_id: str, holder: _Holder) -> _CounterWrite:
    match: dict[str, Any] = {"_id": work_order_id, "epoch": holder.epoch, VERSION: holder.start[VERSION]}
    inc: dict[str, int] = {VERSION: holder.now[VERSION] - holder.start[VERSION]}
    for field in COUNTER_FIELDS.values():
        if field in holder.now and holder.now[field] != holder.start.get(field):
            match[field] = holder.start[field]
            inc[field] = holder.now[field] - holder.start[field]
    return match, {"$inc": inc, "$set": {"updated_at": utcnow()}}


def _keep_or_let_go(ledger: Ledger, holders: dict[str, _Holder], committed: bool) -> None:
    """Keep each lock with the counters it now knows; after a failed group let go of every
    one (the single applies take them afresh). Never raises: the group's outcome stands."""
    for work_order_id, holder in holders.items():
        try:
            if committed and ledger.kept is not None:
                ledger.kept.keep(work_order_id, holder.lock, holder.epoch, holder.now)
            else:
                holder.lock.let_go()
        except Exception as exc:  # a Redis error letting go: the lock's TTL ends it
            log.info("group: lock of %s not let go (%s)", work_order_id, _short(exc))


def _duplicate(ledger: Ledger, item: GroupItem, logged: dict[str, Any]) -> ApplyResult | None:
    try:
        return ledger._duplicate(item.req, item.request_id, logged)
    except MesError:  # the request id names another update: refused, one by one
        return None


def _repeat(item: GroupItem, first: ApplyResult | None) -> ApplyResult | None:
    """A request id met again in the group: a duplicate of its first, when that one
    committed with the same update."""
    if first is None or _ident(item.req, item.request_id) != _ident_of_result(first):
        return None
    return ApplyResult("duplicate", *_ident(item.req, item.request_id), value=first.value, epoch=first.epoch)


def _ident_of_result(result: ApplyResult) -> tuple[str, str, int, str]:
    return (result.work_order_id, result.kind, result.quantity, result.request_id)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
