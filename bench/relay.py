"""The send path and the outbox relay through outages and backlogs: one code base against another,
side by side on the same machine, in rounds that alternate them.

    python bench/relay.py [--before REV] [--updates N] [--outage N] [--big N] [--rounds N] [--what W,W]

``--before`` (default ``HEAD``) is checked out from git into a temporary directory; the other
side is this working tree. For each side, in its own processes (so each imports its own
``mes_tasks``), on a Redis of its own and a shared SecantusDB (or ``MONGODB_URI``):

1. **backlog**: ``--updates`` updates enqueued in batches of 1,000, then one solo worker
   applies them all, once without the relay (``backlog-alone``) and once with it running as
   beat runs it (``backlog``, every ``MES_OUTBOX_RELAY_INTERVAL_S``): the worker's rate in
   each, and the relay's run times;
2. **outage**: a worker and the relay running, Redis stopped, ``--outage`` updates submitted
   in scanner bursts of 100 (each burst's answer time), Redis started again, and the time
   until every one of them is applied;
3. **big batch**: one ``submit_quantity_updates`` of ``--big`` items: the caller's time and
   the producer's peak RSS.

Prints one JSON line per measurement and a summary with the after/before ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # devtools (not installed); a side's mes_tasks comes first, from PYTHONPATH
WORK_ORDERS = [f"R-{i:03d}" for i in range(20)]
ENQUEUE_BATCH = 1000
BURST = 100
DRAIN_TIMEOUT_S = 180.0  # a side that has not drained by then is measured on what it applied


def items(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"work_order_id": WORK_ORDERS[i % len(WORK_ORDERS)], "kind": "input", "quantity": 1,
             "request_id": f"{prefix}:{i}", "context": {"barcode": f"BC{i}", "source": "BENCH"}}
            for i in range(n)]  # fmt: skip


# ---- the driver: one measurement of one side, in a process that imports that side's mes_tasks


class Stack:
    """A Redis of this side's own, the shared SecantusDB, a worker, and beat's relay as a thread."""

    def __init__(self, root: Path, base: Path) -> None:
        from devtools.devserver import free_port, redis_service

        port = free_port()
        self.redis = redis_service(base / "redis", port, base / "redis.log").start()
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/3"
        self.root, self.base, self.worker, self.stop_relay = root, base, None, threading.Event()
        self.runs: list[float] = []
        from mes_tasks import db
        from mes_tasks.models import ALL_MODELS, WorkOrder
        from mes_tasks.settings import get_settings

        db.prepare(get_settings())
        for model in ALL_MODELS:
            model._get_collection().drop()
            model.ensure_indexes()
        WorkOrder._get_collection().insert_many(
            [{"_id": wo, "input_qty": 0, "output_qty": 0} for wo in WORK_ORDERS]
        )

    def start_worker(self) -> None:
        from devtools.devserver import worker_argv
        from devtools.process import Child

        env = {**os.environ, "PYTHONPATH": f"{self.root}{os.pathsep}{REPO}"}
        self.worker = Child("worker", worker_argv(), self.base / "worker.log", env=env,
                            cwd=self.root).start()  # fmt: skip
        if not self.worker.wait_for("ready", 60):
            raise RuntimeError(self.worker.log_text()[-2000:])

    def start_relay(self) -> None:
        from mes_tasks.settings import get_settings
        from mes_tasks.tasks import relay_outbox

        interval = get_settings().outbox_relay_interval_s

        def beat() -> None:
            while not self.stop_relay.wait(max(0.0, interval - (self.runs[-1] if self.runs else 0))):
                started = time.monotonic()
                with contextlib.suppress(Exception):  # a store is down: beat's next run tries again
                    relay_outbox()
                self.runs.append(time.monotonic() - started)

        threading.Thread(target=beat, daemon=True).start()

    def applied(self) -> int:
        from mes_tasks.models import QuantityLog

        return int(QuantityLog._get_collection().estimated_document_count())

    def drained(self, n: int) -> float:
        """Seconds from now until ``n`` updates are applied (or the drain timeout)."""
        started, deadline = time.monotonic(), time.monotonic() + DRAIN_TIMEOUT_S
        while self.applied() < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return time.monotonic() - started

    def close(self) -> None:
        self.stop_relay.set()
        if self.worker is not None:
            self.worker.stop()
        self.redis.stop()


def backlog(stack: Stack, n: int, relay: bool) -> dict[str, Any]:
    from mes_tasks.send.producer import submit_quantity_updates

    todo, started = items(n, "backlog"), time.monotonic()
    for at in range(0, n, ENQUEUE_BATCH):
        submit_quantity_updates(todo[at : at + ENQUEUE_BATCH])
    enqueue_s = time.monotonic() - started
    if relay:
        stack.start_relay()
    stack.start_worker()
    drain_s = stack.drained(n)
    runs = sorted(stack.runs)
    return {"enqueue_s": enqueue_s, "drain_s": drain_s, "worker_per_s": stack.applied() / drain_s,
            "relay_runs": len(runs), "relay_run_mean_s": sum(runs) / len(runs) if runs else None,
            "relay_run_max_s": runs[-1] if runs else None}  # fmt: skip


def outage(stack: Stack, n: int) -> dict[str, Any]:
    from mes_tasks.send.producer import submit_quantity_updates

    stack.start_worker()
    stack.start_relay()
    stack.redis.stop()
    answers: list[float] = []
    for at in range(0, n, BURST):
        started = time.monotonic()
        submit_quantity_updates(items(n, "outage")[at : at + BURST])
        answers.append(time.monotonic() - started)
    stack.redis.start()
    back_s = stack.drained(n)
    return {"burst_answer_mean_s": sum(answers) / len(answers), "burst_answer_max_s": max(answers),
            "applied": stack.applied(), "apply_after_back_s": back_s}  # fmt: skip


def big_batch(stack: Stack, n: int) -> dict[str, Any]:
    from mes_tasks.send.producer import submit_quantity_updates

    started = time.monotonic()
    codes: dict[str, int] = {}
    for answer in submit_quantity_updates(items(n, "big")):
        codes[answer["code"]] = codes.get(answer["code"], 0) + 1
    took = time.monotonic() - started
    return {
        "caller_s": took,
        "codes": codes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def drive(args: argparse.Namespace) -> None:
    stack = Stack(Path(args.root), Path(tempfile.mkdtemp(prefix="bench-relay-")))
    try:
        if args.drive == "backlog":
            result = backlog(stack, args.updates, relay=True)
        elif args.drive == "backlog-alone":
            result = backlog(stack, args.updates, relay=False)
        elif args.drive == "outage":
            result = outage(stack, args.outage)
        else:
            result = big_batch(stack, args.big)
    finally:
        stack.close()
        shutil.rmtree(stack.base, ignore_errors=True)
    import mes_tasks

    print(json.dumps({**result, "code": str(Path(mes_tasks.__file__).parent.parent)}))


# ---- the orchestrator


def start_mongo(base: Path) -> list[Any]:
    """SecantusDB, shared by both sides, unless MONGODB_URI names a server (each side starts a Redis)."""
    from devtools.devserver import free_port, mongo_service, secantus_uri

    if os.environ.get("MONGODB_URI"):
        return []
    port = free_port()
    os.environ["MONGODB_URI"] = secantus_uri(port, "mes_bench_relay")
    return [mongo_service(base / "mongo", port, base / "mongo.log").start()]


def checkout(rev: str) -> Path:
    """``mes_tasks`` and the checkout's Celery settings at ``rev``, in a directory of their own."""
    root = Path(tempfile.mkdtemp(prefix="bench-before-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "mes_tasks", "celeryconfig.py"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def measure(root: Path, what: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}"}
    argv = [sys.executable, str(BENCH / "relay.py"), "--drive", what, "--root", str(root),
            "--updates", str(args.updates), "--outage", str(args.outage),
            "--big", str(args.big)]  # fmt: skip
    out = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{what} on {root} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD")
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--outage", type=int, default=900)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--what", default="backlog-alone,backlog,outage,big")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args)
        return 0
    servers = start_mongo(Path(tempfile.mkdtemp(prefix="bench-relay-servers-")))
    sides = {"before": checkout(args.before), "after": REPO}
    try:
        for r in range(args.rounds):
            for what in args.what.split(","):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for side in order:
                    row = {"round": r, "what": what, "side": side, **measure(sides[side], what, args)}
                    print(json.dumps(row), flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(sides["before"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
