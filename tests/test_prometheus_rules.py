"""promtool on deploy/prometheus/: both configs and the rules check, and MesAuditStale agrees with doctor.

The audit-stale tests scrape the real collector on the test stores, turn the scrape into
``promtool test rules`` input series and let promtool evaluate the shipped rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mongoengine
import pytest
import redis
import yaml
from test_metrics import Samples, scrape

from conftest import REPO
from devtools.devserver import DEV_METRICS_PORT
from mes_tasks.app import app, prepare_worker
from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.reports import audit_and_report
from mes_tasks.keys import first_start_key
from mes_tasks.models import AuditReport
from mes_tasks.ops.doctor import AUDIT_MAX_AGE, INFO, OK, WARN, Context, check_audit
from mes_tasks.ops.metrics import registry_for
from mes_tasks.settings import Settings

PROMTOOL_MISSING = "install Debian's prometheus package (apt-get install prometheus) for promtool"
PROMETHEUS_DIR = REPO / "deploy/prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
COMPOSE_CONFIG, LOCAL_CONFIG = PROMETHEUS_DIR / "prometheus.yml", PROMETHEUS_DIR / "local.yml"
PROMTOOL_TIMEOUT_S = 120
TARGET = {"instance": "metrics:9808", "job": "mes_tasks"}  # the labels Prometheus adds to a scrape
# Where the scrape's wall-clock "now" falls on promtool's clock, which starts at 0: well past
# the stale window, so that an audit timestamp of 0 ("never") alone would look stale.
TEST_NOW_S = 4 * 24 * 3600
STEP_S = 60  # input series and rule evaluation, every minute
STALE_S = AUDIT_MAX_AGE.total_seconds()  # doctor's rule
NEW_S = 11 * 60  # "11 minutes after the start": past the alert's `for: 10m`
OLD_S = STALE_S + 15 * 60  # past the stale window and the alert's `for`
HOUR_S = 3600


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(PROMTOOL_MISSING)
        pytest.skip(PROMTOOL_MISSING)
    return path


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False
    )


# -- the configs and the rules, as a checkout has them ------------------------------------------


@pytest.mark.parametrize("config", [COMPOSE_CONFIG, LOCAL_CONFIG], ids=lambda p: p.name)
def test_each_config_passes_promtool_check_config_from_any_directory(
    promtool: str, config: Path, tmp_path: Path
) -> None:
    checked = run(promtool, "check", "config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_the_rules_pass_promtool_check_rules(promtool: str) -> None:
    checked = run(promtool, "check", "rules", str(RULES), cwd=REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_local_config_scrapes_make_runs_endpoint_with_the_same_job_and_rules() -> None:
    local, compose = (yaml.safe_load(p.read_text()) for p in (LOCAL_CONFIG, COMPOSE_CONFIG))
    assert local["rule_files"] == compose["rule_files"] == ["rules.yml"]
    job = next(j for j in local["scrape_configs"] if j["job_name"] == "mes_tasks")
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{DEV_METRICS_PORT}"]
    same = next(j for j in compose["scrape_configs"] if j["job_name"] == "mes_tasks")
    assert {k: v for k, v in job.items() if k != "static_configs"} == {
        k: v for k, v in same.items() if k != "static_configs"
    }


# -- MesAuditStale on the collector's output ----------------------------------------------------


def series_name(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted({**labels, **TARGET}.items()))
    return f"{name}{{{inner}}}"


def input_series(samples: Samples, now: float, until_s: float) -> list[dict[str, str]]:
    """The scrape as constant series on promtool's clock; timestamps moved so that ``now`` is TEST_NOW_S.

    A timestamp of 0 means "never" and stays 0.
    """
    steps = int(until_s // STEP_S) + 1
    shift = now - TEST_NOW_S
    out = [{"series": series_name("up", {}), "values": f"1+0x{steps}"}]
    for (name, labels), value in sorted(samples.items(), key=str):
        if name.endswith("_timestamp_seconds") and value:
            value -= shift
        out.append({"series": series_name(name, dict(labels)), "values": f"{value:f}+0x{steps}"})
    return out


def audit_stale_rule() -> dict[str, Any]:
    rules = yaml.safe_load(RULES.read_text())
    return next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "MesAuditStale")


def firing() -> list[dict[str, Any]]:
    rule = audit_stale_rule()
    return [{"exp_labels": {**rule["labels"], **TARGET}, "exp_annotations": rule["annotations"]}]


def assert_alert(
    promtool: str, tmp_path: Path, samples: Samples, now: float, expect: dict[float, bool]
) -> None:
    """MesAuditStale, as promtool evaluates the shipped rules, fires (or not) at each time after ``now``."""
    until = TEST_NOW_S + max(expect)
    cases = [
        {"eval_time": f"{int((TEST_NOW_S + after) // 60)}m", "alertname": "MesAuditStale",
         "exp_alerts": firing() if fires else []}
        for after, fires in expect.items()
    ]  # fmt: skip
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": f"{STEP_S}s",
        "tests": [{"interval": f"{STEP_S}s", "input_series": input_series(samples, now, until),
                   "alert_rule_test": cases}],
    }  # fmt: skip
    path = tmp_path / "audit_stale_test.yml"
    path.write_text(yaml.safe_dump(test))
    checked = run(promtool, "test", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def start_a_worker() -> None:
    """Record the deployment's start as a starting worker does (its ``worker_init`` handler)."""
    prepare_worker()


