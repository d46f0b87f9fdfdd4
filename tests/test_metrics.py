"""``celery -A mes_tasks metrics`` against the real servers: every number, the HTTP endpoint, the rules."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery.bin.celery import celery
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, TEST_ENV, make_work_orders, wait_until
from devtools.devserver import free_port
from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.reports import audit_and_report
from mes_tasks.db import Mongo
from mes_tasks.keys import (
    apply_histogram_key,
    first_start_key,
    http_counts_key,
    http_histogram_key,
    lease_key,
    pause_key,
    takeovers_key,
    update_counts_key,
)
from mes_tasks.models import FailedUpdate, OutboxMessage, QuantityLog, WorkOrder, utcnow
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.ops.metrics import registry_for
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import Settings
from mes_tasks.tally import DEAD_LETTERED, RETRIED, Tally, bucket_of, http_field, http_series
from mes_tasks.tasks import update_quantity
from mes_tasks.worker.state import STATE

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "bool", "offset", "inf", "nan"}  # fmt: skip
PROMETHEUS_OWN = {"up", "scrape_duration_seconds"}  # series Prometheus itself records per target


@pytest.fixture()
def registry(mongo: Mongo, redis_client: redis.Redis, settings: Settings) -> Iterator[CollectorRegistry]:
    STATE.tally = Tally()  # not what earlier tests' in-process updates counted
    yield registry_for(redis_client, settings.key_prefix)
    kept = STATE.kept_locks  # the in-process updates' kept locks: let go, like a stopping worker
    if kept is not None:
        kept.release_all()
    STATE._ledger = None  # its MongoDB client is closed when the next test connects again


def scrape(registry: CollectorRegistry) -> Samples:
    STATE.flush_counts()  # what the worker does between tasks, for the updates run in this process
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def send(wo: str, kind: str, qty: int, request_id: str) -> Any:
    """One update through the task's own code, in this process (as the worker runs it)."""
    return update_quantity.apply(args=[wo, kind, qty], kwargs={"request_id": request_id})


def test_updates_duplicates_a_refusal_and_an_audit_are_counted(
    registry: CollectorRegistry, tmp_path: Path, settings: Settings, mongo: Mongo, redis_client: redis.Redis
) -> None:
    make_work_orders(["WO-M1", "WO-M2"])
    for wo, kind, qty, rid in (("WO-M1", "input", 5, "m1"), ("WO-M1", "output", 2, "m2"),
                               ("WO-M2", "input", 1, "m3")):  # fmt: skip
        assert send(wo, kind, qty, rid).result["status"] == "applied"
    assert send("WO-M1", "input", 5, "m1").result["status"] == "duplicate"
    assert send("WO-M1", "input", 5, "m1").result["status"] == "duplicate"
    assert send("WO-NOPE", "input", 1, "m4").failed()
    WorkOrder._get_collection().update_one({"_id": "WO-M2"}, {"$inc": {"input_qty": 7}})
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    report = audit_and_report(Ledger(STATE.ledger.mongo, redis_client, quiet))

    got = scrape(registry)
    assert value(got, "mes_updates_applied_total") == 3
    assert value(got, "mes_updates_duplicate_total") == 2
    assert value(got, "mes_updates_dead_lettered_total", code="UNKNOWN_WORK_ORDER") == 1
    assert value(got, "mes_dead_letters_open") == 1
    assert value(got, "mes_dead_letters_open_by_code", code="UNKNOWN_WORK_ORDER") == 1
    assert value(got, "celery_task_succeeded_total", name=UPDATE_QUANTITY) == 5
    assert value(got, "celery_task_failed_total", name=UPDATE_QUANTITY) == 1
    assert value(got, "mes_update_apply_seconds_count") == 5
    assert value(got, "mes_update_apply_seconds_bucket", le="+Inf") == 5
    assert 0 < value(got, "mes_update_apply_seconds_sum") < 60
    assert value(got, "mes_audit_last_findings") == 1
    assert value(got, "mes_audit_last_work_orders_scanned") == 2
    assert value(got, "mes_audit_last_run_timestamp_seconds") == pytest.approx(
        report.finished_at.timestamp(), abs=0.01
    )
    assert value(got, "mes_audit_last_duration_seconds") >= 0
    assert value(got, "mes_store_up", store="redis") == value(got, "mes_store_up", store="mongodb") == 1


