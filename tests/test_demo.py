"""`make demo` against the test servers and a real worker: every scan accounted for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from conftest import Worker
from devtools import demo
from mes_tasks.db import Mongo


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
    assert demo.main(["--count", "80", "--rate", "400", "--producers", "2", "--seed", "5"]) == 0
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
