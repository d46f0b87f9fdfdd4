"""Every workorder queue is measured and watched: leftovers of another N, per-queue pauses, and a
queue with updates waiting and no holder, in the metrics and in the rules promtool evaluates."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
import yaml
from test_metrics import Samples, scrape, value
from test_prometheus_rules import RULES, STEP_S, TARGET, TEST_NOW_S, input_series, promtool, run, series_name
from test_queues import send_as_four_partitions

from mes_tasks.app import app
from mes_tasks.keys import lease_key, pause_key, update_counts_key
from mes_tasks.models import OutboxMessage, utcnow
from mes_tasks.ops.doctor import FAIL, OK, Context, check_unconsumed
from mes_tasks.ops.metrics import registry_for
from mes_tasks.settings import Settings, get_settings
from mes_tasks.tally import Tally
from mes_tasks.worker.state import STATE

__all__ = ["promtool"]  # a fixture
WOS = [f"A-{i:02d}" for i in range(12)]
UNCONSUMED_SUMMARY = "workorder.3 has updates waiting and no worker holding it"
LAG_S = 90.0  # the age every waiting update is given: "1m 30s" in the alert's summary


def fill_four_partitions(env_override: Callable[..., None]) -> dict[str, int]:
    """Updates a producer on MES_PARTITIONS=4 sent, 90 s ago; per queue."""
    per_queue = send_as_four_partitions(env_override, WOS, "a")
    OutboxMessage.objects.update(set__created_at=utcnow() - timedelta(seconds=90))
    return per_queue


def test_a_collector_on_two_partitions_measures_the_leftovers_and_each_queues_pause(
    mongo: Any, redis_client: redis.Redis, settings: Settings, env_override: Callable[..., None]
) -> None:
    STATE.tally = Tally()
    per_queue = fill_four_partitions(env_override)
    registry = registry_for(redis_client, settings.key_prefix, partitions=2)
    redis_client.set(pause_key(settings.key_prefix, "workorder.1"), json.dumps({"at": "now"}))
    redis_client.set(lease_key(settings.key_prefix, "workorder.0"), "host-a:41:w/abc", px=5000)
    first = scrape(registry)
    assert value(first, "mes_queue_waiting", queue="workorder.3") == per_queue["workorder.3"]
    assert value(first, "mes_queue_oldest_age_seconds", queue="workorder.3") > 80
    assert value(first, "mes_queue_paused", queue="workorder.1") == 1
    assert value(first, "mes_queue_paused", queue="workorder.0") == 0
    assert value(first, "mes_workorder_paused") == 0
    assert ("mes_queue_waiting", frozenset({("queue", "workorder.7")})) not in first  # empty, no N's
    time.sleep(0.3)
    again = scrape(registry)
    unconsumed = {q: value(again, "mes_queue_unconsumed_seconds", queue=q) for q in per_queue}
    assert unconsumed["workorder.3"] > 0 and unconsumed["workorder.0"] == 0  # held
    assert unconsumed["workorder.1"] == 0  # paused: waiting on purpose


def lag_test(samples: Samples, now: float) -> dict[str, Any]:
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "MesWorkorderQueueLag")  # fmt: skip
    waiting = sorted(dict(labels)["queue"] for (name, labels), v in samples.items()
                     if name == "mes_queue_oldest_age_seconds" and v > 60)  # fmt: skip
    paused = {
        dict(labels)["queue"] for (name, labels), v in samples.items() if name == "mes_queue_paused" and v
    }
    fires = [q for q in waiting if q not in paused]
    samples = {
        k: LAG_S if k[0] == "mes_queue_oldest_age_seconds" and v > 60 else v for k, v in samples.items()
    }
    notes = rule["annotations"]
    alerts = [{"exp_labels": {**rule["labels"], **TARGET, "queue": q},
               "exp_annotations": {"summary": f"The oldest waiting update in {q} is 1m 30s old",
                                   "description": notes["description"]}} for q in fires]  # fmt: skip
    case = {"eval_time": f"{(TEST_NOW_S + 3 * 60) // 60}m", "alertname": rule["alert"], "exp_alerts": alerts}
    return {"interval": f"{STEP_S}s", "input_series": input_series(samples, now, TEST_NOW_S + 5 * 60),
            "alert_rule_test": [case]}  # fmt: skip


def check(promtool: str, tmp_path: Path, *tests: dict[str, Any]) -> None:
    spec = {"rule_files": [str(RULES)], "evaluation_interval": f"{STEP_S}s", "tests": list(tests)}
    path = tmp_path / "queue_alerts_test.yml"
    path.write_text(yaml.safe_dump(spec))
    checked = run(promtool, "test", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_lag_alert_watches_every_workorder_queue_but_a_paused_one(
    promtool: str,
    tmp_path: Path,
    mongo: Any,
    redis_client: redis.Redis,
    settings: Settings,
    env_override: Callable[..., None],
) -> None:
    STATE.tally = Tally()
    per_queue = fill_four_partitions(env_override)
    paused = sorted(per_queue)[0]
    redis_client.set(pause_key(settings.key_prefix, paused), json.dumps({"at": "now"}))
    samples = scrape(registry_for(redis_client, settings.key_prefix, partitions=2))
    test = lag_test(samples, time.time())
    fired = {a["exp_labels"]["queue"] for a in test["alert_rule_test"][0]["exp_alerts"]}
    assert fired == set(per_queue) - {paused}  # leftovers too, and not the paused one
    check(promtool, tmp_path, test)


def test_a_queue_unconsumed_for_more_than_five_seconds_alerts(promtool: str, tmp_path: Path) -> None:
    growing = {"series": series_name("mes_queue_unconsumed_seconds", {"queue": "workorder.3"}),
               "values": "0+60x10"}  # fmt: skip
    consumed = {"series": series_name("mes_queue_unconsumed_seconds", {"queue": "workorder.0"}),
                "values": "0+0x10"}  # fmt: skip
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "MesQueueUnconsumed")  # fmt: skip
    cases = [
        {"eval_time": "0m", "alertname": "MesQueueUnconsumed", "exp_alerts": []},
        {"eval_time": "1m", "alertname": "MesQueueUnconsumed",
         "exp_alerts": [{"exp_labels": {**rule["labels"], **TARGET, "queue": "workorder.3"},
                         "exp_annotations": {"summary": UNCONSUMED_SUMMARY,
                                             "description": rule["annotations"]["description"]}}]},
    ]  # fmt: skip
    check(
        promtool, tmp_path, {"interval": "1m", "input_series": [growing, consumed], "alert_rule_test": cases}
    )


def test_a_flush_redis_refuses_in_part_is_not_kept_to_count_its_other_fields_twice(
    redis_client: redis.Redis, settings: Settings
) -> None:
    tally, key = Tally(), update_counts_key(settings.key_prefix)
    redis_client.hset(key, "applied", "not a number")  # HINCRBY on it fails, the rest run
    tally.add("applied")
    tally.add("duplicate")
    assert not tally.flush(redis_client, settings.key_prefix)
    redis_client.hset(key, "applied", "0")
    tally._retry_at = 0
    tally.add("applied")
    assert tally.flush(redis_client, settings.key_prefix)
    assert redis_client.hgetall(key) == {"applied": "1", "duplicate": "1"}


def test_doctor_fails_a_queue_with_updates_waiting_and_no_holder_leftovers_included(
    mongo: Any, redis_client: redis.Redis, settings: Settings, env_override: Callable[..., None]
) -> None:
    per_queue = fill_four_partitions(env_override)
    env_override(MES_PARTITIONS="2")
    prefix = get_settings().key_prefix
    for queue in sorted(per_queue)[:-1]:  # every queue held but the last leftover
        redis_client.set(lease_key(prefix, queue), "host-a:41:w/abc", px=60_000)
    ctx = Context(get_settings(), app, redis=redis_client)
    [check] = check_unconsumed(ctx)
    last = sorted(per_queue)[-1]
    assert check.status == FAIL and f"{last} ({per_queue[last]} waiting)" in check.detail, check
    redis_client.set(pause_key(prefix, last), json.dumps({"at": "now"}))  # waiting on purpose
    assert check_unconsumed(ctx)[0].status == OK
