"""`celery -A mes_tasks audit ...` through celery's own CLI, and the beat-scheduled audit."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from conftest import Worker, make_work_orders, spawn, wait_until
from mes_tasks.apply.ledger import Ledger
from mes_tasks.db import Mongo
from mes_tasks.models import AuditReport, OutboxMessage, WorkOrder, utcnow
from mes_tasks.send.relay import broker_holds
from mes_tasks.settings import Settings
from mes_tasks.validation import validate_update


@pytest.fixture()
def seeded(mongo: Mongo, redis_client: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch,
           tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setenv("MES_REPORTS_DIR", str(tmp_path / "reports"))
    make_work_orders(["WO-1", "WO-2"])
    ledger = Ledger(mongo, redis_client, settings)
    for i in range(6):
        ledger.apply(validate_update(f"WO-{1 + i % 2}", "output", 2), f"r{i}")


def cli(*args: str) -> Result:
    return CliRunner().invoke(celery, ["-A", "mes_tasks", "audit", *args], catch_exceptions=False)


def test_audit_run_exits_0_when_counts_are_right(seeded: None) -> None:
    result = cli("run")
    assert result.exit_code == 0, result.output
    assert "0 finding(s)" in result.stdout


def test_audit_run_exits_1_and_lists_the_mismatch(seeded: None) -> None:
    WorkOrder.objects(id="WO-2").update(inc__output_qty=4)
    result = cli("run")
    assert result.exit_code == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("WO-2"))
    assert row.split() == ["WO-2", "counter_mismatch", "output_qty", "10", "6", "4", "3"]


def test_audit_run_json_repair_and_a_second_clean_run(seeded: None) -> None:
    WorkOrder.objects(id="WO-1").update(inc__output_qty=-1)
    first = cli("run", "--repair", "--json")
    assert first.exit_code == 1
    data = json.loads(first.stdout)
    assert data["repaired"] is True and data["finding_count"] == 1
    assert data["repairs"][0]["after"]["output_qty"] == 6
    assert Path(data["files"]["json"]).exists() and Path(data["files"]["csv"]).exists()
    assert cli("run", "--json").exit_code == 0


def test_audit_run_for_chosen_work_orders_only(seeded: None) -> None:
    WorkOrder.objects(id="WO-2").update(inc__output_qty=4)
    assert cli("run", "--work-order", "WO-1").exit_code == 0
    assert cli("run", "--work-order", "WO-2").exit_code == 1


def test_audit_run_refuses_a_malformed_work_order_id(seeded: None) -> None:
    result = cli("run", "--work-order", "WO$1")
    assert result.exit_code == 2
    assert "INVALID_WORK_ORDER_ID" in result.stderr


def test_audit_list_and_show(seeded: None) -> None:
    WorkOrder.objects(id="WO-2").update(inc__output_qty=4)
    report_id = json.loads(cli("run", "--json", "--html").stdout)["id"]
    listed = cli("list", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [report_id]
    assert report_id in cli("list").stdout
    shown = cli("show", report_id)
    assert shown.exit_code == 0 and "1 finding(s)" in shown.stdout and "html:" in shown.stdout
    assert json.loads(cli("show", report_id, "--json").stdout)["finding_count"] == 1


def test_audit_show_of_an_unknown_or_malformed_id_says_so(seeded: None) -> None:
    unknown = cli("show", "0123456789abcdef01234567")
    assert unknown.exit_code == 2 and "REPORT_NOT_FOUND" in unknown.stderr
    malformed = cli("show", "nope")
    assert malformed.exit_code == 2 and "INVALID_REPORT_ID" in malformed.stderr


def test_audit_run_with_mongodb_down_is_a_clear_error(seeded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mes_tasks.settings import get_settings

    monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1/mes")
    monkeypatch.setenv("MES_CONNECT_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    try:
        result = cli("run")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "MONGO_UNAVAILABLE" in result.stderr and "Traceback" not in result.output


def test_celery_beat_runs_the_audit_on_its_schedule(
    seeded: None, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    start_worker(name="audit", queue="audit", MES_AUDIT_INTERVAL_S="1")
    beat_argv = [sys.executable, "-m", "celery", "-A", "mes_tasks", "beat", "--loglevel", "INFO",
                 "-s", str(tmp_path / "beat-schedule")]  # fmt: skip
    beat = spawn(beat_argv, tmp_path / "beat.log", MES_AUDIT_INTERVAL_S="1")
    try:
        wait_until(lambda: AuditReport.objects(trigger="schedule").count() >= 2, 60, "two scheduled audits")
    finally:
        beat.stop()
    assert "Scheduler: Sending due task nightly-audit" in beat.log()


def test_audit_verify_finds_drift_and_an_unexplained_update_and_resends_it(seeded: None) -> None:
    assert cli("verify").exit_code == 0  # the first pass proves both work orders and keeps them
    WorkOrder.objects(id="WO-1").update(inc__input_qty=3)
    old = utcnow() - timedelta(seconds=600)
    payload = json.dumps({"args": ["WO-2", "output", 1], "kwargs": {"request_id": "lost-1"}})
    OutboxMessage(job_id="job-lost-1", request_id="lost-1", payload=payload, state="sent", created_at=old,
                  sent_at=old).save()  # fmt: skip

    found = cli("verify", "--json")
    assert found.exit_code == 1
    data = json.loads(found.stdout)
    assert data["drift"] == ["WO-1"] and [u["request_id"] for u in data["unexplained"]] == ["lost-1"]
    assert data["report_id"] and cli("show", data["report_id"]).exit_code == 0

    text = cli("verify", "--resend")
    assert text.exit_code == 1 and "re-sent 1 with their own request ids" in text.stdout
    assert "lost-1" in text.stdout and "WO-1" in text.stdout
    assert "job-lost-1" in (broker_holds() or {})  # in the workorder queue again
    assert OutboxMessage.objects.get(job_id="job-lost-1").republished == 1
    again = json.loads(cli("verify", "--json").stdout)
    assert again["unexplained"] == [] and again["drift"] == ["WO-1"]