def test_the_last_verification_pass_is_read_at_scrape_time_and_is_not_the_nightly_audit(
    registry: CollectorRegistry, tmp_path: Path, settings: Settings, mongo: Mongo, redis_client: redis.Redis
) -> None:
    from mes_tasks.tasks import verify_once

    got = scrape(registry)  # before any pass: nothing to wait for, nothing found
    assert value(got, "mes_verify_last_pass_timestamp_seconds") == value(got, "mes_verify_lag_seconds") == 0
    make_work_orders(["WO-M1", "WO-M2"])
    assert send("WO-M1", "input", 5, "m1").result["status"] == "applied"
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    verify_once(STATE.ledger.mongo, quiet)  # the in-process updates' client is mongoengine's now
    WorkOrder._get_collection().update_one({"_id": "WO-M2"}, {"$inc": {"input_qty": 7}})
    outcome, report = verify_once(STATE.ledger.mongo, quiet)
    assert report is not None
    time.sleep(0.2)

    got = scrape(registry)
    assert value(got, "mes_verify_drift_work_orders") == 1
    assert value(got, "mes_verify_unexplained_updates") == 0
    assert value(got, "mes_verify_last_pass_timestamp_seconds") == pytest.approx(
        outcome.finished_at.timestamp(), abs=0.01
    )
    assert 0.2 <= value(got, "mes_verify_lag_seconds") < 30
    assert value(got, "mes_audit_last_run_timestamp_seconds") == 0  # a pass's report is no nightly audit
    assert value(got, "mes_audit_last_findings") == 0


