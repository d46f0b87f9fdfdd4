"""A mixed fleet (workers on different MES_PARTITIONS, pinned beside automatic) never leaves a
queue with waiting updates unconsumed for long, and counts exactly. Default settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from test_partitions import expect_exact, holders, partitioned  # noqa: F401 - a fixture

from conftest import Worker, make_work_orders, wait_until
from mes_tasks.keys import lease_key
from mes_tasks.partitions import every_queue, queue_names
from mes_tasks.queues import in_use
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import Settings
from mes_tasks.worker.lease import Slots
from mes_tasks.worker.takeover import TakeOver

WOS = [f"M-{i:02d}" for i in range(16)]
WATCH_S = 12.0
GOAL_S = 5.0  # no queue with waiting updates goes this long without a holder
SEND_EVERY_S = 0.05  # about 20 updates a second


class Watch:
    """Updates sent while the holders of every queue with waiting messages are polled."""

    def __init__(self, client: redis.Redis, tag: str) -> None:
        self.client, self.tag = client, tag
        self.updates: list[dict[str, Any]] = []
        self.unheld_since: dict[str, float] = {}
        self.worst: dict[str, float] = {}

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.send()
            self.look()
            time.sleep(SEND_EVERY_S)

    def send(self) -> None:
        n = len(self.updates)
        update = {"work_order_id": WOS[n % len(WOS)], "kind": "input", "quantity": 1,
                  "request_id": f"{self.tag}-{n}"}  # fmt: skip
        assert submit_quantity_update(**update)["success"]
        self.updates.append(update)

    def look(self) -> None:
        now = time.monotonic()
        for queue in every_queue():
            if self.client.llen(queue) and self.client.get(lease_key("mes:", queue)) is None:
                since = self.unheld_since.setdefault(queue, now)
                self.worst[queue] = max(self.worst.get(queue, 0.0), now - since)
            else:
                self.unheld_since.pop(queue, None)

    def worst_gap_s(self) -> float:
        return max(self.worst.values(), default=0.0)


def owners(client: redis.Redis, n: int) -> dict[str, str | None]:
    return {q: None if o is None else o.split(":")[1] for q, o in holders(client, n).items()}


@pytest.mark.parametrize(("old", "new"), [(2, 4), (4, 2)], ids=["2-to-4", "4-to-2"])
def test_the_documented_change_of_n_under_load_leaves_no_queue_with_waiting_updates_unconsumed(
    redis_client: redis.Redis,
    start_worker: Callable[..., Worker],
    partitioned: Callable[[int], None],  # noqa: F811
    old: int,
    new: int,
) -> None:
    """docs/deployment.md, "Changing N on a live system", step by step with updates flowing."""
    partitioned(old)
    make_work_orders(WOS)
    first = start_worker(MES_PARTITIONS=str(old))
    wait_until(lambda: all(owners(redis_client, old).values()), 20, f"{first.name} to hold all {old}")
    watch = Watch(redis_client, f"{old}to{new}")
    watch.run(1.0)
    start_worker(MES_PARTITIONS=str(new))  # step 1: the workers one by one; a mixed fleet now
    watch.run(WATCH_S)
    held = owners(redis_client, max(old, new))
    assert all(held.values()) and len(set(held.values())) == 2, held  # shared, every queue held
    first.stop()
    start_worker(MES_PARTITIONS=str(new))  # ... the last one on the new N
    watch.run(WATCH_S / 2)
    partitioned(new)  # step 2: the producers
    watch.run(WATCH_S / 2)
    assert watch.worst_gap_s() < GOAL_S, f"unheld with updates waiting: {watch.worst}"
    expect_exact(watch.updates, timeout_s=60)
    wait_until(lambda: in_use(redis_client, new) == queue_names(new), 20, "step 3: the leftovers drained")


def test_a_pinned_worker_started_after_an_automatic_one_gets_its_partition(
    redis_client: redis.Redis,
    start_worker: Callable[..., Worker],
    partitioned: Callable[[int], None],  # noqa: F811
) -> None:
    partitioned(4)
    make_work_orders(WOS)
    auto = start_worker(MES_PARTITIONS="4")
    wait_until(lambda: all(owners(redis_client, 4).values()), 20, f"{auto.name} to hold all four")
    watch = Watch(redis_client, "pinned")
    pinned = start_worker(name="pinned", queue="workorder.3", MES_PARTITIONS="4")
    pid = str(pinned.pid)
    watch.run(6.0)
    held = owners(redis_client, 4)
    assert held["workorder.3"] == pid and pid not in (held[f"workorder.{i}"] for i in range(3)), held
    assert watch.worst_gap_s() < GOAL_S, f"unheld with updates waiting: {watch.worst}"
    expect_exact(watch.updates, timeout_s=60)


class _ConsumerWithoutBroker:
    """A Celery consumer whose broker connection is gone mid-take-over (only what a take-over reads)."""

    @property
    def connection(self) -> object:
        raise ConnectionError("the broker connection went away")


def test_a_take_over_that_fails_half_way_lets_the_lease_go_instead_of_holding_it_unconsumed(
    mongo: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    slot = Slots(redis_client, settings.key_prefix, settings.lease_ttl_s)["workorder.0"]
    take_over = TakeOver(redis_client, settings.key_prefix, mongo, partitions=2)
    take_over.try_take(_ConsumerWithoutBroker(), slot)
    assert not slot.active and redis_client.get(lease_key(settings.key_prefix, "workorder.0")) is None
    assert not slot.lease.held  # its watchdog no longer extends it


class _Consumer:
    """What a slot that lost its lease asks of Celery's consumer."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel_task_queue(self, queue: str) -> None:
        self.cancelled.append(queue)


def test_a_lease_found_late_is_let_go_so_its_watchdog_does_not_keep_it_for_a_worker_that_stopped_consuming(
    redis_client: redis.Redis, settings: Settings
) -> None:
    slot = Slots(redis_client, settings.key_prefix, settings.lease_ttl_s)["workorder.1"]
    assert slot.lease.try_acquire()
    slot.active = True
    slot.lease.extended_at -= 2 * settings.lease_ttl_s  # last confirmed a TTL ago: a late extension
    consumer = _Consumer()
    slot.drop_if_lost(consumer)
    assert consumer.cancelled == ["workorder.1"] and not slot.active
    assert redis_client.get(lease_key(settings.key_prefix, "workorder.1")) is None  # free for anyone
    assert not slot.lease.watchdog.watching(slot.lease)
