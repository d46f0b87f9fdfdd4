"""Operator subcommands through celery's own CLI, against the real services."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from conftest import Worker, make_work_orders, spawn, wait_until
from devtools.devserver import worker_argv
from mes_tasks.apply.deadletter import Failure, record_failure
from mes_tasks.apply.locks import RedisLock
from mes_tasks.errors import UnknownWorkOrder
from mes_tasks.keys import lock_key
from mes_tasks.models import FailedUpdate, OutboxMessage, QuantityLog, WorkOrder
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.tasks import relay_outbox


def cli(*args: str) -> Result:
    return CliRunner().invoke(celery, ["-A", "mes_tasks", *args], catch_exceptions=False)


def cli_json(*args: str) -> object:
    result = cli(*args, "--json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def dead_letter(request_id: str, wo: str = "WO-NEW", code_exc: Exception | None = None) -> FailedUpdate:
    error = code_exc or UnknownWorkOrder(f"work order {wo!r} does not exist")
    record_failure(Failure("mes_tasks.tasks.update_quantity", f"task-{request_id}", request_id, wo,
                           [wo, "output", 3], {"request_id": request_id, "context": None}, error, 1))  # type: ignore[arg-type]  # fmt: skip
    return FailedUpdate.objects.get(request_id=request_id)


# -- failed ---------------------------------------------------------------------------------


def test_failed_list_filters_by_code_and_work_order(services: redis.Redis) -> None:
    dead_letter("a", "WO-A")
    dead_letter("b", "WO-B")
    listed = cli_json("failed", "list")
    assert {r["request_id"] for r in listed} == {"a", "b"}  # type: ignore[union-attr]
    assert [r["request_id"] for r in cli_json("failed", "list", "--work-order", "WO-B")] == ["b"]  # type: ignore[union-attr]
    assert cli_json("failed", "list", "--code", "LOCK_BUSY") == []
    table = cli("failed", "list").stdout
    assert "UNKNOWN_WORK_ORDER" in table and "WO-A" in table


def test_failed_retry_resends_with_the_original_request_id_and_never_counts_twice(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    record = dead_letter("scan:X:PACK")
    make_work_orders(["WO-NEW"])  # the cause is fixed
    start_worker()
    retried = cli("failed", "retry", str(record.id))
    assert retried.exit_code == 0 and "re-sent" in retried.stdout, retried.output
    wait_until(lambda: QuantityLog.objects(request_id="scan:X:PACK").count() == 1, 30, "the retried update")
    assert cli("failed", "retry", str(record.id)).exit_code == 0  # a second retry of the same record
    sent = submit_quantity_update("WO-NEW", "output", 1, request_id="after")
    wait_until(lambda: QuantityLog.objects(request_id=sent["request_id"]).count() == 1, 30, "a later update")
    assert WorkOrder.objects.get(id="WO-NEW").output_qty == 3 + 1
    shown = cli_json("failed", "show", str(record.id))
    assert shown["status"] == "retried" and shown["applied_since"] is True  # type: ignore[index]
    assert [e["event"] for e in shown["history"]] == ["failed", "retried", "retried"]  # type: ignore[index]


def test_failed_discard_all_of_a_code(services: redis.Redis) -> None:
    dead_letter("a")
    from mes_tasks.errors import NegativeCounter

    dead_letter("b", code_exc=NegativeCounter("below zero"))
    result = cli("failed", "discard", "--all", "--code", "NEGATIVE_COUNTER", "--yes")
    assert result.exit_code == 0 and "1 discarded" in result.stdout
    assert FailedUpdate.objects.get(request_id="b").status == "discarded"
    assert FailedUpdate.objects.get(request_id="a").status == "open"
    assert [r["request_id"] for r in cli_json("failed", "list", "--status", "discarded")] == ["b"]  # type: ignore[union-attr]


def test_failed_commands_refuse_unknown_or_malformed_ids_and_bad_usage(services: redis.Redis) -> None:
    unknown = cli("failed", "show", "0123456789abcdef01234567")
    assert unknown.exit_code == 2 and "FAILED_UPDATE_NOT_FOUND" in unknown.stderr
    assert "INVALID_ID" in cli("failed", "retry", "nope").stderr
    neither = cli("failed", "retry")
    assert neither.exit_code == 2 and "USAGE" in neither.stderr
    assert "INVALID_CODE" in cli("failed", "list", "--code", "{'$ne': 1}").stderr


# -- queue ----------------------------------------------------------------------------------


def test_queue_status_counts_waiting_failed_locks_and_consumers(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    submit_quantity_update("WO-1", "input", 1)
    submit_quantity_update("WO-1", "input", 1)
    dead_letter("x")
    RedisLock(services, lock_key("mes:", "WO-9"), 30).acquire()
    status = cli_json("queue", "status")
    assert status["queues"]["workorder"] == {"waiting": 2, "consumers": []}  # type: ignore[index]
    assert (status["failed_open"], status["locks_held"], status["last_audit"]) == (1, 1, None)  # type: ignore[index]
    worker = start_worker()
    wait_until(lambda: QuantityLog.objects.count() == 2, 30, "the queue to drain")
    status = cli_json("queue", "status")
    assert status["queues"]["workorder"]["consumers"] == [worker.name]  # type: ignore[index]
    assert "NO CONSUMER" in cli("queue", "status").stdout  # the audit queue has none


def test_queue_pause_keeps_messages_waiting_and_resume_applies_them(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    worker = start_worker()
    paused = cli("queue", "pause")
    assert paused.exit_code == 0 and worker.name in paused.stdout
    submit_quantity_update("WO-1", "input", 5, request_id="p1")
    assert cli_json("queue", "status")["queues"]["workorder"]["waiting"] == 1  # type: ignore[index]
    assert QuantityLog.objects.count() == 0
    resumed = cli("queue", "resume")
    assert resumed.exit_code == 0 and worker.name in resumed.stdout
    wait_until(lambda: QuantityLog.objects(request_id="p1").count() == 1, 30, "the paused update")
    assert "NOT_PAUSED" in cli("queue", "resume").stderr


def test_queue_purge_drops_waiting_updates_for_good_and_asks_first(services: redis.Redis) -> None:
    make_work_orders(["WO-1"])
    sent = [submit_quantity_update("WO-1", "input", 1, request_id=f"pg{i}")["job_id"] for i in range(3)]
    declined = CliRunner().invoke(celery, ["-A", "mes_tasks", "queue", "purge"], input="n\n")
    assert declined.exit_code == 2 and services.llen("workorder") == 3
    assert declined.stderr.splitlines()[-1].startswith("error [ABORTED]: ")
    purged = cli_json("queue", "purge", "--yes")
    assert (purged["purged"], purged["outbox_removed"]) == (3, 3)  # type: ignore[index]
    assert sorted(purged["job_ids"]) == sorted(sent)  # type: ignore[index]
    assert services.llen("workorder") == 0 and OutboxMessage.objects.count() == 0
    assert relay_outbox(grace_s=0)["republished"] == 0  # nothing comes back


def test_queue_status_counts_the_outbox(services: redis.Redis) -> None:
    submit_quantity_update("WO-1", "input", 1, request_id="ob1")
    assert cli_json("queue", "status")["outbox"] == {"spooled": 0, "sent": 1}  # type: ignore[index]
    assert "outbox: 0 spooled (broker was down), 1 sent awaiting an outcome" in cli("queue", "status").stdout


def test_queue_pause_with_no_worker_is_recorded_and_says_nobody_was_consuming(services: redis.Redis) -> None:
    result = cli("queue", "pause")
    assert result.exit_code == 0 and "no worker was consuming it" in result.stdout
    assert cli_json("queue", "status")["paused"]["at"]  # type: ignore[index]
    assert "PAUSED every workorder queue since" in cli("queue", "status").stdout
    assert cli("queue", "resume").exit_code == 0
    assert cli_json("queue", "status")["paused"] is None


def test_queue_status_with_redis_down_is_a_clear_error(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    env_override(REDIS_URL="redis://:hunter2@127.0.0.1:1/3", MES_CONNECT_TIMEOUT_S="0.5")
    result = cli("queue", "status")
    assert result.exit_code == 2 and "REDIS_UNAVAILABLE" in result.stderr
    assert "hunter2" not in result.output and "Traceback" not in result.output


# -- locks ----------------------------------------------------------------------------------


def test_locks_list_and_forced_release(services: redis.Redis) -> None:
    held = RedisLock(services, lock_key("mes:", "WO-7"), 30)
    held.acquire()
    listed = cli_json("locks", "list")
    assert listed[0]["work_order_id"] == "WO-7" and listed[0]["token"] == held.token  # type: ignore[index]
    refused = cli("locks", "release", "WO-7")  # no answer to the question is a no
    assert refused.exit_code == 2 and "error [ABORTED]" in refused.stderr
    assert services.get(held.key) == held.token
    released = cli("locks", "release", "WO-7", "--force")  # the old spelling of --yes
    assert released.exit_code == 0 and "released the lock of WO-7" in released.stdout
    assert services.get(held.key) is None
    again = cli("locks", "release", "WO-7", "--force")
    assert again.exit_code == 2 and "NOT_LOCKED" in again.stderr


# -- workorder ------------------------------------------------------------------------------


def test_workorder_show_gives_counters_epoch_and_recent_logs(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    start_worker()
    for i in range(3):
        submit_quantity_update("WO-1", "output", 2, request_id=f"s{i}", context={"barcode": f"B{i}"})
    wait_until(lambda: QuantityLog.objects.count() == 3, 30, "three updates")
    data = cli_json("workorder", "show", "WO-1", "--logs", "2")
    # One epoch: the worker kept the lock (and its fence) across the three updates.
    assert (data["output_qty"], data["epoch"], data["version"]) == (6, 1, 3)  # type: ignore[index]
    assert [x["request_id"] for x in data["logs"]] == ["s2", "s1"]  # type: ignore[index]
    assert "B2" in cli("workorder", "show", "WO-1").stdout
    unknown = cli("workorder", "show", "WO-404")
    assert unknown.exit_code == 2 and "UNKNOWN_WORK_ORDER" in unknown.stderr


# -- doctor ---------------------------------------------------------------------------------


def test_doctor_passes_on_the_test_deployment_with_one_solo_worker(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    report = cli_json("doctor")
    statuses = {c["name"]: c["status"] for c in report["checks"]}  # type: ignore[index]
    assert statuses["redis aof"] == statuses["redis eviction"] == statuses["mongodb"] == "OK"
    assert statuses["workorder consumer"] == "OK"


def test_doctor_fails_a_second_consumer_on_workorder(
    services: redis.Redis, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    start_worker()
    start_worker()  # a standby: it holds no consumer, doctor stays happy
    assert cli("doctor").exit_code == 0
    argv = worker_argv(name="rogue", app="rogue_app")  # a worker without the lease step
    rogue = spawn(argv, tmp_path / "rogue.log", PYTHONPATH=str(Path(__file__).parent))
    try:
        rogue.wait_for_log(" ready.", 60)
        result = cli("doctor")
    finally:
        rogue.stop()
    assert result.exit_code == 1
    assert "FAIL workorder consumer: 2 workers" in click_plain(result.stdout)


def test_doctor_fails_a_redis_without_aof_and_masks_credentials(
    services: redis.Redis, env_override: Callable[..., None]
) -> None:
    env_override(REDIS_URL="redis://:hunter2@127.0.0.1:1/0", MES_CONNECT_TIMEOUT_S="0.5")
    result = cli("doctor")
    assert result.exit_code == 1
    out = click_plain(result.stdout)
    assert "FAIL redis: unreachable" in out and "hunter2" not in result.output
    assert "WARN redis database" in out


def click_plain(text: str) -> str:
    import click

    return click.unstyle(text)
