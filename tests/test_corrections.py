"""A correction that overtakes its count waits for it (MES_NEGATIVE_WAIT_S) instead of being dead-lettered."""

from __future__ import annotations

from collections.abc import Callable

import redis

from conftest import Worker, make_work_orders, wait_until
from devtools.devserver import Service
from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder
from mes_tasks.send.producer import Producer
from mes_tasks.settings import Settings
from mes_tasks.tasks import relay_outbox
from mes_tasks.worker.retries import NEGATIVE_QUICK_RETRIES, negative_wait_backoff_s


def test_a_correction_that_overtakes_its_spooled_count_nets_to_zero_with_no_operator(
    redis_client: redis.Redis, servers: dict[str, Service], start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    worker = start_worker()
    producer = Producer()
    servers["redis"].stop()
    try:
        assert producer.submit("WO-1", "output", 5, "count-1")["code"] == "SPOOLED"
    finally:
        servers["redis"].start()
    assert producer.submit("WO-1", "output", -5, "scrap-1")["code"] == "QUEUED"  # overtakes the count
    worker.wait_for_log("its count may be late")
    assert relay_outbox(grace_s=60)["published"] == 1  # the count arrives after its correction
    wait_until(lambda: QuantityLog.objects.count() == 2, 30, "the count and its correction")
    assert WorkOrder.objects.get(id="WO-1").output_qty == 0
    assert FailedUpdate.objects.count() == 0
    assert [log.request_id for log in QuantityLog.objects.order_by("created_at")] == ["count-1", "scrap-1"]


def test_a_correction_whose_count_never_comes_is_dead_lettered_after_the_wait(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"], output_qty=2)
    start_worker(MES_NEGATIVE_WAIT_S="1")
    assert Producer().submit("WO-1", "output", -5, "scrap-2")["code"] == "QUEUED"
    wait_until(lambda: FailedUpdate.objects(request_id="scrap-2").count() == 1, 30, "the dead letter")
    failed = FailedUpdate.objects.get(request_id="scrap-2")
    assert failed.error_code == "NEGATIVE_COUNTER" and failed.attempts > 1  # retried, then given up
    assert WorkOrder.objects.get(id="WO-1").output_qty == 2


def test_a_correction_waiting_for_its_count_looks_again_within_a_step_a_few_times_then_backs_off() -> None:
    """A count spooled in an outage arrives seconds after its correction: the correction must
    not sleep through it on a 2-4 s step (chaos: "spooled counts, corrections first")."""
    settings = Settings(retry_backoff_s=1.0, retry_backoff_max_s=60.0)
    for retries in range(NEGATIVE_QUICK_RETRIES):
        assert all(0.5 <= negative_wait_backoff_s(retries, settings) <= 1.0 for _ in range(50)), retries
    assert 3 <= NEGATIVE_QUICK_RETRIES <= 5  # quick looks cover the relay's few seconds, and no more
    later = [negative_wait_backoff_s(NEGATIVE_QUICK_RETRIES + 1, settings) for _ in range(50)]
    assert all(2.0 <= s <= 4.0 for s in later)  # then the steps grow as any retry's do
    assert negative_wait_backoff_s(50, settings) <= 60.0