def run_an_audit(client: redis.Redis, settings: Settings, tmp_path: Path, hours_ago: float = 0) -> None:
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    audit_and_report(Ledger(mongoengine.connection.get_connection(), client, quiet))
    if hours_ago:
        when = datetime.fromtimestamp(time.time() - hours_ago * HOUR_S, UTC)
        AuditReport._get_collection().update_many({}, {"$set": {"started_at": when, "finished_at": when}})


def scrape_now(client: redis.Redis, settings: Settings) -> tuple[Samples, float]:
    samples = scrape(registry_for(client, settings.key_prefix))
    return samples, time.time()


def doctor_says(client: redis.Redis, settings: Settings) -> str:
    ctx = Context(settings, app, redis=client, mongo=mongoengine.connection.get_connection())
    return next(c.status for c in check_audit(ctx) if c.name == "last audit")


@pytest.mark.parametrize(
    ("started_h_ago", "audited_h_ago", "doctor", "fires"),
    [
        (None, None, INFO, False),  # no worker has started here yet
        (0, None, INFO, False),  # a new deployment, before its first audit
        (72, None, WARN, True),  # three days old, never audited
        (0, 0, OK, False),
        (72, 48, WARN, True),  # the last audit is two days old
        (72, 0, OK, False),
    ],
)
def test_the_audit_stale_alert_fires_exactly_when_doctor_warns(
    promtool: str,
    services: redis.Redis,
    settings: Settings,
    tmp_path: Path,
    started_h_ago: float | None,
    audited_h_ago: float | None,
    doctor: str,
    fires: bool,
) -> None:
    if started_h_ago == 0:
        start_a_worker()
    elif started_h_ago is not None:  # backdated, as the first worker would have written it
        services.set(first_start_key(settings.key_prefix), f"{time.time() - started_h_ago * HOUR_S:.0f}")
    if audited_h_ago is not None:
        run_an_audit(services, settings, tmp_path, audited_h_ago)
    assert doctor_says(services, settings) == doctor
    samples, now = scrape_now(services, settings)
    assert_alert(promtool, tmp_path, samples, now, {NEW_S: fires})


