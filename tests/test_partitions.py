"""Partitioned workorder queues: one active consumer per partition, exact counts across them.

The producer here submits in-process, so each test sets ``MES_PARTITIONS`` for this
process (``partitioned``) as well as for the workers it starts.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from conftest import Worker, make_work_orders, wait_until
from devtools.load import plan
from mes_tasks.keys import lease_key
from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder
from mes_tasks.ops.metrics import registry_for
from mes_tasks.partitions import index_of, is_workorder_queue, partition_of, queue_for, queue_names
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import get_settings
from mes_tasks.tasks import relay_outbox
from mes_tasks.worker.sharing import fair_share

WOS = [f"P-{i:02d}" for i in range(16)]
FAST = {"MES_LEASE_TTL_S": "2"}


# -- the hash and the names (fast tier) ------------------------------------------------------


def test_the_partition_is_crc32_of_the_utf8_id_and_stable() -> None:
    # Pinned values: a main app in any language computes the same (zlib CRC-32, IEEE).
    assert [partition_of("WO-1", n) for n in (2, 4, 8)] == [1, 3, 7]
    assert [partition_of("WO-1001", n) for n in (2, 4, 8)] == [0, 2, 6]
    assert partition_of("包装-7", 4) == 3
    assert queue_for("WO-1", 1) == "workorder" and queue_for("WO-1", 4) == "workorder.3"
    assert queue_names(1) == ["workorder"] and queue_names(3) == ["workorder.0", "workorder.1", "workorder.2"]


def test_queue_names_are_recognised_and_numbered() -> None:
    assert is_workorder_queue("workorder") and is_workorder_queue("workorder.12")
    assert not any(
        map(is_workorder_queue, ["audit", "workorder.", "workorder.x", "workorder.64", "workorders"])
    )
    assert (index_of("workorder.5"), index_of("workorder")) == (5, None)


def test_a_fair_share_rounds_up_so_every_partition_has_a_holder() -> None:
    assert [fair_share(4, m) for m in (1, 2, 3, 4, 5)] == [4, 2, 2, 1, 1]
    assert fair_share(3, 0) == 3


# -- with workers ------------------------------------------------------------------------------


@pytest.fixture()
def partitioned(env_override: Callable[..., None]) -> Callable[[int], None]:
    """Set this process's MES_PARTITIONS (the producer's routing reads it)."""
    return lambda n: env_override(MES_PARTITIONS=str(n))


def send(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = [submit_quantity_update(**u) for u in updates]
    assert all(r["success"] for r in results), [r for r in results if not r["success"]][:3]
    return results


def expect_exact(updates: list[dict[str, Any]], timeout_s: float = 120) -> None:
    """Every distinct request counted once: counters equal the sum of their distinct updates."""
    distinct = {u["request_id"]: u for u in updates}

    relayed = [time.monotonic()]

    def all_logged() -> bool:
        if time.monotonic() - relayed[0] > 1:  # beat's job in a deployment, every second:
            relay_outbox()  # re-send what the broker lost
            relayed[0] = time.monotonic()
        return bool(QuantityLog.objects.count() >= len(distinct))

    try:
        wait_until(all_logged, timeout_s, f"{len(distinct)} logs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {where_they_are()}") from None
    time.sleep(0.5)  # anything counted twice would show now
    assert QuantityLog.objects.count() == len(distinct)
    assert FailedUpdate.objects.count() == 0
    want: Counter[tuple[str, str]] = Counter()
    for u in distinct.values():
        want[(u["work_order_id"], u["kind"])] += u["quantity"]
    for wo in WorkOrder.objects:
        assert (wo.input_qty, wo.output_qty) == (want[(wo.id, "input")], want[(wo.id, "output")]), wo.id


def where_they_are() -> str:
    """What the suite sees when updates are missing: logs, dead letters, queues, leases."""
    from mes_tasks.db import redis_client as client_of
    from mes_tasks.partitions import every_queue

    client = client_of(get_settings())
    queues = {q: client.llen(q) for q in every_queue() if client.llen(q)}
    leases = {k: client.get(k) for k in client.scan_iter("mes:lease:*")}
    failed = Counter(f.error_code for f in FailedUpdate.objects)
    return (
        f"logs {QuantityLog.objects.count()}, failed {dict(failed)}, waiting {queues}, "
        f"unacked {client.hlen('unacked')}, leases {leases}"
    )


def holders(client: redis.Redis, n: int) -> dict[str, str | None]:
    tokens = {q: client.get(lease_key("mes:", q)) for q in queue_names(n)}
    return {q: None if t is None else str(t).split("/", 1)[0] for q, t in tokens.items()}


def test_two_workers_share_two_partitions_and_count_exactly_under_duplicates(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], partitioned: Callable[[int], None]
) -> None:
    partitioned(2)
    make_work_orders(WOS)
    first, second = start_worker(MES_PARTITIONS="2", **FAST), start_worker(MES_PARTITIONS="2", **FAST)
    wait_until(lambda: len(set(holders(redis_client, 2).values()) - {None}) == 2, 20, "one partition each")
    updates = plan(400, WOS, "p2", seed=3, dup_share=0.1)
    send(updates)
    expect_exact(updates)
    for worker in (first, second):  # both applied: the updates were spread over the partitions
        assert worker.log().count("succeeded in") > 50 and "Traceback" not in worker.log()


@pytest.mark.parametrize("standby", [False, True], ids=["no-standby", "standby"])
def test_a_killed_partition_holder_is_replaced_within_seconds_and_nothing_is_lost(
    redis_client: redis.Redis,
    start_worker: Callable[..., Worker],
    partitioned: Callable[[int], None],
    standby: bool,
) -> None:
    """Four partitions over two workers; with ``standby`` a third that holds nothing (4 over 3:
    a share of 2) takes the dead one's over, else the other active worker does."""
    partitioned(4)
    make_work_orders(WOS)
    doomed = start_worker(MES_PARTITIONS="4", **FAST)
    wait_until(lambda: None not in holders(redis_client, 4).values(), 20, "every partition held")
    survivor = start_worker(MES_PARTITIONS="4", **FAST)

    def two_each() -> bool:  # the first worker has handed the second one its share, all of it
        held = list(holders(redis_client, 4).values())
        return None not in held and sorted(Counter(h.split(":")[1] for h in held if h).values()) == [2, 2]

    wait_until(two_each, 20, "the second worker's share")
    if standby:
        spare = start_worker(MES_PARTITIONS="4", **FAST)
        time.sleep(2)  # two shares of 2 are full: it stays standby
        assert "took the workorder." not in spare.log()
        survivor = spare
    updates = plan(300, WOS, "kill", seed=5, dup_share=0.1)
    sender = threading.Thread(target=lambda: send(updates))
    sender.start()
    time.sleep(0.5)
    doomed_owner = f"{socket.gethostname()}:{doomed.pid}:"
    doomed.kill()  # SIGKILL, with its partitions and their in-flight messages
    killed = time.monotonic()

    def all_survivors() -> bool:
        held = holders(redis_client, 4).values()
        return None not in held and not any(h.startswith(doomed_owner) for h in held if h)

    wait_until(all_survivors, 15, "its partitions taken over")
    took_over_s = time.monotonic() - killed
    sender.join()
    expect_exact(updates)
    print(f"\npartitions of a SIGKILLed holder taken over in {took_over_s:.1f}s")
    assert took_over_s < 5, took_over_s  # the lease TTL (2 s here) and a poll
    assert "restored" in survivor.log()


