"""The chaos run in the suite: every fault in turn while updates flow; nothing lost or counted twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO
from mes_tasks.chaos import FAULTS

CHAOS_TIMEOUT_S = 600


def test_under_every_fault_no_update_is_lost_or_counted_twice_and_the_audit_is_clean() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MES_", "REDIS_URL", "MONGODB_URI"))}
    run = subprocess.run(
        [sys.executable, "-m", "mes_tasks.chaos", "--updates", "3000", "--rate", "20"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CHAOS_TIMEOUT_S,
    )  # fmt: skip
    print(run.stdout, run.stderr[-3000:])
    totals = dict(re.findall(r"(\w+)=(\d+)", run.stdout.strip().splitlines()[-1]))
    assert run.returncode == 0
    assert (totals["lost"], totals["double_counted"], totals["audit_findings"]) == ("0", "0", "0")
    assert totals["bad_accounted"] == totals["bad_sent"] != "0"
    assert int(totals["duplicates_suppressed"]) >= int(totals["duplicates_sent"]) > 0
    for name in FAULTS.values():
        assert re.search(rf"^{re.escape(name)}\s+1\s", run.stdout, re.MULTILINE), name