def test_a_fence_lost_to_a_newer_holder_is_a_retry_and_a_fence_rejection(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_work_orders(["WO-F"])
    ledger = STATE.ledger
    real_take = Ledger.take
    rivals = iter([True])

    def take_then_lose_the_fence(self: Ledger, wo: str) -> tuple[Any, int, dict[str, int]]:
        taken = real_take(self, wo)
        if next(rivals, False):
            ledger.bump_epoch(wo)  # what a holder that took the lock after ours expired does
        return taken

    monkeypatch.setattr(Ledger, "take", take_then_lose_the_fence)
    assert send("WO-F", "output", 4, "f1").result["status"] == "applied"
    got = scrape(registry)
    assert value(got, "mes_updates_retried_total", code="FENCE_LOST") == 1
    assert value(got, "mes_fence_rejections_total") == 1
    assert value(got, "celery_task_retried_total", name=UPDATE_QUANTITY) == 1
    assert value(got, "mes_updates_applied_total") == 1
    assert WorkOrder.objects.get(id="WO-F").output_qty == 4


def test_queue_outbox_pause_and_lease_are_read_at_scrape_time(
    registry: CollectorRegistry, redis_client: redis.Redis, settings: Settings
) -> None:
    make_work_orders(["WO-Q"])
    for i in range(3):  # no worker runs: they wait in the queue, sent, in the outbox
        assert submit_quantity_update("WO-Q", "input", 1, request_id=f"q{i}")["code"] == "QUEUED"
    OutboxMessage.objects.update(set__created_at=utcnow() - timedelta(seconds=90))
    OutboxMessage(job_id="j-spooled", request_id="s1", payload=json.dumps({"args": [], "kwargs": {}}),
                  created_at=utcnow() - timedelta(seconds=300)).save()  # fmt: skip
    prefix = settings.key_prefix
    redis_client.set(pause_key(prefix), json.dumps({"at": utcnow().isoformat()}))
    redis_client.set(lease_key(prefix), "host-a:41:w/abc", px=3000)

    got = scrape(registry)
    assert value(got, "mes_queue_waiting", queue="workorder") == 3
    assert value(got, "celery_queue_length", queue_name="workorder") == 3
    assert value(got, "mes_queue_waiting", queue="audit") == 0
    assert value(got, "mes_queue_oldest_age_seconds", queue="workorder") == pytest.approx(90, abs=5)
    assert value(got, "mes_queue_oldest_age_seconds", queue="audit") == 0
    assert value(got, "mes_outbox_entries", state="sent") == 3
    assert value(got, "mes_outbox_entries", state="spooled") == 1
    assert value(got, "mes_outbox_oldest_age_seconds", state="spooled") == pytest.approx(300, abs=5)
    assert value(got, "mes_workorder_paused") == 1
    assert value(got, "mes_workorder_active_consumer") == 1
    assert value(got, "mes_workorder_active_consumer_info", owner="host-a:41:w") == 1
    assert value(got, "mes_audit_last_run_timestamp_seconds") == 0  # never: the age alert fires


def test_take_overs_are_the_workers_count_and_no_lease_is_no_active_consumer(
    registry: CollectorRegistry, redis_client: redis.Redis, settings: Settings
) -> None:
    assert value(scrape(registry), "mes_lease_takeovers_total") == 0
    redis_client.set(takeovers_key(settings.key_prefix), 2)  # as two workers' _take_over leave it
    got = scrape(registry)
    assert value(got, "mes_lease_takeovers_total") == 2
    assert value(got, "mes_workorder_active_consumer") == 0


def test_the_deployment_starts_at_the_first_workers_start_or_an_earlier_first_log(
    registry: CollectorRegistry, redis_client: redis.Redis, settings: Settings
) -> None:
    started = "mes_deployment_started_timestamp_seconds"
    assert (started, frozenset()) not in scrape(registry)  # no worker has started here yet
    redis_client.set(first_start_key(settings.key_prefix), "1700000000")  # as the first worker writes it
    assert value(scrape(registry), started) == 1700000000
    earlier = datetime.fromtimestamp(1600000000, UTC)  # logs older than the key: an upgraded deployment
    QuantityLog(request_id="r", work_order_id="WO", kind="input", quantity=1, value_after=1, epoch=1,
                created_at=earlier).save()  # fmt: skip
    assert value(scrape(registry), started) == 1600000000


def test_a_message_without_an_outbox_entry_ages_from_when_the_scrape_first_saw_it(
    registry: CollectorRegistry, redis_client: redis.Redis
) -> None:
    redis_client.lpush("audit", json.dumps({"headers": {"id": "beat-1"}, "body": ""}))
    assert value(scrape(registry), "mes_queue_oldest_age_seconds", queue="audit") < 1
    time.sleep(0.3)
    assert value(scrape(registry), "mes_queue_oldest_age_seconds", queue="audit") >= 0.3


def test_a_redis_that_is_down_is_a_store_down_not_a_failed_scrape(mongo: Mongo) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, decode_responses=True)
    registry = registry_for(dead, "mes:")
    started = time.monotonic()
    got = scrape(registry)
    assert time.monotonic() - started < 3
    assert value(got, "mes_store_up", store="redis") == 0
    assert value(got, "mes_store_up", store="mongodb") == 1
    assert ("mes_queue_waiting", frozenset({("queue", "workorder")})) not in got
    assert value(got, "mes_outbox_entries", state="sent") == 0


def test_counts_a_flush_could_not_write_are_kept_for_the_next_one(
    redis_client: redis.Redis, settings: Settings
) -> None:
    tally, prefix = Tally(), settings.key_prefix
    tally.add("applied", apply_ms=3)
    tally.add(RETRIED, "LOCK_BUSY")
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens there
    assert not tally.flush(down, prefix)
    assert not tally.flush(redis_client, prefix)  # backing off: not yet
    tally._retry_at = 0
    tally.add("applied", apply_ms=30)
    assert tally.flush(redis_client, prefix) and not len(tally)
    assert redis_client.hgetall(update_counts_key(prefix)) == {"applied": "2", "retried:LOCK_BUSY": "1"}
    histogram = redis_client.hgetall(apply_histogram_key(prefix))
    assert histogram["5"] == histogram["50"] == "1" and float(histogram["sum"]) == 33


