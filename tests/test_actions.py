"""The console's operations as functions answer exactly what their command prints with --json."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.bin.celery import celery
from click.testing import CliRunner

from conftest import make_work_orders, wait_until
from mes_tasks.apply.deadletter import Failure, record_failure
from mes_tasks.apply.ledger import Ledger
from mes_tasks.apply.locks import RedisLock
from mes_tasks.db import Mongo
from mes_tasks.errors import MesError, UnknownWorkOrder, ValidationError
from mes_tasks.keys import lock_key
from mes_tasks.models import FailedUpdate, OutboxMessage, WorkOrder
from mes_tasks.ops import actions
from mes_tasks.ops.stores import Stores
from mes_tasks.settings import Settings, get_settings
from mes_tasks.validation import validate_update


def printed(*args: str) -> Any:
    """What ``celery -A mes_tasks ARGS --json`` prints, parsed."""
    result = CliRunner().invoke(celery, ["-A", "mes_tasks", *args, "--json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def refused(*args: str) -> dict[str, str]:
    """The error object ``ARGS --json`` prints on stdout (exit 2)."""
    result = CliRunner().invoke(celery, ["-A", "mes_tasks", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    error: dict[str, str] = json.loads(result.stdout)["error"]
    return error


def dead_letter(request_id: str, wo: str = "WO-1") -> str:
    error = UnknownWorkOrder(f"work order {wo!r} does not exist")
    record_failure(Failure("mes_tasks.tasks.update_quantity", f"task-{request_id}", request_id, wo,
                           [wo, "output", 3], {"request_id": request_id}, error, 1))  # fmt: skip
    return str(FailedUpdate.objects.get(request_id=request_id).id)


@pytest.fixture()
def stores(services: redis.Redis, mongo: Mongo, env_override: Any, tmp_path: Path) -> Stores:
    """The stores as the gateway holds them; audit reports written under ``tmp_path``."""
    env_override(MES_REPORTS_DIR=str(tmp_path / "reports"))
    return Stores(get_settings(), mongo, services)


@pytest.fixture()
def app() -> Any:
    from mes_tasks import app

    return app


@pytest.fixture()
def seeded(stores: Stores) -> dict[str, str]:
    """Two work orders with logs (one counter off), two dead letters, a held lock, an audit."""
    make_work_orders(["WO-1", "WO-2"])
    ledger = Ledger(stores.mongo, stores.redis, stores.settings)
    for i in range(4):
        ledger.apply(validate_update(f"WO-{1 + i % 2}", "output", 2, None, {"barcode": f"B{i}"}), f"r{i}")
    WorkOrder.objects(id="WO-2").update_one(set__output_qty=99)
    RedisLock(stores.redis, lock_key(stores.settings.key_prefix, "WO-1"), 30).acquire()
    report = actions.run_audit(stores, ["WO-2"])
    return {"a": dead_letter("a"), "b": dead_letter("b", "WO-2"), "report": report["id"]}


def test_the_read_operations_answer_what_their_commands_print(
    app: Any, stores: Stores, seeded: dict[str, str]
) -> None:
    assert actions.queue_status(app, stores) == printed("queue", "status")
    assert actions.list_failed() == printed("failed", "list")
    assert actions.list_failed(work_order_id="WO-2", status="all") == printed(
        "failed", "list", "--work-order", "WO-2", "--status", "all"
    )
    assert actions.show_failed(seeded["a"]) == printed("failed", "show", seeded["a"])
    assert actions.list_audits() == printed("audit", "list")
    assert actions.show_audit(seeded["report"]) == printed("audit", "show", seeded["report"])
    assert actions.show_work_order(stores.settings, "WO-1", 3) == printed(
        "workorder", "show", "WO-1", "--logs", "3"
    )
    held, shown = actions.list_locks(stores), printed("locks", "list")
    assert [{**h, "ttl_ms": 0} for h in held] == [{**h, "ttl_ms": 0} for h in shown] and len(held) == 1


def test_an_audit_run_answers_as_the_command_does_for_the_same_state(
    stores: Stores, seeded: dict[str, str]
) -> None:
    def same(report: dict[str, Any]) -> dict[str, Any]:  # a report of its own: id, times and files
        return {k: v for k, v in report.items() if k not in ("id", "started_at", "finished_at", "files")}

    by_action, by_command = actions.run_audit(stores), printed("audit", "run")
    assert same(by_action) == same(by_command) and by_action["finding_count"] == 1
    anew = actions.stores()  # as the command did: a repair's session must be on the connected client
    repaired = actions.run_audit(anew, ["WO-2"], repair=True)
    assert repaired["repaired"] is True and WorkOrder.objects.get(id="WO-2").output_qty == 4
    assert same(repaired) == same(actions.show_audit(repaired["id"]))


def test_a_discard_answers_what_the_command_prints_for_the_same_record(seeded: dict[str, str]) -> None:
    first = actions.discard_failed_updates([seeded["a"]])
    assert first == {"discarded": [{"id": seeded["a"], "request_id": "a"}], "already_discarded": []}
    again = actions.discard_failed_updates([seeded["a"]])
    assert again == printed("failed", "discard", seeded["a"], "--yes")
    assert again == {"discarded": [], "already_discarded": [{"id": seeded["a"], "request_id": "a"}]}


def test_a_retry_is_sent_through_the_producer_and_answers_as_the_command_does(
    stores: Stores, seeded: dict[str, str]
) -> None:
    first = actions.retry_failed_updates([seeded["b"]])["re_sent"]
    assert [(r["was"], r["applied_before"]) for r in first] == [("open", False)]
    shown = printed("failed", "retry", seeded["b"])["re_sent"]  # the same state: a retried record
    done = actions.retry_failed_updates([seeded["b"]])["re_sent"]
    job_id = done[0].pop("task_id")
    assert str(uuid.UUID(job_id)) == job_id and job_id != shown[0].pop("task_id")
    assert (
        done == shown == [{"id": seeded["b"], "request_id": "b", "was": "retried", "applied_before": False}]
    )
    assert OutboxMessage.objects(job_id=job_id, request_id="b").count() == 1  # recorded, as a submission is
    assert stores.redis.llen("workorder") == 3  # and queued, as each re-send before it
    assert FailedUpdate.objects.get(id=seeded["b"]).history[-1]["task_id"] == job_id


def test_a_lock_release_and_a_pause_answer_as_their_commands_do(
    app: Any, stores: Stores, seeded: dict[str, str]
) -> None:
    token = actions.lock_holder(stores, "WO-1")
    assert actions.release_lock(stores, "WO-1", token) == {
        "work_order_id": "WO-1",
        "released": True,
        "token": token,
    }
    with pytest.raises(MesError) as gone:
        actions.release_lock(stores, "WO-1")
    assert gone.value.to_dict() == refused("locks", "release", "WO-1", "--yes")
    assert actions.pause_queue(app, stores) == printed("queue", "pause")


def test_an_out_of_range_partition_is_a_coded_refusal_the_command_shows_as_usage(
    app: Any, stores: Stores, services: redis.Redis
) -> None:
    with pytest.raises(ValidationError) as bad:
        actions.pause_queue(app, stores, partition=5)
    assert bad.value.code == "INVALID_PARTITION"
    shown = refused("queue", "pause", "--partition", "5")
    assert shown["code"] == "USAGE" and shown["message"].endswith(
        f"queue pause: {bad.value.message} (see --help)"
    )
    assert services.keys("*pause*") == []


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda: actions.retry_failed_updates(), "USAGE"),
        (lambda: actions.discard_failed_updates(["x"], every=True), "USAGE"),
        (lambda: actions.retry_failed_updates(["x"], code="LOCK_BUSY"), "USAGE"),
        (lambda: actions.list_audits(0), "INVALID_LIMIT"),
        (lambda: actions.list_audits(True), "INVALID_LIMIT"),
        (lambda: actions.show_work_order(Settings(), "WO-1", logs=10_001), "INVALID_LOGS"),
        (lambda: actions.show_work_order(Settings(), "WO$1"), "INVALID_WORK_ORDER_ID"),
    ],
)
def test_a_malformed_request_is_refused_with_a_code_before_any_store_is_reached(call: Any, code: str) -> None:
    with pytest.raises(ValidationError) as refusal:
        call()
    assert refusal.value.code == code


def test_a_work_order_is_created_at_zero_once_and_an_update_to_it_then_applies(
    services: object, start_worker: Any
) -> None:
    from mes_tasks.errors import MesError
    from mes_tasks.models import WorkOrder
    from mes_tasks.ops import actions
    from mes_tasks.send.producer import submit_quantity_update

    zero = {"input_qty": 0, "output_qty": 0, "epoch": 0, "version": 0}
    assert actions.create_work_order("WO-NEW") == {"id": "WO-NEW", "created": True, **zero}
    with pytest.raises(MesError) as refused:
        actions.create_work_order("WO-NEW")
    assert refused.value.code == "WORK_ORDER_EXISTS"
    start_worker()
    assert submit_quantity_update("WO-NEW", "output", 2, request_id="new-1")["success"]
    wait_until(lambda: WorkOrder.objects.get(id="WO-NEW").output_qty == 2, 30, "the update applied")
