"""Locks a worker keeps between updates: fewer round trips, same guarantees.

In-process against real Redis and SecantusDB, then through a real worker.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from conftest import Worker, make_work_orders, wait_until
from mes_tasks import db
from mes_tasks.apply.keptlocks import KeptLocks
from mes_tasks.apply.ledger import Ledger
from mes_tasks.apply.locks import RedisLock
from mes_tasks.apply.owners import owner_id
from mes_tasks.audit import checks as audit
from mes_tasks.db import Mongo
from mes_tasks.errors import LockBusy, LockLost, NegativeCounter, RequestIdConflict, WriteConflict
from mes_tasks.keys import lock_key, wanted_key
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.settings import Settings
from mes_tasks.tasks import update_quantity
from mes_tasks.validation import validate_update
from mes_tasks.worker.state import RELEASE_CHECK_S
from mes_tasks.worker.takeover import clear_predecessor_locks

PREFIX = "mes:"
KEY = lock_key(PREFIX, "WO-1")


@pytest.fixture()
def keeper(mongo: Mongo, redis_client: redis.Redis, settings: Settings) -> Iterator[Ledger]:
    """A ledger that keeps its locks for a minute (far longer than any test here)."""
    make_work_orders(["WO-1", "WO-2"])
    ledger = Ledger(mongo, redis_client, settings, KeptLocks(60.0))
    yield ledger
    assert ledger.kept is not None
    ledger.kept.release_all()


def apply(ledger: Ledger, request_id: str, wo: str = "WO-1", qty: int = 1) -> int:
    return ledger.apply(validate_update(wo, "input", qty), request_id).epoch


def epoch(wo: str = "WO-1") -> int:
    return int(WorkOrder.objects.get(id=wo).epoch)


def test_consecutive_updates_keep_the_lock_and_take_the_fence_once(
    keeper: Ledger, redis_client: redis.Redis
) -> None:
    epochs = [apply(keeper, f"r{i}") for i in range(5)]
    assert epochs == [1] * 5 and epoch() == 1
    token = redis_client.get(KEY)
    assert token is not None and str(token).startswith(f"{owner_id()}/")  # kept, and says whose
    assert keeper.kept is not None and keeper.kept.release_all() == 1
    assert redis_client.get(KEY) is None
    assert WorkOrder.objects.get(id="WO-1").input_qty == 5


def test_with_linger_zero_every_update_takes_and_releases_the_lock(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    make_work_orders(["WO-1"])
    ledger = Ledger(mongo, redis_client, settings, KeptLocks(0.0))
    assert [apply(ledger, f"r{i}") for i in range(3)] == [1, 2, 3]
    assert redis_client.get(KEY) is None


def test_a_waiter_makes_the_keeper_let_go_after_its_next_update(
    keeper: Ledger, redis_client: redis.Redis
) -> None:
    apply(keeper, "r1")
    waiter = RedisLock(redis_client, KEY, 3.0, wait_s=5.0, wanted_key=wanted_key(PREFIX, "WO-1"))
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_acquire(waiter)))
    thread.start()
    wait_until(lambda: redis_client.exists(wanted_key(PREFIX, "WO-1")) == 1, 5, "the waiter's request")
    apply(keeper, "r2")  # sees the request in its check before commit, then lets go
    thread.join()
    assert outcome == ["acquired"]
    assert redis_client.exists(wanted_key(PREFIX, "WO-1")) == 0  # the waiter cleans up
    with pytest.raises(LockBusy):
        apply(keeper, "r3")  # not kept: it has to wait like anyone else
    waiter.release()
    assert apply(keeper, "r3") == 2  # a fresh lock takes the fence again
    assert WorkOrder.objects.get(id="WO-1").input_qty == 3


def _acquire(lock: RedisLock) -> str:
    try:
        lock.acquire()
    except LockBusy:
        return "busy"
    return "acquired"


def test_an_idle_kept_lock_is_released_after_the_linger(keeper: Ledger, redis_client: redis.Redis) -> None:
    kept = keeper.kept
    assert kept is not None
    apply(keeper, "r1", "WO-1")
    apply(keeper, "r2", "WO-2")
    assert kept.release_idle() == 0 and len(kept) == 2
    kept._kept["WO-1"].used_at -= 61.0  # as if a minute went by without an update for WO-1
    assert kept.release_idle() == 1
    assert redis_client.get(KEY) is None and redis_client.get(lock_key(PREFIX, "WO-2")) is not None
    assert apply(keeper, "r3", "WO-1") == 2  # taken again, fenced again


def test_a_kept_lock_someone_took_is_not_written_under(
    keeper: Ledger, redis_client: redis.Redis, mongo: Mongo, settings: Settings
) -> None:
    apply(keeper, "r1")
    redis_client.delete(KEY)  # an operator's `locks release --force`, or an expiry
    other = Ledger(mongo, redis_client, settings)
    assert apply(other, "o1") == 2
    # The fence (and the lock check before commit) refuse the stale kept lock; the ledger
    # takes a fresh lock and epoch at once instead of failing the task into a backoff.
    assert apply(keeper, "r2") == 3
    assert [log.epoch for log in QuantityLog.objects.order_by("created_at")] == [1, 2, 3]
    assert WorkOrder.objects.get(id="WO-1").input_qty == 3


def test_a_kept_lock_that_keeps_failing_fails_the_update_like_a_fresh_one(
    keeper: Ledger, redis_client: redis.Redis
) -> None:
    apply(keeper, "r1")
    redis_client.set(KEY, "intruder")  # held by someone else now: the fresh attempt waits, then gives up
    with pytest.raises(LockBusy):
        apply(keeper, "r2")
    assert QuantityLog.objects(request_id="r2").count() == 0


def test_a_repair_in_the_keeping_process_does_not_wait_on_its_own_lock(
    keeper: Ledger, redis_client: redis.Redis
) -> None:
    apply(keeper, "r1")
    WorkOrder.objects(id="WO-1").update_one(set__input_qty=99)
    fixed = audit.repair(keeper, "WO-1")
    assert fixed is not None and fixed.after["input_qty"] == 1
    assert redis_client.get(KEY) is None


def value_afters(wo: str = "WO-1", kind: str = "input") -> list[int]:
    return [log.value_after for log in QuantityLog.objects(work_order_id=wo, kind=kind).order_by("id")]


def test_a_kept_lock_commits_in_one_write_with_the_exact_value_after(keeper: Ledger) -> None:
    quantities = [2, 5, -3, 1, -5, 4]
    results = [keeper.apply(validate_update("WO-1", "input", q), f"r{i}") for i, q in enumerate(quantities)]
    running = [sum(quantities[: i + 1]) for i in range(len(quantities))]
    assert [r.value for r in results] == running == value_afters()
    assert WorkOrder.objects.get(id="WO-1").input_qty == 4
    assert keeper.one_write_commits == len(quantities)  # the epoch bump told the first one the counter


def test_a_counter_moved_without_the_holder_is_matched_not_overwritten(keeper: Ledger) -> None:
    apply(keeper, "r1", qty=2)
    WorkOrder._get_collection().update_one({"_id": "WO-1"}, {"$inc": {"input_qty": 100}})  # by hand
    assert keeper.apply(validate_update("WO-1", "input", 3), "r2").value == 105
    assert value_afters() == [2, 105] and WorkOrder.objects.get(id="WO-1").input_qty == 105
    assert keeper.one_write_commits == 1  # r2 found the counter moved and took the general way ...
    assert keeper.apply(validate_update("WO-1", "input", 1), "r3").value == 106
    assert keeper.one_write_commits == 2  # ... which told r3 the counter again


def test_a_duplicate_in_one_write_counts_once_and_a_reused_id_is_refused(keeper: Ledger) -> None:
    apply(keeper, "r1", qty=2)
    apply(keeper, "r2", qty=3)
    again = keeper.apply(validate_update("WO-1", "input", 2), "r1")
    assert (again.status, again.value) == ("duplicate", 2)
    assert keeper.apply(validate_update("WO-1", "input", 1), "r3").value == 6
    assert keeper.one_write_commits == 3  # the duplicate moved nothing, so the counter stayed known
    with pytest.raises(RequestIdConflict):
        keeper.apply(validate_update("WO-1", "input", 7), "r2")
    assert keeper.apply(validate_update("WO-1", "input", 1), "r4").value == 7
    assert value_afters() == [2, 5, 6, 7] and WorkOrder.objects.get(id="WO-1").input_qty == 7


def test_a_read_concern_in_the_uri_does_not_reach_the_transaction(
    redis_client: redis.Redis, settings: Settings
) -> None:
    uri = settings.mongodb_uri + ("&" if "?" in settings.mongodb_uri else "?") + "readConcernLevel=majority"
    mongo = db.connect(dataclasses.replace(settings, mongodb_uri=uri))
    make_work_orders(["WO-1"])
    ledger = Ledger(mongo, redis_client, settings, KeptLocks(60.0))
    try:
        assert [apply(ledger, f"r{i}") for i in range(3)] == [1, 1, 1]
        assert ledger.one_write_commits == 3 and WorkOrder.objects.get(id="WO-1").input_qty == 3
    finally:
        assert ledger.kept is not None
        ledger.kept.release_all()
        db.connect(settings)


def test_a_correction_below_the_known_counter_is_refused_and_nothing_moves(keeper: Ledger) -> None:
    apply(keeper, "r1", qty=2)
    with pytest.raises(NegativeCounter):
        keeper.apply(validate_update("WO-1", "input", -3), "r2")
    assert keeper.apply(validate_update("WO-1", "input", -2), "r3").value == 0
    assert value_afters() == [2, 0] and QuantityLog.objects(request_id="r2").count() == 0


def test_a_work_order_busy_in_another_transaction_is_a_retryable_conflict(
    keeper: Ledger, mongo: Mongo
) -> None:
    apply(keeper, "r1")
    known_before = keeper.one_write_commits
    with mongo.start_session() as session, session.start_transaction():
        WorkOrder._get_collection().update_one({"_id": "WO-1"}, {"$set": {"note": "x"}}, session=session)
        with pytest.raises(WriteConflict):
            apply(keeper, "r2")
    assert keeper.one_write_commits == known_before
    assert apply(keeper, "r3") >= 1
    assert (
        QuantityLog.objects(request_id="r2").count() == 0 and WorkOrder.objects.get(id="WO-1").input_qty == 2
    )


def test_without_bulk_write_every_commit_takes_the_general_way(
    keeper: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keeper, "_has_bulk_write", lambda: False)  # as on MongoDB 7
    assert [keeper.apply(validate_update("WO-1", "input", q), f"r{q}").value for q in (1, 2, 3)] == [1, 3, 6]
    assert keeper.one_write_commits == 0 and value_afters() == [1, 3, 6]


def test_the_lock_check_line_reconnects_after_redis_dropped_it(
    keeper: Ledger, redis_client: redis.Redis
) -> None:
    apply(keeper, "r1")
    line = keeper.check_line.conn
    assert line is not None and line not in keeper.redis.connection_pool._available_connections  # type: ignore[attr-defined]
    line.send_command("CLIENT", "ID")  # type: ignore[no-untyped-call]
    redis_client.client_kill_filter(_id=line.read_response())  # only the line: other tests' clients live on
    outcomes = []
    for _ in range(3):  # as the task would retry a transient failure
        try:
            outcomes.append(keeper.apply(validate_update("WO-1", "input", 1), "r2").status)
            break
        except LockLost:
            outcomes.append("lock lost")
    assert outcomes[-1] == "applied" and len(outcomes) <= 2 and keeper.check_line.conn is line
    assert WorkOrder.objects.get(id="WO-1").input_qty == 2 and QuantityLog.objects.count() == 2


def test_taking_over_the_lease_clears_only_the_predecessors_locks(redis_client: redis.Redis) -> None:
    redis_client.set(f"{PREFIX}lease:owner", "old-host:41:abcdef")
    redis_client.set(lock_key(PREFIX, "WO-1"), "old-host:41:abcdef/0a1b")
    redis_client.set(lock_key(PREFIX, "WO-2"), "old-host:41:abcdef0/0a1b")  # not the same owner
    redis_client.set(lock_key(PREFIX, "WO-3"), f"{owner_id()}/0a1b")
    assert clear_predecessor_locks(redis_client, PREFIX) == 1
    assert redis_client.get(lock_key(PREFIX, "WO-1")) is None
    assert redis_client.get(lock_key(PREFIX, "WO-2")) is not None
    assert redis_client.get(lock_key(PREFIX, "WO-3")) is not None
    assert redis_client.get(f"{PREFIX}lease:owner") == owner_id()
    assert clear_predecessor_locks(redis_client, PREFIX) == 0  # we are the previous owner now


def _worker_after_one_update(
    start_worker: Callable[..., Worker], redis_client: redis.Redis, linger_s: str
) -> tuple[Worker, Callable[[], bool]]:
    """A worker with this linger that applied one update; and whether WO-1's lock is free."""
    make_work_orders(["WO-1"])
    worker = start_worker(MES_LOCK_LINGER_S=linger_s)
    sent = update_quantity.delay("WO-1", "input", 1, request_id="w1")
    assert sent.get(timeout=30)["status"] == "applied"
    return worker, lambda: redis_client.get(KEY) is None


