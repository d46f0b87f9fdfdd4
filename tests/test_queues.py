"""Leftover queues of another MES_PARTITIONS are seen, shown and purgeable; resume ends what it covers."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from conftest import make_work_orders
from mes_tasks.models import OutboxMessage
from mes_tasks.partitions import partition_of, queue_of
from mes_tasks.queues import in_use, leftovers
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.tasks import relay_outbox

WORK_ORDERS = [f"WO-{i}" for i in range(16)]


def cli(*args: str) -> Result:
    return CliRunner().invoke(celery, ["-A", "mes_tasks", *args])


def send_as_four_partitions(
    env_override: Callable[..., None], work_orders: list[str], tag: str
) -> dict[str, int]:
    """One update per work order, routed as a producer on MES_PARTITIONS=4 does; per queue."""
    env_override(MES_PARTITIONS="4")
    make_work_orders(work_orders)
    per_queue: dict[str, int] = {}
    for wo in work_orders:
        assert submit_quantity_update(wo, "input", 1, request_id=f"{tag}-{wo}")["code"] == "QUEUED"
        queue = queue_of(partition_of(wo, 4))
        per_queue[queue] = per_queue.get(queue, 0) + 1
    return per_queue


def send_on_four_partitions(env_override: Callable[..., None]) -> dict[str, int]:
    """``send_as_four_partitions``, then this process on MES_PARTITIONS=2."""
    per_queue = send_as_four_partitions(env_override, WORK_ORDERS, "left")
    env_override(MES_PARTITIONS="2")
    return per_queue


def test_a_queue_of_another_n_holding_updates_is_in_use_and_an_empty_one_is_not(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    per_queue = send_on_four_partitions(env_override)
    held = sorted(q for q in ("workorder.2", "workorder.3") if per_queue.get(q))
    assert held and leftovers(services, 2) == held
    assert in_use(services, 2) == ["workorder.0", "workorder.1", *held]
    services.delete(*held)
    assert leftovers(services, 2) == []


def test_queue_status_shows_a_leftover_and_purge_partition_takes_it_with_its_outbox_records(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    per_queue = send_on_four_partitions(env_override)
    status = json.loads(cli("queue", "status", "--json").stdout)
    assert status["queues"]["workorder.3"]["waiting"] == per_queue["workorder.3"]
    assert [p["queue"] for p in status["partitions"]][2:] == ["workorder.2", "workorder.3"]
    assert "workorder.3: " in cli("queue", "status").stdout
    purged = cli("queue", "purge", "--partition", "3", "--yes", "--json")
    assert purged.exit_code == 0, purged.output
    assert json.loads(purged.stdout)["purged"] == per_queue["workorder.3"]
    assert services.llen("workorder.3") == 0
    assert OutboxMessage.objects.count() == len(WORK_ORDERS) - per_queue["workorder.3"]
    refused = cli("queue", "purge", "--partition", "3", "--yes")
    assert refused.exit_code == 2 and "partitions in use: 0, 1, 2" in refused.output


def test_purge_without_partition_takes_the_leftovers_too(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    send_on_four_partitions(env_override)
    purged = cli("queue", "purge", "--yes", "--json")
    assert json.loads(purged.stdout)["purged"] == len(WORK_ORDERS)
    assert in_use(services, 2) == ["workorder.0", "workorder.1"] and OutboxMessage.objects.count() == 0


def test_resume_without_partition_ends_a_partitions_own_pause_and_names_it(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    env_override(MES_PARTITIONS="2")
    assert cli("queue", "pause", "--partition", "1").exit_code == 0
    status = json.loads(cli("queue", "status", "--json").stdout)
    assert list(status["pauses"]) == ["workorder.1"]
    assert [p["paused"] for p in status["partitions"]] == [False, True]
    assert "PAUSED workorder.1 since" in cli("queue", "status").stdout
    resumed = cli("queue", "resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["ended"] == ["workorder.1"]
    assert json.loads(cli("queue", "status", "--json").stdout)["pauses"] == {}
    assert "NOT_PAUSED" in cli("queue", "resume").output


def test_resume_of_one_partition_under_a_pause_of_every_queue_says_so_and_keeps_that_pause(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    env_override(MES_PARTITIONS="2")
    assert cli("queue", "pause").exit_code == 0
    refused = cli("queue", "resume", "--partition", "0")
    assert refused.exit_code != 0 and "PAUSED_AS_A_WHOLE" in refused.output
    assert "queue resume` without --partition" in refused.output
    assert list(json.loads(cli("queue", "status", "--json").stdout)["pauses"]) == ["workorder"]
    assert cli("queue", "pause", "--partition", "1").exit_code == 0
    ended = json.loads(cli("queue", "resume", "--json").stdout)["ended"]
    assert ended == ["workorder", "workorder.1"]


def test_the_relay_on_another_n_never_resends_what_a_leftover_queue_holds(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    per_queue = send_on_four_partitions(env_override)
    result = relay_outbox(grace_s=0)
    assert result["republished"] == 0
    assert sum(services.llen(q) for q in per_queue) == len(WORK_ORDERS)