def test_a_joining_worker_gets_partitions_handed_over_and_a_leaving_one_gives_them_back(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], partitioned: Callable[[int], None]
) -> None:
    partitioned(4)
    make_work_orders(WOS)
    first = start_worker(MES_PARTITIONS="4", **FAST)
    wait_until(lambda: None not in holders(redis_client, 4).values(), 20, "every partition held by the first")
    updates = plan(400, WOS, "join", seed=7, dup_share=0.1)
    sender = threading.Thread(target=lambda: send(updates))
    sender.start()
    second = start_worker(MES_PARTITIONS="4", **FAST)  # joins under load
    wait_until(lambda: first.log().count("handed workorder.") >= 2, 30, "two partitions handed over")
    wait_until(lambda: len(set(holders(redis_client, 4).values())) == 2, 20, "two holders")
    sender.join()
    expect_exact(updates)
    second.stop()  # leaves: its partitions go back to the first
    wait_until(lambda: len(set(holders(redis_client, 4).values()) - {None}) == 1, 20, "one holder again")
    more = plan(100, WOS, "after", seed=8)
    send(more)
    expect_exact(updates + more)


def test_changing_the_number_of_partitions_under_load_keeps_counts_exact(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], partitioned: Callable[[int], None]
) -> None:
    """From 4 to 2: updates still in workorder.2 and .3 are leftovers the workers drain."""
    make_work_orders(WOS)
    partitioned(4)
    old = plan(200, WOS, "old", seed=11, dup_share=0.1)
    send(old)  # queued before any worker runs: they wait in workorder.0 to .3
    assert redis_client.llen("workorder.3") > 0
    start_worker(MES_PARTITIONS="2", **FAST)
    start_worker(MES_PARTITIONS="2", **FAST)
    partitioned(2)
    new = plan(200, WOS, "new", seed=12, dup_share=0.1)
    mixed = [dict(u, request_id=u["request_id"]) for u in new] + random.Random(1).sample(old, 20)
    send(mixed)  # new updates, and some old ones again: the same request ids, other queues
    expect_exact(old + mixed)
    # A retry stays in its own queue, so a retried leftover (LOCK_BUSY while the other
    # partition held its work order) can land in workorder.2 or .3 again after they were
    # drained and handed back; the next leftover scan (every 5 s) drains it.
    wait_until(lambda: redis_client.llen("workorder.2") == redis_client.llen("workorder.3") == 0, 30,
               "the leftover queues drained")  # fmt: skip


