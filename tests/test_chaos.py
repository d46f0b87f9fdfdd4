"""The chaos run in the suite: every fault once, on default settings, while updates flow.

``make chaos`` injects each fault three times; this shorter form keeps the same goal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from devtools.chaosfaults import FAULTS

CHAOS_TIMEOUT_S = 540  # about two minutes on a 2-core machine; failing faults wait 15 s each


@pytest.mark.slow
@pytest.mark.timeout(CHAOS_TIMEOUT_S + 30)
def test_under_every_fault_no_update_is_lost_or_counted_twice_and_each_fault_checks_out() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MES_", "REDIS_URL", "MONGODB_URI"))}
    run = subprocess.run(
        # The 5 s recovery goal is `make chaos`'s to judge, on a quiet machine; here a busy CI
        # machine must not turn a slow second into a red build. Every other check still holds.
        [sys.executable, "-m", "devtools.chaos", "--repeat", "1", "--rate", "15", "--recovery-wait", "15",
         "--no-recovery-goal"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CHAOS_TIMEOUT_S,
    )  # fmt: skip
    print(run.stdout, run.stderr[-5000:])
    totals_line = next(line for line in run.stdout.splitlines() if line.startswith("accepted="))
    totals = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", totals_line)}
    assert (totals["lost"], totals["double_counted"], totals["audit_findings"]) == (0, 0, 0)
    assert totals["dead_lettered"] == totals["producer_refused"] == 0
    assert totals["bad_accounted"] == totals["bad_sent"] > 0
    assert totals["duplicates_suppressed"] >= totals["duplicates_sent"] > 0
    for fault in FAULTS.values():
        assert re.search(rf"^{re.escape(fault.name)}\s+1\s", run.stdout, re.MULTILINE), fault.name
    assert run.returncode == 0, "a fault's own check failed (see the lines above)"