def test_a_new_deployment_turns_stale_only_after_a_day_and_its_slack_without_an_audit(
    promtool: str, services: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    samples, now = scrape_now(services, settings)  # nothing has started: never stale
    assert_alert(promtool, tmp_path, samples, now, {NEW_S: False, OLD_S: False})
    start_a_worker()
    assert services.get(first_start_key(settings.key_prefix))
    samples, now = scrape_now(services, settings)
    assert_alert(promtool, tmp_path, samples, now, {NEW_S: False, STALE_S - 15 * 60: False, OLD_S: True})
    run_an_audit(services, settings, tmp_path)
    samples, now = scrape_now(services, settings)
    assert_alert(promtool, tmp_path, samples, now, {NEW_S: False, OLD_S: True})  # that audit is old by then


# -- MesHttpServerErrors ------------------------------------------------------------------------


@pytest.mark.parametrize(("errors_per_min", "fires"), [(0, False), (1, False), (3, True)])
def test_the_gateway_alert_fires_when_more_than_5_percent_of_answers_are_5xx(
    promtool: str, tmp_path: Path, errors_per_min: int, fires: bool
) -> None:
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "MesHttpServerErrors")  # fmt: skip
    route = {"method": "POST", "route": "/api/workorder/update-quantity"}
    series = [
        {"series": series_name("mes_http_requests_total", {**route, "status": "202"}), "values": "0+40x30"},
        {"series": series_name("mes_http_requests_total", {**route, "status": "503"}),
         "values": f"0+{errors_per_min}x30"},
    ]  # fmt: skip
    expected = [{"exp_labels": dict(rule["labels"]), "exp_annotations": {}}] if fires else []
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": f"{STEP_S}s",
        "tests": [{"interval": f"{STEP_S}s", "input_series": series, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "MesHttpServerErrors", "exp_alerts": expected}]}],
    }  # fmt: skip
    if fires:  # promtool compares every annotation; the value is the 5xx share at 20 m
        share = errors_per_min / (errors_per_min + 40)
        expected[0]["exp_annotations"] = {
            "summary": f"{share * 100:.4g}% of the HTTP gateway's answers are 5xx",
            "description": rule["annotations"]["description"],
        }
    path = tmp_path / "http_errors_test.yml"
    path.write_text(yaml.safe_dump(test))
    checked = run(promtool, "test", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- MesVerify* ----------------------------------------------------------------------------------

VERIFY_ALERTS = ("MesVerifyDrift", "MesVerifyUnexplained", "MesVerifyStale")


def assert_verify_alerts(
    promtool: str, tmp_path: Path, samples: Samples, now: float, firing: set[str]
) -> None:
    """Of the verification alerts, exactly ``firing`` fire 11 minutes and 2 days after ``now``."""
    rules = {
        r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    drift = samples[("mes_verify_drift_work_orders", frozenset())]
    summaries = {"MesVerifyDrift": f"Continuous verification found {drift:g} work order(s) whose counters "
                                   "differ from their logs"}  # fmt: skip
    cases = [
        {"eval_time": f"{int((TEST_NOW_S + after) // 60)}m", "alertname": name, "exp_alerts": [
            {"exp_labels": {**rules[name]["labels"], **TARGET},
             "exp_annotations": {**rules[name]["annotations"], "summary": summaries.get(name, "")}}
        ] if name in firing else []}
        for after in (NEW_S, 2 * 24 * HOUR_S) for name in VERIFY_ALERTS
    ]  # fmt: skip
    series = input_series(samples, now, TEST_NOW_S + 2 * 24 * HOUR_S)
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": f"{STEP_S}s",
        "tests": [{"interval": f"{STEP_S}s", "input_series": series, "alert_rule_test": cases}],
    }
    path = tmp_path / "verify_test.yml"
    path.write_text(yaml.safe_dump(test))
    checked = run(promtool, "test", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_verification_alert_on_a_new_deployment_and_drift_fires_at_once(
    promtool: str, services: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    from conftest import make_work_orders
    from mes_tasks.models import WorkOrder
    from mes_tasks.tasks import verify_once

    start_a_worker()
    samples, now = scrape_now(services, settings)  # no pass yet: nothing to say
    assert_verify_alerts(promtool, tmp_path, samples, now, set())
    make_work_orders(["WO-P1"])
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    mongo = mongoengine.connection.get_connection()
    verify_once(mongo, quiet)
    samples, now = scrape_now(services, settings)  # a clean pass
    assert_verify_alerts(promtool, tmp_path, samples, now, set())
    WorkOrder._get_collection().update_one({"_id": "WO-P1"}, {"$inc": {"output_qty": 2}})
    verify_once(mongo, quiet)
    samples, now = scrape_now(services, settings)
    assert_verify_alerts(promtool, tmp_path, samples, now, {"MesVerifyDrift"})
