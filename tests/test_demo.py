"""`make demo` against the test servers and a real worker: every scan accounted for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from conftest import Worker, wait_until
from devtools import demo
from mes_tasks.db import Mongo
from mes_tasks.keys import update_counts_key
from mes_tasks.settings import get_settings
from mes_tasks.tally import APPLIED, DEAD_LETTERED, DUPLICATE


def test_the_plan_mixes_duplicates_and_bad_scans() -> None:
    scans = demo.plan("r", 400, dup_share=0.2, bad_share=0.1, seed=3)
    ids = [s["request_id"] for s in scans]
    assert 40 < len(ids) - len(set(ids)) < 120
    assert any(s["quantity"] == 0 or s["work_order_id"] == "DEMO-MISSING" for s in scans)


def test_the_demo_accounts_for_every_scan_and_its_audit_is_clean(
    mongo: Mongo,
    redis_client: redis.Redis,
    start_worker: Callable[..., Worker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_worker()
    # seed 1, `make demo`'s own: two of its bad scans are sent again (unknown work order)
    assert demo.main(["--count", "80", "--rate", "400", "--producers", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    summary = dict(
        item.split("=")
        for item in next(line for line in out.splitlines() if line.startswith("sent=")).split()
    )
    counts = {k: int(v) for k, v in summary.items()}
    assert counts["sent"] == 80 == counts["queued"] + counts["refused"]
    assert counts["queued"] == counts["applied"] + counts["duplicates"] + counts["failed"]
    assert counts["duplicates"] > 0 and counts["refused"] > 0 and counts["failed"] > 0
    assert "0 finding(s)" in out
    outcomes = worker_outcomes(redis_client, counts["queued"])
    assert outcomes == {k: counts[k] for k in ("applied", "duplicates", "failed")}  # the metrics agree


def worker_outcomes(client: redis.Redis, queued: int) -> dict[str, int]:
    """The worker's outcome counters once it has flushed one per queued scan, named as the demo's."""
    key = update_counts_key(get_settings().key_prefix)

    def outcomes() -> dict[str, int]:
        counted = {field: int(n) for field, n in client.hgetall(key).items()}
        dead = sum(n for field, n in counted.items() if field.startswith(f"{DEAD_LETTERED}:"))
        return {"applied": counted.get(APPLIED, 0), "duplicates": counted.get(DUPLICATE, 0), "failed": dead}

    wait_until(lambda: sum(outcomes().values()) >= queued, 10, "the worker to count every scan")
    return outcomes()