def test_a_worker_lets_go_of_an_idle_lock_after_the_linger(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    _, released = _worker_after_one_update(start_worker, redis_client, "1")
    # The watchdog would keep the lock forever (TTL 3 s, extended every second): only the
    # worker's idle check lets it go.
    wait_until(released, 10, "the idle lock to be released")


def test_a_worker_that_stops_lets_go_of_its_kept_locks(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    worker, released = _worker_after_one_update(start_worker, redis_client, "600")
    assert not released()  # kept
    worker.stop()
    assert released(), "a stopped worker left its lock for the TTL to expire"
    assert "released 1 kept work-order lock(s)" in worker.log()


def test_two_keepers_each_waiting_for_a_lock_the_other_keeps_let_theirs_go_instead_of_timing_out(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    """A change of N puts one work order's updates in two queues, applied by two workers."""
    make_work_orders(["WO-1", "WO-2"])
    waiting = dataclasses.replace(settings, lock_wait_s=5.0, visibility_timeout_s=600.0)
    first, second = (Ledger(mongo, redis_client, waiting, KeptLocks(60.0)) for _ in range(2))
    apply(first, "a1", "WO-1")
    apply(second, "b1", "WO-2")  # each keeps the lock the other is about to want
    errors: list[Exception] = []
    done: list[str] = []

    def cross(ledger: Ledger, request_id: str, wo: str) -> None:
        try:
            apply(ledger, request_id, wo)
        except Exception as exc:
            errors.append(exc)
        done.append(request_id)
        deadline = time.monotonic() + 30
        while len(done) < 2 and time.monotonic() < deadline:  # a worker between tasks:
            assert ledger.kept is not None  # its ReleaseKeptLocks step lets a wanted lock go
            ledger.kept.release_idle()
            time.sleep(RELEASE_CHECK_S)

    threads = [threading.Thread(target=cross, args=(first, "a2", "WO-2")),
               threading.Thread(target=cross, args=(second, "b2", "WO-1"))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert [WorkOrder.objects.get(id=wo).input_qty for wo in ("WO-1", "WO-2")] == [2, 2]
    for ledger in (first, second):
        assert ledger.kept is not None
        ledger.kept.release_all()
