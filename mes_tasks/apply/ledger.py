"""The apply step: lock, fence, then log + counter in one MongoDB transaction.

Correctness rests on MongoDB, not on the lock:

* the log's unique ``request_id`` and the counter ``$inc`` commit together, so a
  request counts once or not at all;
* the ``$inc`` only matches while the work order's ``epoch`` is the one this holder
  set right after acquiring the lock, so a holder whose lock silently expired is
  fenced out as soon as the next holder acquires.

Two ways to commit, with the same guarantees:

* the one-write way (the common case under a kept lock, MongoDB 8.0+): the holder knows
  the counter's value under its epoch (read when it bumped the epoch, moved by its own
  commits since: its known counter), so the log insert and a ``$inc`` that matches only
  that exact value go in one ``bulkWrite``: two MongoDB round trips (the write and the
  commit). If the
  counter or the epoch is not what the holder knew, nothing is counted and the general
  way runs;
* general: ``findAndModify`` reads the value the ``$inc`` produced, then the log insert,
  then the commit: three round trips.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import redis
from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.errors import ClientBulkWriteException, DuplicateKeyError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from mes_tasks.apply import faults
from mes_tasks.apply.keptlocks import KeptLocks
from mes_tasks.apply.locks import CheckLine, RedisLock
from mes_tasks.apply.sessions import SessionLog
from mes_tasks.db import RETRYABLE_CODES, Mongo, mongo_errors
from mes_tasks.errors import (
    FenceLost,
    LockLost,
    NegativeCounter,
    RequestIdConflict,
    UnknownWorkOrder,
    WriteConflict,
)
from mes_tasks.keys import lock_key, wanted_key
from mes_tasks.models import COUNTER_FIELDS, VERSION, QuantityLog, WorkOrder, utcnow
from mes_tasks.settings import Settings
from mes_tasks.validation import UpdateRequest

log = logging.getLogger(__name__)

# The server's default read concern, not "snapshot" and not one from the URI: the
# transaction trusts nothing it reads except through its own writes, whose matches are
# conflict-checked, and a "majority" commit makes everything before it in the oplog
# durable too. (SecantusDB also refuses any read concern on a transaction's first bulkWrite.)
TXN_READ_CONCERN = ReadConcern()
TXN_WRITE_CONCERN = WriteConcern("majority")
BULK_WRITE_WIRE_VERSION = 25  # MongoDB 8.0: the client-level bulkWrite command
DUPLICATE_KEY = 11000
BUMP_MAX_TIME_MS = 500  # a bump blocked this long is behind an abandoned transaction
BLOCKED_FIRST_S = 1.0  # a work order found blocked is not tried again for this long...
BLOCKED_MAX_S = 16.0  # ...doubling while it stays blocked, up to this


@dataclass(frozen=True)
class Fenced:
    """A transaction under a work order's lock, and the epoch its writes must match."""

    session: ClientSession
    epoch: int


@dataclass(frozen=True)
class ApplyResult:
    """What one update did: ``applied`` or ``duplicate``, and the counter afterwards."""

    status: str
    work_order_id: str
    kind: str
    quantity: int
    request_id: str
    value: int
    epoch: int
    version: int | None = dataclasses.field(default=None, compare=False)  # the work order's, after it

    def to_dict(self) -> dict[str, Any]:
        """The task's result (the version is the ledger's own business)."""
        data = asdict(self)
        del data["version"]
        return data