def cli(*args: str) -> Any:
    from celery.bin.celery import celery
    from click.testing import CliRunner

    return CliRunner().invoke(celery, ["-A", "mes_tasks", *args], catch_exceptions=False)


def test_the_operator_sees_and_pauses_each_partition_and_a_pinned_worker_holds_only_its_own(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], partitioned: Callable[[int], None]
) -> None:
    partitioned(2)
    make_work_orders(WOS)
    pinned = start_worker(queue="workorder.1", MES_PARTITIONS="2", **FAST)
    wait_until(lambda: holders(redis_client, 2)["workorder.1"] is not None, 20, "the pinned partition")
    assert holders(redis_client, 2)["workorder.0"] is None  # pinned: never another partition
    start_worker(MES_PARTITIONS="2", **FAST)
    wait_until(lambda: None not in holders(redis_client, 2).values(), 20, "both partitions held")
    assert f":{pinned.pid}:" in str(holders(redis_client, 2)["workorder.1"])

    scraped = generate_latest(registry_for(redis_client, "mes:", 2)).decode()
    assert "mes_workorder_active_consumer 1.0" in scraped
    assert 'mes_partition_active_consumer{queue="workorder.1"} 1.0' in scraped
    shown = cli("workorder", "show", "WO-1")
    assert shown.exit_code == 2  # not created here; the queue is shown for those that are
    make_work_orders(["WO-1"])
    assert "queue: workorder.1" in cli("workorder", "show", "WO-1").output  # crc32("WO-1") % 2 == 1
    doctor = cli("doctor")
    assert "OK   workorder consumer: each of 2 partitions has exactly one" in doctor.output, doctor.output
    paused = cli("queue", "pause", "--partition", "0", "--json")
    assert paused.exit_code == 0 and '"queue": "workorder.0"' in paused.output
    on_zero = [u for u in plan(200, WOS, "pz", seed=4) if queue_for(u["work_order_id"], 2) == "workorder.0"]
    on_one = [u for u in plan(200, WOS, "po", seed=5) if queue_for(u["work_order_id"], 2) == "workorder.1"]
    send(on_zero[:20] + on_one[:20])
    wait_until(lambda: QuantityLog.objects.count() == 20, 30, "partition 1's updates")
    status = cli("queue", "status", "--json")
    rows = {p["queue"]: p for p in __import__("json").loads(status.output)["partitions"]}
    assert rows["workorder.0"]["paused"] and rows["workorder.0"]["waiting"] == 20
    assert not rows["workorder.1"]["paused"] and rows["workorder.1"]["waiting"] == 0
    assert rows["workorder.0"]["oldest_age_s"] is not None and rows["workorder.1"]["holder"]
    assert cli("queue", "pause", "--partition", "2").exit_code == 2  # only 0 and 1 exist
    assert cli("queue", "resume", "--partition", "0").exit_code == 0
    expect_exact(on_zero[:20] + on_one[:20])
