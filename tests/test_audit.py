"""The audit against real SecantusDB: exact while updates flow, reports, repair, alerts."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import make_work_orders
from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.checks import run_audit
from mes_tasks.audit.reports import audit_and_report, prune
from mes_tasks.db import Mongo
from mes_tasks.errors import LockBusy
from mes_tasks.models import AuditReport, QuantityLog, WorkOrder, utcnow
from mes_tasks.settings import Settings
from mes_tasks.validation import validate_update

WOS = [f"WO-{i:02d}" for i in range(10)]
AUDIT_PAUSE_S = 0.3


@pytest.fixture()
def ledger(mongo: Mongo, redis_client: redis.Redis, settings: Settings, tmp_path: Path) -> Ledger:
    make_work_orders(WOS)
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    return Ledger(mongo, redis_client, quiet)


def apply_some(ledger: Ledger, n: int, prefix: str = "r") -> None:
    for i in range(n):
        wo, kind = WOS[i % len(WOS)], ("input", "output")[i % 2]
        ledger.apply(validate_update(wo, kind, 1 + i % 5), f"{prefix}{i}")


def tamper(wo: str, **inc: int) -> None:
    WorkOrder._get_collection().update_one({"_id": wo}, {"$inc": inc})


def test_consistent_counters_give_no_findings(ledger: Ledger) -> None:
    apply_some(ledger, 60)
    outcome = run_audit(ledger.mongo)
    assert outcome.findings == []
    assert (outcome.work_orders_scanned, outcome.logs_scanned) == (10, 60)


def test_tampered_counters_are_exactly_the_findings_with_their_deltas(ledger: Ledger) -> None:
    apply_some(ledger, 60)
    tamper("WO-03", output_qty=5)
    tamper("WO-07", input_qty=-2)
    found = {(f.work_order_id, f.field): f for f in run_audit(ledger.mongo).findings}
    assert set(found) == {("WO-03", "output_qty"), ("WO-07", "input_qty")}
    wo3 = found["WO-03", "output_qty"]
    assert (wo3.check, wo3.delta, wo3.counter - wo3.log_sum) == ("counter_mismatch", 5, 5)
    assert wo3.log_count == QuantityLog.objects(work_order_id="WO-03", kind="output").count()
    assert found["WO-07", "input_qty"].delta == -2


def test_orphan_logs_and_counters_without_logs_are_findings(ledger: Ledger) -> None:
    tamper("WO-01", input_qty=4)
    QuantityLog(
        request_id="orphan", work_order_id="WO-GONE", kind="output", quantity=3, value_after=3, epoch=1
    ).save()
    found = {(f.work_order_id, f.check, f.field, f.delta) for f in run_audit(ledger.mongo).findings}
    assert found == {
        ("WO-01", "counters_without_logs", "input_qty", 4),
        ("WO-GONE", "logs_without_work_order", "output_qty", -3),
    }


def test_a_subset_audit_looks_only_at_the_chosen_work_orders(ledger: Ledger) -> None:
    apply_some(ledger, 20)
    tamper("WO-03", output_qty=1)
    tamper("WO-04", output_qty=1)
    outcome = run_audit(ledger.mongo, ["WO-04", "WO-05"])
    assert outcome.work_orders_scanned == 2
    assert [f.work_order_id for f in outcome.findings] == ["WO-04"]


def test_no_false_alarm_while_updates_flow_then_exactly_the_two_tampered(ledger: Ledger) -> None:
    stop = threading.Event()
    applied = [0, 0]

    def writer(n: int) -> None:
        mine = WOS[n::2]
        while not stop.is_set():
            i = applied[n]
            ledger.apply(validate_update(mine[i % len(mine)], ("input", "output")[i % 2], 1), f"w{n}:{i}")
            applied[n] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    audits = []
    try:
        while sum(applied) < 2000:
            audits.append(run_audit(ledger.mongo))
            time.sleep(AUDIT_PAUSE_S)  # leave the writers most of the server
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [f for a in audits for f in a.findings] == []
    assert sum(a.rechecked for a in audits) > 0, "no audit overlapped a commit: the test proved nothing"

    tamper("WO-02", output_qty=3)
    tamper("WO-05", input_qty=-1)
    found = {(f.work_order_id, f.field, f.delta) for f in run_audit(ledger.mongo).findings}
    assert found == {("WO-02", "output_qty", 3), ("WO-05", "input_qty", -1)}


def test_repair_sets_counters_to_the_log_sums_and_a_second_run_changes_nothing(ledger: Ledger) -> None:
    apply_some(ledger, 30)
    tamper("WO-03", output_qty=5)
    before = WorkOrder.objects.get(id="WO-03")
    first = audit_and_report(ledger, do_repair=True)
    assert first.finding_count == 1 and first.repaired
    assert first.repairs == [
        {
            "work_order_id": "WO-03",
            "before": {"input_qty": before.input_qty, "output_qty": before.output_qty},
            "after": {"input_qty": before.input_qty, "output_qty": before.output_qty - 5},
        }
    ]
    assert run_audit(ledger.mongo).findings == []
    second = audit_and_report(ledger, do_repair=True)
    assert (second.finding_count, second.repairs) == (0, [])


def test_repair_waits_for_the_lock_and_reports_a_busy_one(ledger: Ledger) -> None:
    tamper("WO-01", input_qty=2)
    with ledger.lock_for("WO-01"):
        busy = Ledger(
            ledger.mongo, ledger.redis, Settings(**{**ledger.settings.__dict__, "lock_wait_s": 0.05})
        )
        report = audit_and_report(busy, do_repair=True)
    assert report.repairs == [] and report.repair_errors[0]["code"] == LockBusy.code
    assert WorkOrder.objects.get(id="WO-01").input_qty == 2


def test_each_run_is_stored_and_written_as_json_csv_and_html(ledger: Ledger) -> None:
    apply_some(ledger, 10)
    tamper("WO-01", input_qty=1)
    report = audit_and_report(ledger, html_file=True)
    stored = AuditReport.objects.get(id=report.id)
    assert stored.finding_count == 1 and stored.finished_at >= stored.started_at
    data = json.loads(Path(report.files["json"]).read_text())
    assert data["id"] == str(report.id) and data["findings"][0]["work_order_id"] == "WO-01"
    csv_lines = Path(report.files["csv"]).read_text().splitlines()
    assert csv_lines[0].startswith("work_order_id,check,field") and csv_lines[1].startswith("WO-01,")
    assert "<td>WO-01</td>" in Path(report.files["html"]).read_text()


def test_reports_older_than_the_retention_are_pruned(ledger: Ledger) -> None:
    old = audit_and_report(ledger)
    recent = audit_and_report(ledger)
    backdated = utcnow() - timedelta(days=ledger.settings.report_retention_days + 1)
    AuditReport.objects(id=old.id).update(set__started_at=backdated)
    for path in old.files.values():
        os.utime(path, (backdated.timestamp(), backdated.timestamp()))
    assert prune(ledger.settings) == 1
    assert [r.id for r in AuditReport.objects] == [recent.id]
    assert not any(Path(p).exists() for p in old.files.values())
    assert all(Path(p).exists() for p in recent.files.values())


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def webhook() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"received": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/secret-token", handler
    server.shutdown()


def with_webhook(ledger: Ledger, url: str) -> Ledger:
    s = Settings(**{**ledger.settings.__dict__, "audit_webhook_url": url, "webhook_retries": 2})
    return Ledger(ledger.mongo, ledger.redis, s)


def test_findings_are_logged_and_posted_to_the_webhook(
    ledger: Ledger, webhook: tuple[str, type[_Hook]], caplog: pytest.LogCaptureFixture
) -> None:
    url, hook = webhook
    tamper("WO-01", input_qty=1)
    report = audit_and_report(with_webhook(ledger, url))
    assert len(hook.received) == 1
    body = hook.received[0]
    assert (body["report_id"], body["finding_count"]) == (str(report.id), 1)
    assert body["findings"][0]["work_order_id"] == "WO-01"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("1 finding(s) in 1 work order(s)" in r.getMessage() for r in errors)
    assert "secret-token" not in caplog.text


def test_a_clean_audit_posts_nothing(ledger: Ledger, webhook: tuple[str, type[_Hook]]) -> None:
    url, hook = webhook
    audit_and_report(with_webhook(ledger, url))
    assert hook.received == []


def test_a_failing_webhook_is_retried_and_never_fails_the_audit(
    ledger: Ledger, webhook: tuple[str, type[_Hook]], caplog: pytest.LogCaptureFixture
) -> None:
    url, hook = webhook
    hook.status = 500
    tamper("WO-01", input_qty=1)
    started = time.monotonic()
    report = audit_and_report(with_webhook(ledger, url))
    assert report.finding_count == 1 and AuditReport.objects(id=report.id).count() == 1
    assert len(hook.received) == 3  # first try + 2 retries
    assert "not delivered after 3 attempts" in caplog.text
    assert time.monotonic() - started < 10


def test_an_unreachable_webhook_never_fails_the_audit(ledger: Ledger) -> None:
    tamper("WO-01", input_qty=1)
    report = audit_and_report(with_webhook(ledger, "http://127.0.0.1:1/hook"))
    assert report.finding_count == 1