class Ledger:
    """Applies quantity updates; holds the connections it needs (passed in).

    One ledger per thread: its kept locks and its lock-check connection are that thread's.
    """

    def __init__(
        self,
        mongo: Mongo,
        redis_client: redis.Redis,
        settings: Settings,
        kept: KeptLocks | None = None,
        sessions: SessionLog | None = None,
    ) -> None:
        self.mongo = mongo
        self.redis = redis_client
        self.settings = settings
        self.kept = kept  # the worker's: locks and epochs kept between updates (see keptlocks)
        self.work_orders = WorkOrder._get_collection()
        self.logs = QuantityLog._get_collection()
        self.check_line = CheckLine(redis_client)  # this ledger's thread's own, for lock checks
        self.one_write_commits = 0  # commits that took the one-write way (see the module docstring)
        self.sessions = sessions  # the worker's: where a successor finds our transactions' sessions
        self._blocked: dict[str, tuple[float, float]] = {}  # work order -> (retry after, back-off s)

    def lock_for(self, work_order_id: str, wait_s: float | None = None) -> RedisLock:
        s = self.settings
        return RedisLock(
            self.redis,
            lock_key(s.key_prefix, work_order_id),
            s.lock_ttl_s,
            wait_s=s.lock_wait_s if wait_s is None else wait_s,
            extend_interval_s=s.lock_extend_interval_s,
            wanted_key=wanted_key(s.key_prefix, work_order_id),
            on_wait=self._let_kept_go,
        )

    def _let_kept_go(self) -> None:
        """About to wait for a lock: let go of the ones this worker keeps.

        Two workers holding one work order's updates (a change of N: its old and new
        partition) may each keep the lock the other waits for; each would wait out
        ``MES_LOCK_WAIT_S``. A worker that waits keeps nothing.
        """
        if self.kept is not None and len(self.kept):
            log.info("waiting for a lock: letting go of %d kept lock(s)", self.kept.release_all())

    def apply(self, req: UpdateRequest, request_id: str, task_id: str | None = None) -> ApplyResult:
        """Apply one validated update exactly once.

        Raises:
            UnknownWorkOrder, NegativeCounter, RequestIdConflict: permanent.
            LockBusy, LockLost, FenceLost, RedisUnavailable, MongoUnavailable,
            WriteConflict: transient; retrying is safe.
        """
        kept = None if self.kept is None else self.kept.reuse(req.work_order_id)
        if kept is not None:
            try:
                return self._commit_then_keep(req, request_id, task_id, kept.lock, kept.epoch, kept.known)
            except (FenceLost, LockLost) as exc:
                # The kept lock or its epoch went stale between updates (someone took the
                # work order meanwhile): nothing was written; take both afresh, as if not kept.
                log.info("kept lock of %s went stale (%s); taking it again", req.work_order_id, exc)
        lock, epoch, known = self.take(req.work_order_id)
        return self._commit_then_keep(req, request_id, task_id, lock, epoch, known)

    def _commit_then_keep(
        self,
        req: UpdateRequest,
        request_id: str,
        task_id: str | None,
        lock: RedisLock,
        epoch: int,
        known: dict[str, int],
    ) -> ApplyResult:
        try:
            result = self.commit(req, request_id, epoch, task_id, lock=lock, known=known)
        except BaseException:
            lock.let_go()
            raise
        if self.kept is None:
            lock.let_go()
        else:
            self.kept.keep(req.work_order_id, lock, epoch, known)
        return result

    def take(self, work_order_id: str, wait_s: float | None = None) -> tuple[RedisLock, int, dict[str, int]]:
        """Acquire the work order's lock (waiting ``MES_LOCK_WAIT_S``, or ``wait_s``), start its
        watchdog, and take the fence.

        Returns the lock, the new epoch and the counters as they stood when it was set.
        """
        self._refuse_if_blocked(work_order_id)
        lock = self.lock_for(work_order_id, wait_s)
        lock.acquire()
        lock.start_watchdog()
        try:
            doc = self._bump_epoch(work_order_id)
        except WriteConflict:
            lock.let_go()
            self._note_blocked(work_order_id)
            raise
        except BaseException:
            lock.let_go()
            raise
        self._blocked.pop(work_order_id, None)
        known = {f: doc[f] for f in (*COUNTER_FIELDS.values(), VERSION) if isinstance(doc.get(f), int)}
        return lock, int(doc["epoch"]), known

    def _refuse_if_blocked(self, work_order_id: str) -> None:
        """Fail at once (a retry later) for a work order that was just found blocked.

        A transaction that a dead worker left open blocks its work order until it is ended
        (see ``sessions``) or times out; each try costs ``BUMP_MAX_TIME_MS``, so one blocked
        work order must not cost that for each of its messages to every update behind them.
        """
        blocked = self._blocked.get(work_order_id)
        if blocked is not None and time.monotonic() < blocked[0]:
            raise WriteConflict(f"work order {work_order_id!r} is blocked by another transaction")

    def _note_blocked(self, work_order_id: str) -> None:
        previous = self._blocked.get(work_order_id)
        backoff = BLOCKED_FIRST_S if previous is None else min(BLOCKED_MAX_S, previous[1] * 2)
        self._blocked[work_order_id] = (time.monotonic() + backoff, backoff)

    def bump_epoch(self, work_order_id: str) -> int:
        """Take the fence: increment the work order's epoch and return the new value."""
        return int(self._bump_epoch(work_order_id)["epoch"])

    def _bump_epoch(self, work_order_id: str) -> dict[str, Any]:
        """Increment the epoch; the work order's epoch and counters afterwards.

        A plain write, bounded by ``maxTimeMS``: it only waits when another transaction
        holds the work order, which, under the lock, means one a killed worker left open.
        Then one transactional attempt answers at once (a retryable write conflict) and
        lets servers that reap abandoned transactions lazily (SecantusDB) do so.
        """
        try:
            with mongo_errors():
                doc = self._bump(work_order_id, maxTimeMS=BUMP_MAX_TIME_MS)
        except WriteConflict:
            with self._transaction() as session:
                doc = self._bump(work_order_id, session=session)
        if doc is None:
            raise UnknownWorkOrder(f"work order {work_order_id!r} does not exist")
        return doc

    def _bump(self, work_order_id: str, **kwargs: Any) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self.work_orders.find_one_and_update(
            {"_id": work_order_id},
            {"$inc": {"epoch": 1}},
            projection={"epoch": 1, VERSION: 1, **dict.fromkeys(COUNTER_FIELDS.values(), 1)},
            return_document=ReturnDocument.AFTER,
            **kwargs,
        )
        return doc

    def commit(
        self,
        req: UpdateRequest,
        request_id: str,
        epoch: int,
        task_id: str | None = None,
        *,
        lock: RedisLock | None = None,
        known: dict[str, int] | None = None,
    ) -> ApplyResult:
        """Insert the log and move the counter in one transaction, if still fenced in.

        With ``lock``, its ownership check is sent to Redis before the log insert and its
        answer read after it, before the commit: the round trips overlap (``LockLost``).
        ``known``: the counters this holder knows under ``epoch``; used for the one-write
        way when it applies, and kept up to date by every applied commit.
        """
        field = COUNTER_FIELDS[req.kind]
        expected = None if known is None else known.pop(field, None)
        version = None if known is None else known.pop(VERSION, None)
        try:
            if (
                expected is not None
                and version is not None
                and expected + req.quantity >= 0
                and self._has_bulk_write()
            ):
                result = self._commit_known(req, request_id, epoch, task_id, (expected, version), lock)
                if result is None:  # the counter or the epoch moved without us: the general way
                    result = self._commit(req, request_id, epoch, task_id, lock)
                else:
                    self.one_write_commits += 1
            else:
                result = self._commit(req, request_id, epoch, task_id, lock)
        except DuplicateKeyError:
            _restore(known, field, expected, version)  # the transaction aborted: nothing moved
            return self.duplicate_of(req, request_id)
        except NegativeCounter:
            # A correction applied before would now go below zero: it is a duplicate, not a refusal.
            logged = self._logged(request_id)
            if logged is None:
                raise
            _restore(known, field, expected, version)
            return self._duplicate(req, request_id, logged)
        if known is not None:
            known[field] = result.value  # the value our own write produced under our epoch
            if result.version is not None:
                known[VERSION] = result.version
        return result

    def _commit(
        self,
        req: UpdateRequest,
        request_id: str,
        epoch: int,
        task_id: str | None,
        lock: RedisLock | None,
    ) -> ApplyResult:
        """The general way: ``findAndModify`` for the value, then the log insert, then commit."""
        with self._transaction() as session:
            faults.at(faults.BEGUN)
            value, version = self._inc_counter(session, req, epoch)
            doc = self._log_doc(req, request_id, epoch, (value, version), task_id)
            with lock.check_sent(self.check_line) if lock is not None else nullcontext() as check:
                self.logs.insert_one(doc, session=session)
                if check is not None:
                    check.confirm()
            faults.at(faults.WRITTEN)
        return ApplyResult("applied", *_ident(req, request_id), value=value, epoch=epoch, version=version)

    def _commit_known(
        self,
        req: UpdateRequest,
        request_id: str,
        epoch: int,
        task_id: str | None,
        expected: tuple[int, int],
        lock: RedisLock | None,
    ) -> ApplyResult | None:
        """The one-write way: the log and a ``$inc`` matching ``expected`` (the counter's value
        and the work order's version) in one ``bulkWrite``.

        Returns None, with nothing written, when the counter or the version is not
        ``expected`` under ``epoch``.
        """
        field = COUNTER_FIELDS[req.kind]
        value, version = expected[0] + req.quantity, expected[1] + 1
        log_doc = self._log_doc(req, request_id, epoch, (value, version), task_id)
        writes: list[InsertOne[dict[str, Any]] | UpdateOne] = [
            InsertOne(log_doc, namespace=self.logs.full_name),
            UpdateOne(
                {"_id": req.work_order_id, "epoch": epoch, field: expected[0], VERSION: expected[1]},
                _counter_update(field, req.quantity),
                namespace=self.work_orders.full_name,
            ),
        ]
        with self._transaction() as session:
            faults.at(faults.BEGUN)
            # The lock is checked while the write is on its way.
            with lock.check_sent(self.check_line) if lock is not None else nullcontext() as check:
                try:
                    written = self.mongo.bulk_write(writes, session=session, ordered=True)
                except ClientBulkWriteException as exc:
                    inner = _unwrapped(exc, request_id)
                    raise inner from (None if inner is exc.error else exc)  # exc came from exc.error
                if check is not None:
                    check.confirm()
            if written.matched_count != 1:
                session.abort_transaction()
                return None
            faults.at(faults.WRITTEN)
        return ApplyResult("applied", *_ident(req, request_id), value=value, epoch=epoch, version=version)

    @contextmanager
    def fenced(self, work_order_id: str, read_concern: ReadConcern = TXN_READ_CONCERN) -> Iterator[Fenced]:
        """A write to one work order other than an update (the audit's repair), fenced like one.

        Takes the work order's lock and a new epoch (as ``take``), opens a transaction, and
        checks the lock before the commit; a write inside must match ``Fenced.epoch``.

        Raises:
            LockBusy, LockLost, FenceLost, UnknownWorkOrder: nothing was written.
        """
        if self.kept is not None:  # a worker consuming both queues would wait on itself
            self.kept.drop(work_order_id)
        lock, epoch, _ = self.take(work_order_id)
        try:
            with self._transaction(read_concern) as session:
                yield Fenced(session, epoch)
                lock.ensure_held()
        finally:
            lock.let_go()

    @contextmanager
    def _transaction(self, read_concern: ReadConcern = TXN_READ_CONCERN) -> Iterator[ClientSession]:
        """A session in a transaction (committed on leaving), pymongo's failures mapped."""
        with mongo_errors(), self.mongo.start_session() as session:
            if self.sessions is not None:
                self.sessions.note(session)
            with session.start_transaction(read_concern=read_concern, write_concern=TXN_WRITE_CONCERN):
                yield session

    def _has_bulk_write(self) -> bool:
        """Whether the server takes the client-level ``bulkWrite`` (MongoDB 8.0+)."""
        wire = self.mongo.topology_description.common_wire_version
        return wire is not None and wire >= BULK_WRITE_WIRE_VERSION

    def duplicate_of(self, req: UpdateRequest, request_id: str) -> ApplyResult:
        """The result for a request id that is already logged; refuse a different payload."""
        logged = self._logged(request_id)
        if logged is None:  # lost a race with a rollback; let the caller retry
            raise FenceLost(f"request {request_id!r} collided but is not logged")
        return self._duplicate(req, request_id, logged)

    def _logged(self, request_id: str) -> dict[str, Any] | None:
        with mongo_errors():
            logged: dict[str, Any] | None = self.logs.find_one({"request_id": request_id})
        return logged

    def _duplicate(self, req: UpdateRequest, request_id: str, logged: Mapping[str, Any]) -> ApplyResult:
        if _ident(req, request_id) != _ident_of(logged):
            raise RequestIdConflict(
                f"request id {request_id!r} was already used for {_ident_of(logged)[:3]}, "
                f"not {_ident(req, request_id)[:3]}"
            )
        return ApplyResult(
            "duplicate", *_ident(req, request_id), value=logged["value_after"], epoch=logged["epoch"]
        )

    def _inc_counter(self, session: ClientSession, req: UpdateRequest, epoch: int) -> tuple[int, int]:
        """The counter's value and the work order's version after the ``$inc``."""
        field = COUNTER_FIELDS[req.kind]
        match: dict[str, Any] = {"_id": req.work_order_id, "epoch": epoch}
        if req.quantity < 0:
            match[field] = {"$gte": -req.quantity}
        doc = self.work_orders.find_one_and_update(
            match,
            _counter_update(field, req.quantity),
            projection={field: 1, VERSION: 1},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if doc is None:
            raise self._why_unmatched(session, req, epoch)
        return int(doc[field]), int(doc[VERSION])

    def _why_unmatched(self, session: ClientSession, req: UpdateRequest, epoch: int) -> Exception:
        field = COUNTER_FIELDS[req.kind]
        doc = self.work_orders.find_one({"_id": req.work_order_id}, session=session)
        if doc is None:
            return UnknownWorkOrder(f"work order {req.work_order_id!r} does not exist")
        if doc.get("epoch") != epoch:
            return FenceLost(
                f"work order {req.work_order_id!r} fenced: epoch {doc.get('epoch')} != ours {epoch}"
            )
        current = int(doc.get(field) or 0)
        return NegativeCounter(
            f"{field} of {req.work_order_id!r} is {current}; adding {req.quantity} would go below zero"
        )

    @staticmethod
    def _log_doc(
        req: UpdateRequest, request_id: str, epoch: int, after: tuple[int, int], task_id: str | None
    ) -> dict[str, Any]:
        """The log of one update; ``after``: the counter's value and the work order's version
        right after it (the version orders a work order's logs: see ``audit.verify``)."""
        return {
            "request_id": request_id,
            "work_order_id": req.work_order_id,
            "kind": req.kind,
            "quantity": req.quantity,
            "value_after": after[0],
            VERSION: after[1],
            "epoch": epoch,
            "task_id": task_id,
            "created_at": utcnow(),
            **req.context,
        }


def _restore(known: dict[str, int] | None, field: str, expected: int | None, version: int | None) -> None:
    if known is not None and expected is not None:
        known[field] = expected
    if known is not None and version is not None:
        known[VERSION] = version


def _unwrapped(exc: ClientBulkWriteException, request_id: str) -> Exception:
    """The failure inside a failed ``bulkWrite``, as the single-document writes raise it."""
    if isinstance(exc.error, Exception):  # the command failed as a whole (network, conflict)
        return exc.error
    errors: list[dict[str, Any]] = (exc.details or {}).get("writeErrors") or []  # dicts, not WriteError
    codes = {e.get("code") for e in errors}
    if DUPLICATE_KEY in codes:
        return DuplicateKeyError(f"request id {request_id!r} is logged", DUPLICATE_KEY)
    if codes & RETRYABLE_CODES:
        return WriteConflict(f"bulkWrite: {errors[0].get('errmsg')}")
    return exc


def _counter_update(field: str, quantity: int) -> dict[str, Any]:
    return {"$inc": {field: quantity, "version": 1}, "$set": {"updated_at": utcnow()}}


def _ident(req: UpdateRequest, request_id: str) -> tuple[str, str, int, str]:
    return (req.work_order_id, req.kind, req.quantity, request_id)


def _ident_of(logged: Mapping[str, Any]) -> tuple[str, str, int, str]:
    return (logged["work_order_id"], logged["kind"], logged["quantity"], logged["request_id"])
