"""The apply step against real Redis and SecantusDB, driven step by step in-process."""

from __future__ import annotations

import time

import pytest
import redis

from conftest import make_work_orders
from mes_tasks.apply import faults
from mes_tasks.apply.ledger import Ledger
from mes_tasks.db import Mongo
from mes_tasks.errors import (
    FenceLost,
    LockLost,
    NegativeCounter,
    RequestIdConflict,
    UnknownWorkOrder,
    WriteConflict,
)
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.settings import Settings
from mes_tasks.validation import validate_update


@pytest.fixture()
def ledger(mongo: Mongo, redis_client: redis.Redis, settings: Settings) -> Ledger:
    make_work_orders(["WO-1"])
    return Ledger(mongo, redis_client, settings)


def counters(wo: str = "WO-1") -> tuple[int, int]:
    doc = WorkOrder.objects.get(id=wo)
    return doc.input_qty, doc.output_qty


def test_an_update_moves_the_counter_and_logs_it_with_its_context(ledger: Ledger) -> None:
    ctx = {"barcode": "BC1", "operator_id": "U1", "process_name": "包装", "source": "DEVICE"}
    result = ledger.apply(validate_update("WO-1", "output", 4, context=ctx), "r1", "task-1")
    assert (result.status, result.value) == ("applied", 4)
    log = QuantityLog.objects.get(request_id="r1")
    assert (log.work_order_id, log.kind, log.quantity, log.value_after) == ("WO-1", "output", 4, 4)
    assert (log.barcode, log.process_name, log.task_id, log.epoch) == ("BC1", "包装", "task-1", result.epoch)
    assert counters() == (0, 4)


def test_the_same_request_id_five_times_counts_once(ledger: Ledger) -> None:
    req = validate_update("WO-1", "input", 3)
    statuses = [ledger.apply(req, "scan:BC1:PACK").status for _ in range(5)]
    assert statuses == ["applied"] + ["duplicate"] * 4
    assert counters() == (3, 0)
    assert QuantityLog.objects(request_id="scan:BC1:PACK").count() == 1


def test_a_request_id_reused_for_another_update_is_refused(ledger: Ledger) -> None:
    ledger.apply(validate_update("WO-1", "input", 3), "r1")
    with pytest.raises(RequestIdConflict):
        ledger.apply(validate_update("WO-1", "input", 4), "r1")
    assert counters() == (3, 0)


def test_an_unknown_work_order_writes_nothing(ledger: Ledger) -> None:
    with pytest.raises(UnknownWorkOrder):
        ledger.apply(validate_update("WO-404", "input", 1), "r1")
    assert QuantityLog.objects.count() == 0
    assert WorkOrder.objects(id="WO-404").count() == 0


def test_a_counter_never_goes_below_zero(ledger: Ledger) -> None:
    ledger.apply(validate_update("WO-1", "output", 2), "r1")
    with pytest.raises(NegativeCounter):
        ledger.apply(validate_update("WO-1", "output", -3), "r2")
    ledger.apply(validate_update("WO-1", "output", -2), "r3")
    assert counters() == (0, 0)
    assert QuantityLog.objects.count() == 2


def test_a_redelivered_correction_is_a_duplicate_even_if_it_would_now_go_negative(ledger: Ledger) -> None:
    ledger.apply(validate_update("WO-1", "output", 5), "r1")
    ledger.apply(validate_update("WO-1", "output", -5), "fix")
    assert ledger.apply(validate_update("WO-1", "output", -5), "fix").status == "duplicate"
    assert counters() == (0, 0)


WAYS = ["general", "one-write"]


def known_counters(way: str) -> dict[str, int] | None:
    """What ``commit`` is told the counters and the version are: the one-write way needs them (see ledger)."""
    return {"input_qty": 0, "output_qty": 0, "version": 0} if way == "one-write" else None


@pytest.mark.parametrize("way", WAYS)
def test_a_crash_before_commit_leaves_nothing(ledger: Ledger, way: str) -> None:
    epoch = ledger.bump_epoch("WO-1")

    def crash() -> None:
        raise RuntimeError("power cut")

    with faults.injected(faults.WRITTEN, crash), pytest.raises(RuntimeError):
        ledger.commit(validate_update("WO-1", "input", 5), "r1", epoch, known=known_counters(way))
    assert counters() == (0, 0)
    assert QuantityLog.objects.count() == 0
    again = ledger.commit(validate_update("WO-1", "input", 5), "r1", epoch, known=known_counters(way))
    assert again.value == 5
    assert ledger.one_write_commits == (1 if way == "one-write" else 0)  # the way under test was taken