def test_an_update_lands_in_the_bucket_of_its_duration() -> None:
    assert [bucket_of(ms) for ms in (0.2, 1, 1.01, 7, 10_000, 10_001)] == [
        "1",
        "1",
        "2.5",
        "10",
        "10000",
        "+Inf",
    ]


def test_the_command_serves_metrics_over_http(
    mongo: Mongo, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "metrics.log"
    argv = [sys.executable, "-m", "celery", "-A", "mes_tasks", "metrics", "--port", str(port)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **TEST_ENV}, stdout=out, stderr=out)
    try:
        wait_until(lambda: "serving metrics" in log_path.read_text() or proc.poll() is not None, 60, "start")
        assert proc.poll() is None, log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            body = reply.read().decode()
        assert 'mes_store_up{store="redis"} 1.0' in body
        assert "mes_updates_applied_total" in body
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_command_says_in_one_line_when_it_cannot_listen(mongo: Mongo, redis_client: redis.Redis) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(celery, ["-A", "mes_tasks", "metrics", "--port", port])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error [LISTEN_FAILED]: cannot listen on 127.0.0.1:{port}: ")


# -- the alert rules and the dashboard use only exported series -------------------------------


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions, keywords and labels left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", n)}


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    return [str(r["expr"]) for group in rules["groups"] for r in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads((REPO / "deploy/grafana/dashboard.json").read_text())
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def test_the_metric_name_finder_leaves_out_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (code) (rate(mes_x_total{code!~"A|B"}[5m])) / on() group_left max(up) > 0 unless mes_y == 1'
    )
    assert metric_names(expr) == {"mes_x_total", "up", "mes_y"}


def test_every_series_the_alert_rules_and_the_dashboard_use_is_exported(
    registry: CollectorRegistry, redis_client: redis.Redis, settings: Settings
) -> None:
    prefix = settings.key_prefix  # one of each labelled series, so that each has a sample
    tally = Tally()
    tally.add(RETRIED, "LOCK_BUSY")
    tally.add(DEAD_LETTERED, "UNKNOWN_WORK_ORDER")
    assert tally.flush(redis_client, prefix)
    http = Tally(http_counts_key, http_histogram_key)  # a gateway's request
    http.count(http_field("POST", "/api/x", 503), 2.0, http_series("POST", "/api/x"))
    assert http.flush(redis_client, prefix)
    FailedUpdate(request_id="r", task_name=UPDATE_QUANTITY, error_code="UNKNOWN_WORK_ORDER").save()
    redis_client.set(lease_key(prefix), "host-a:41:w/abc", px=3000)
    redis_client.set(first_start_key(prefix), f"{time.time():.0f}")  # a worker has started
    exported = {name for name, _ in scrape(registry)}
    rules, panels = rule_exprs(), dashboard_exprs()
    assert len(rules) >= 8 and len(panels) >= 10
    for expr in rules + panels:
        missing = metric_names(expr) - exported - PROMETHEUS_OWN
        assert not missing, (expr, missing)


def test_every_alert_has_a_summary_a_severity_and_a_duration() -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    alerts = [r for group in rules["groups"] for r in group["rules"] if "alert" in r]
    names = {a["alert"] for a in alerts}
    assert {"MesDeadLettersOpen", "MesWorkorderQueueLag", "MesOutboxStale", "MesNoActiveConsumer",
            "MesAuditStale", "MesAuditFindings", "MesTaskFailRate"} <= names  # fmt: skip
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert alert["annotations"]["summary"] and "for" in alert, alert["alert"]


def test_prometheus_scrapes_the_metrics_service_and_loads_the_rules() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]  # beside the config, in a checkout and in compose
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mes_tasks")
    assert job["static_configs"][0]["targets"] == ["metrics:9808"]
    assert job["metrics_path"] == "/metrics"
