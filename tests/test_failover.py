"""One active workorder consumer, a standby that takes over, and fast recovery of in-flight messages."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from conftest import Worker, make_work_orders, wait_until
from load import plan
from mes_tasks.keys import lease_key, takeovers_key
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.ops.status import consumers
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.tasks import relay_outbox

FAST = {"MES_LEASE_TTL_S": "2"}


def test_a_second_worker_on_workorder_waits_as_standby(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    from mes_tasks import app

    active = start_worker(**FAST)
    wait_until(lambda: redis_client.get(lease_key("mes:")) is not None, 20, "the lease")
    standby = start_worker(**FAST)
    time.sleep(2.5)  # longer than the lease TTL: the active worker keeps extending it
    assert consumers(app).get("workorder") == [active.name]
    assert "took the workorder lease" not in standby.log()


def test_the_standby_takes_over_when_the_active_worker_dies_under_load(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    wos = [f"WO-{i:03d}" for i in range(5)]
    make_work_orders(wos)
    active = start_worker(**FAST)
    wait_until(lambda: redis_client.get(lease_key("mes:")) is not None, 20, "the lease")
    standby = start_worker(**FAST)
    updates = [u for batch in plan(1, 300, len(wos)) for u in batch]
    for update in updates:
        assert submit_quantity_update(**update)["success"]
    wait_until(lambda: QuantityLog.objects.count() >= 50, 60, "the active worker to start")
    active.kill()
    killed_at = time.monotonic()
    wait_until(lambda: "took the workorder lease" in standby.log(), 30, "the standby to take over")
    took_over_s = time.monotonic() - killed_at
    # Beat's outbox relay re-sends an update killed between kombu's BRPOP and its unacked record.
    wait_until(lambda: relay_outbox() is not None and QuantityLog.objects.count() == 300, 120, "every update")
    print(f"\ntake-over after {took_over_s:.1f}s (lease TTL 2s)")
    expected: dict[tuple[str, str], int] = {}
    for u in updates:
        key = (u["work_order_id"], u["kind"])
        expected[key] = expected.get(key, 0) + u["quantity"]
    for wo in WorkOrder.objects:
        assert (wo.input_qty, wo.output_qty) == (
            expected.get((wo.id, "input"), 0),
            expected.get((wo.id, "output"), 0),
        )
    assert took_over_s < 12  # lease TTL + poll, far below the 12 s visibility timeout plus sweep


def test_a_restarted_worker_recovers_the_in_flight_message_at_once(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    doomed = start_worker(hold="written=30", **FAST)
    submit_quantity_update("WO-1", "input", 4, request_id="inflight-1")
    doomed.wait_for_log("holding the transaction open")
    doomed.kill()
    assert redis_client.hlen("unacked") == 1
    restarted = start_worker(MES_RETRY_MAX="1000", **FAST)
    restarted.wait_for_log("restored 1 in-flight message(s)", 20)
    assert redis_client.get(takeovers_key("mes:")) == "2"  # each worker's lease, for `metrics`
    assert redis_client.hlen("unacked") <= 1  # back in the queue, or being processed again
    wait_until(lambda: QuantityLog.objects(request_id="inflight-1").count() == 1, 120, "the recovered update")
    assert WorkOrder.objects.get(id="WO-1").input_qty == 4
