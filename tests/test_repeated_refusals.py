"""A refused update sent again while its dead letter is open is a duplicate of that refusal.

One dead letter, one ``dead_lettered`` count; the demo's summary, the metrics and
``failed list`` say the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery.bin.celery import celery
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Worker, make_work_orders, wait_until
from devtools import demo
from mes_tasks.keys import update_counts_key
from mes_tasks.models import FailedUpdate
from mes_tasks.ops.metrics import registry_for
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import Settings
from mes_tasks.tally import Tally
from mes_tasks.tasks import update_quantity
from mes_tasks.worker.state import STATE

RUN = "rep"
GOOD = {"work_order_id": "WO-1", "kind": "output", "quantity": 2, "request_id": f"demo:{RUN}:1"}
BAD = {"work_order_id": "WO-MISSING", "kind": "output", "quantity": 1, "request_id": f"demo:{RUN}:2"}


def outcome_totals(registry_text: str) -> dict[str, float]:
    """The worker's outcome counters as a scrape shows them, dead letters summed over codes."""
    totals = {"applied": 0.0, "duplicate": 0.0, "dead_lettered": 0.0}
    for family in text_string_to_metric_families(registry_text):
        for sample in family.samples:
            for outcome in totals:
                if sample.name == f"mes_updates_{outcome}_total":
                    totals[outcome] += sample.value
    return totals


def failed_list() -> list[dict[str, Any]]:
    result = CliRunner().invoke(
        celery, ["-A", "mes_tasks", "failed", "list", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    listed: list[dict[str, Any]] = json.loads(result.output)
    return listed


def test_a_refused_scan_sent_three_times_is_one_dead_letter_and_two_duplicates_everywhere(
    redis_client: redis.Redis, settings: Settings, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    start_worker()
    scans = [GOOD, BAD, GOOD, BAD, BAD]
    results = [submit_quantity_update(**scan) for scan in scans]
    counts_key = update_counts_key(settings.key_prefix)
    wait_until(
        lambda: sum(int(n) for n in redis_client.hgetall(counts_key).values()) == len(scans),
        30,
        "the worker's outcome of every scan",
    )

    summary = demo.summarise(RUN, scans, results)
    assert summary == {"sent": 5, "queued": 5, "applied": 1, "duplicates": 3, "refused": 0, "failed": 1}
    scraped = outcome_totals(generate_latest(registry_for(redis_client, settings.key_prefix)).decode())
    assert scraped == {"applied": 1, "duplicate": 3, "dead_lettered": 1}
    listed = failed_list()
    assert [(r["request_id"], r["error_code"], r["attempts"]) for r in listed] == [
        (BAD["request_id"], "UNKNOWN_WORK_ORDER", 1)
    ]
    record = FailedUpdate.objects.get(request_id=BAD["request_id"])
    assert [e["event"] for e in record.history] == ["failed", "repeated", "repeated"]


@pytest.fixture()
def in_process(redis_client: redis.Redis) -> Iterator[Tally]:
    """This process as a worker: the task's own code against the test servers, a fresh tally."""
    STATE.tally = Tally()
    yield STATE.tally
    kept = STATE.kept_locks
    if kept is not None:
        kept.release_all()
    STATE._ledger = None  # its MongoDB client is closed when the next test connects again


def test_a_retried_dead_letter_that_fails_again_is_a_new_failure(in_process: Tally) -> None:
    assert update_quantity.apply(args=["WO-NOPE", "input", 1], kwargs={"request_id": "again"}).failed()
    FailedUpdate.objects(request_id="again").update_one(set__status="retried")  # as `failed retry` does
    assert update_quantity.apply(args=["WO-NOPE", "input", 1], kwargs={"request_id": "again"}).failed()
    record = FailedUpdate.objects.get(request_id="again")
    assert (record.status, record.attempts) == ("open", 2)
    assert in_process.counts == {"dead_lettered:UNKNOWN_WORK_ORDER": 2}
