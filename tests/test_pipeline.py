"""End to end: producer processes, the Redis broker and a real `celery worker` subprocess."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from conftest import Worker, make_work_orders, wait_until
from load import plan, send
from mes_tasks.keys import lock_key
from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.tasks import update_quantity

WORK_ORDERS = [f"WO-{i:03d}" for i in range(20)]


def logs_count(n: int) -> Callable[[], bool]:
    return lambda: QuantityLog.objects.count() >= n


def test_eight_producers_2000_updates_every_counter_equals_its_logs(
    start_worker: Callable[..., Worker],
) -> None:
    make_work_orders(WORK_ORDERS)
    start_worker()
    batches = plan(producers=8, updates=2000, work_orders=len(WORK_ORDERS))
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = [r for batch in pool.map(send, batches) for r in batch]
    assert all(r["success"] and r["code"] == "QUEUED" for r in results), results[:3]
    wait_until(logs_count(2000), 300, "2000 logs")
    elapsed = time.monotonic() - started
    print(f"\nend-to-end: 2000 updates in {elapsed:.1f}s = {2000 / elapsed:.0f} updates/s")

    expected: Counter[tuple[str, str]] = Counter()
    for update in (u for batch in batches for u in batch):
        expected[update["work_order_id"], update["kind"]] += update["quantity"]
    for wo in WorkOrder.objects:
        assert (wo.input_qty, wo.output_qty) == (expected[wo.id, "input"], expected[wo.id, "output"]), wo.id
    per_request = Counter(log.request_id for log in QuantityLog.objects.only("request_id"))
    assert len(per_request) == 2000 and set(per_request.values()) == {1}
    assert FailedUpdate.objects.count() == 0


def test_the_same_request_id_sent_five_times_counts_once(start_worker: Callable[..., Worker]) -> None:
    make_work_orders(["WO-1"])
    start_worker()
    sent = [update_quantity.delay("WO-1", "output", 2, request_id="scan:BC9:PACK") for _ in range(5)]
    statuses = sorted(r.get(timeout=30)["status"] for r in sent)
    assert statuses == ["applied"] + ["duplicate"] * 4
    assert WorkOrder.objects.get(id="WO-1").output_qty == 2
    assert QuantityLog.objects(request_id="scan:BC9:PACK").count() == 1


def test_a_worker_killed_inside_its_transaction_applies_the_update_once_after_restart(
    start_worker: Callable[..., Worker],
) -> None:
    make_work_orders(["WO-1"])
    doomed = start_worker(hold="written=60")
    sent = update_quantity.delay("WO-1", "input", 7, request_id="crash-1")
    doomed.wait_for_log("holding the transaction open")
    doomed.kill()
    assert QuantityLog.objects.count() == 0

    # The dead worker's transaction still holds the work order until the server reaps it
    # (transactionLifetimeLimitSeconds, 60 s): the new worker must retry through that.
    start_worker(MES_RETRY_MAX="1000")
    wait_until(logs_count(1), 150, "the redelivered update")
    assert sent.get(timeout=30)["status"] in ("applied", "duplicate")
    time.sleep(1)  # a second, wrong application would land now
    assert WorkOrder.objects.get(id="WO-1").input_qty == 7
    assert QuantityLog.objects(request_id="crash-1").count() == 1


def _lock_tamper_test(start_worker: Callable[..., Worker], redis_client: redis.Redis, tamper: str) -> Worker:
    make_work_orders(["WO-1"])
    worker = start_worker(hold="begun=0.5")  # before the lock check
    sent = update_quantity.delay("WO-1", "output", 5, request_id="tamper-1")
    worker.wait_for_log("holding the transaction open")
    key = lock_key("mes:", "WO-1")
    if tamper == "delete":
        redis_client.delete(key)
    else:
        redis_client.set(key, "intruder", px=200)
    result = sent.get(timeout=60)
    assert result["status"] == "applied"
    assert "LOCK_LOST" in worker.log()  # the first attempt saw the loss and retried
    assert WorkOrder.objects.get(id="WO-1").output_qty == 5
    assert QuantityLog.objects(request_id="tamper-1").count() == 1
    return worker


def test_a_lock_deleted_mid_task_stops_the_commit_and_the_retry_counts_once(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    _lock_tamper_test(start_worker, redis_client, "delete")


def test_a_lock_overwritten_mid_task_stops_the_commit_and_the_retry_counts_once(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    _lock_tamper_test(start_worker, redis_client, "overwrite")


def _final_failure(job_id: str) -> FailedUpdate:
    wait_until(lambda: FailedUpdate.objects(task_id=job_id).count() == 1, 30, f"dead letter of {job_id}")
    return FailedUpdate.objects.get(task_id=job_id)


def test_unknown_work_orders_and_negative_counters_past_their_wait_are_dead_lettered_without_retries(
    start_worker: Callable[..., Worker],
) -> None:
    make_work_orders(["WO-1"], output_qty=1)
    worker = start_worker(MES_NEGATIVE_WAIT_S="0")  # see test_corrections for the wait itself
    unknown = submit_quantity_update("WO-404", "output", 1, request_id="u1")
    negative = submit_quantity_update("WO-1", "output", -2, request_id="n1")
    for job, code in ((unknown, "UNKNOWN_WORK_ORDER"), (negative, "NEGATIVE_COUNTER")):
        failed = _final_failure(job["job_id"])
        assert (failed.error_code, failed.attempts, failed.status) == (code, 1, "open")
        assert failed.request_id == job["request_id"]
    assert "retry" not in worker.log().lower()
    assert QuantityLog.objects.count() == 0
    assert WorkOrder.objects.get(id="WO-1").output_qty == 1
    # A routine refusal is one WARNING line with its code, not an ERROR with a traceback.
    wait_until(lambda: "dead-lettered [NEGATIVE_COUNTER]" in worker.log(), 10, "the refusal's log line")
    lines = worker.log().splitlines()
    for rid, code in (("u1", "UNKNOWN_WORK_ORDER"), ("n1", "NEGATIVE_COUNTER")):
        line = next(line for line in lines if f"update {rid} dead-lettered [{code}]" in line)
        assert "WARNING" in line, line
    assert "Traceback" not in worker.log() and "raised unexpected" not in worker.log()


BAD_TASK_CALLS: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
    (("", "output", 1), {}, "MISSING_WORK_ORDER_ID"),
    (({"$gt": ""}, "output", 1), {}, "INVALID_WORK_ORDER_ID"),
    (("WO-1", "scrap", 1), {}, "INVALID_KIND"),
    (("WO-1", "output", 1.5), {}, "INVALID_QUANTITY"),
    (("WO-1", "output", 1), {"context": {"$where": "sleep(1)"}}, "INVALID_CONTEXT"),
]


def test_bad_input_sent_straight_to_the_task_is_refused_inside_it_and_writes_nothing(
    start_worker: Callable[..., Worker],
) -> None:
    make_work_orders(["WO-1"])
    start_worker()
    jobs = [(update_quantity.apply_async(args, kwargs).id, code) for args, kwargs, code in BAD_TASK_CALLS]
    for job_id, code in jobs:
        failed = _final_failure(job_id)
        assert (failed.error_code, failed.attempts) == (code, 1)
    assert QuantityLog.objects.count() == 0
    assert WorkOrder.objects.get(id="WO-1").output_qty == 0


def test_a_lock_that_stays_busy_exhausts_the_retries_into_a_dead_letter(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    make_work_orders(["WO-1"])
    redis_client.set(lock_key("mes:", "WO-1"), "stuck-holder", ex=120)
    worker = start_worker(MES_LOCK_WAIT_S="0.1", MES_RETRY_MAX="3")
    sent = submit_quantity_update("WO-1", "input", 1, request_id="busy-1")
    failed = _final_failure(sent["job_id"])
    assert (failed.error_code, failed.attempts) == ("LOCK_BUSY", 4)
    assert worker.log().count("LOCK_BUSY:") == 3
    assert QuantityLog.objects.count() == 0