def test_a_paused_holder_is_fenced_out_after_another_holder_applied(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    paused = ledger.lock_for("WO-1")
    paused.acquire()
    paused_epoch = ledger.bump_epoch("WO-1")
    redis_client.delete(paused.key)  # its TTL ran out while it was paused

    ledger.apply(validate_update("WO-1", "output", 1), "other")  # the next holder applies

    # It resumes past its lock check and tries to commit: the fence rejects it.
    with pytest.raises(FenceLost):
        ledger.commit(validate_update("WO-1", "output", 10), "paused", paused_epoch)
    assert counters() == (0, 1)
    assert QuantityLog.objects(request_id="paused").count() == 0

    ledger.apply(validate_update("WO-1", "output", 10), "paused")  # its retry counts once
    assert counters() == (0, 11)


def test_a_holder_is_fenced_as_soon_as_the_next_one_acquires_even_before_it_writes(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    old_epoch = ledger.bump_epoch("WO-1")
    redis_client.flushdb()  # a Redis restart that lost every key, the lock included
    with ledger.lock_for("WO-1"):
        ledger.bump_epoch("WO-1")
        with pytest.raises(FenceLost):
            ledger.commit(validate_update("WO-1", "input", 1), "r1", old_epoch)
    assert counters() == (0, 0)


@pytest.mark.parametrize("way", WAYS)
def test_a_lock_lost_inside_the_transaction_is_caught_by_productions_own_check(
    ledger: Ledger, redis_client: redis.Redis, way: str
) -> None:
    """Stolen once the transaction has begun: the check sent with the write catches it."""
    with ledger.lock_for("WO-1") as held:
        epoch = ledger.bump_epoch("WO-1")
        steal = lambda: redis_client.set(held.key, "intruder")  # noqa: E731
        with faults.injected(faults.BEGUN, steal), pytest.raises(LockLost):
            req = validate_update("WO-1", "input", 1)
            ledger.commit(req, "r1", epoch, lock=held, known=known_counters(way))
    assert counters() == (0, 0)
    assert QuantityLog.objects.count() == 0


@pytest.mark.parametrize("way", WAYS)
def test_the_lock_is_checked_before_the_commit_point_and_the_fence_guards_after_it(
    ledger: Ledger, redis_client: redis.Redis, way: str
) -> None:
    """Production's order: the lock check has answered by ``WRITTEN``; the commit follows.

    A lock lost after its check cannot stop this commit, and need not: the next holder's
    epoch bump waits for it, so the counts stay exact (the next test's fence).
    """
    with ledger.lock_for("WO-1") as held:
        epoch = ledger.bump_epoch("WO-1")
        steal = lambda: redis_client.set(held.key, "intruder")  # noqa: E731
        with faults.injected(faults.WRITTEN, steal):
            req = validate_update("WO-1", "input", 2)
            result = ledger.commit(req, "r1", epoch, lock=held, known=known_counters(way))
    assert (result.status, counters()) == ("applied", (2, 0))
    assert ledger.one_write_commits == (1 if way == "one-write" else 0)


@pytest.mark.parametrize("tamper", ["delete", "overwrite"])
def test_the_check_sent_during_the_log_insert_aborts_a_commit_under_a_lost_lock(
    ledger: Ledger, redis_client: redis.Redis, tamper: str
) -> None:
    with ledger.lock_for("WO-1") as held:
        epoch = ledger.bump_epoch("WO-1")
        if tamper == "delete":
            redis_client.delete(held.key)
        else:
            redis_client.set(held.key, "intruder")
        with pytest.raises(LockLost):
            ledger.commit(validate_update("WO-1", "input", 1), "r1", epoch, lock=held)
    assert counters() == (0, 0)
    assert QuantityLog.objects.count() == 0


def test_a_duplicate_with_the_lock_check_in_flight_leaves_the_redis_connection_clean(ledger: Ledger) -> None:
    req = validate_update("WO-1", "input", 2)
    with ledger.lock_for("WO-1") as held:
        epoch = ledger.bump_epoch("WO-1")
        assert ledger.commit(req, "r1", epoch, lock=held).status == "applied"
        # The insert fails on the unique request id while the check's answer is unread.
        assert ledger.commit(req, "r1", epoch, lock=held).status == "duplicate"
        assert ledger.redis.echo("next") == "next"  # not the check's stale answer
        held.ensure_held()
    assert counters() == (2, 0)


def test_a_work_order_held_by_an_abandoned_transaction_is_a_retryable_conflict(
    ledger: Ledger, mongo: Mongo
) -> None:
    session = mongo.start_session()
    session.start_transaction()
    WorkOrder._get_collection().update_one({"_id": "WO-1"}, {"$inc": {"input_qty": 1}}, session=session)
    try:
        with pytest.raises(WriteConflict) as err:
            ledger.apply(validate_update("WO-1", "input", 1), "r1")
        assert err.value.transient
        # Its next messages fail at once, without waiting on MongoDB again, for a back-off.
        with pytest.raises(WriteConflict, match="blocked by another transaction"):
            ledger.apply(validate_update("WO-1", "input", 1), "r1")
    finally:
        session.abort_transaction()
        session.end_session()
    ledger._blocked["WO-1"] = (time.monotonic() - 0.1, 1.0)  # the back-off has run out
    assert ledger.apply(validate_update("WO-1", "input", 1), "r1").status == "applied"
    assert counters() == (1, 0)
    assert "WO-1" not in ledger._blocked


@pytest.mark.parametrize("way", WAYS)
def test_each_log_carries_the_work_orders_version_right_after_it(ledger: Ledger, way: str) -> None:
    """The version orders a work order's logs (the continuous verifier reads "the logs after
    a checkpoint" by it): each log's is the one its own commit produced, whichever way."""
    epoch = ledger.bump_epoch("WO-1")
    known = known_counters(way)
    steps = [("input", 5, "v1"), ("output", 2, "v2"), ("input", 1, "v3"), ("input", 5, "v1")]  # v1 again
    for kind, qty, rid in steps:
        ledger.commit(validate_update("WO-1", kind, qty), rid, epoch, known=known)
    logs = {log.request_id: log.version for log in QuantityLog.objects}
    assert logs == {"v1": 1, "v2": 2, "v3": 3}
    assert WorkOrder.objects.get(id="WO-1").version == 3
    assert ledger.one_write_commits == (3 if way == "one-write" else 0)
