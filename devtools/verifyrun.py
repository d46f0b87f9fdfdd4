"""A long run of continuous verification on its defaults, as a plant would see it.

    python -m devtools.verifyrun [--minutes 30] [--rate 100] [--injections 20] [--work-orders 16]

Starts its own Redis and SecantusDB, the ``workorder`` worker, the ``audit`` worker and beat
(every setting at its default: a pass every 30 s), and submits updates at ``--rate``. Every
``minutes / injections`` it changes one work order behind mes_tasks's back, by each of three
means in turn: a direct ``$inc`` of a counter, a deleted log, the counter restored from a
copy taken 10 s before. It times each until a pass reports that work order, then repairs
it (``audit.checks.repair``, fenced) and waits for a pass to see it clean. Anything else a
pass reports (another work order, an unexplained update) is a false alarm. Exit 0 when
every injection was found within ``GOAL_S`` and nothing else was reported.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from devtools.devserver import (
    beat_argv,
    free_port,
    mongo_service,
    redis_service,
    secantus_uri,
    worker_argv,
)
from devtools.process import Child

GOAL_S = 60.0
FOUND_TIMEOUT_S = 180.0
RESTORE_AGE_S = 10.0
POLL_S = 0.5
MEANS = ("direct $inc", "deleted log", "restored counter")


class Run:
    """What the run saw: detection times, and every report that was not an injection's."""

    def __init__(self) -> None:
        self.found_s: list[tuple[str, str, float]] = []  # means, work order, seconds
        self.false_alarms: list[str] = []
        self.sent = 0
        self.expected: set[str] = set()  # work orders changed behind mes_tasks's back right now
        self.stop = threading.Event()

    def watch(self) -> None:
        """Every report of every pass: a work order not expected, or any unexplained update."""
        from mes_tasks.models import VerifyState

        seen_at = None
        while not self.stop.wait(POLL_S):
            state = VerifyState.objects(id="last").first()
            if state is None or state.finished_at == seen_at:
                continue
            seen_at = state.finished_at
            for wo in set(state.drift) - self.expected:
                self.false_alarms.append(f"{state.finished_at}: drift of {wo}")
            for entry in state.unexplained:
                self.false_alarms.append(f"{state.finished_at}: unexplained {entry['request_id']}")


def produce(run: Run, rate: float, work_orders: list[str]) -> None:
    from mes_tasks.send.producer import submit_quantity_update

    started = time.monotonic()
    while not run.stop.is_set():
        time.sleep(max(0.0, started + run.sent / rate - time.monotonic()))
        i = run.sent
        submit_quantity_update(work_orders[i % len(work_orders)], ("input", "output")[i % 2], 1, f"vr-{i}")
        run.sent += 1


def inject(means: str, wo: str) -> None:
    from mes_tasks.models import QuantityLog, WorkOrder

    orders, logs = WorkOrder._get_collection(), QuantityLog._get_collection()
    if means == "direct $inc":
        orders.update_one({"_id": wo}, {"$inc": {"output_qty": 3}})
    elif means == "deleted log":
        doomed = logs.find_one({"work_order_id": wo}, sort=[("_id", 1)])
        logs.delete_one({"_id": doomed["_id"]})
    else:
        copy = orders.find_one({"_id": wo})
        time.sleep(RESTORE_AGE_S)  # updates go on meanwhile
        orders.replace_one({"_id": wo}, copy)


def wait_state(predicate: Any, timeout_s: float) -> bool:
    from mes_tasks.models import VerifyState

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = VerifyState.objects(id="last").first()
        if state is not None and predicate(state):
            return True
        time.sleep(POLL_S)
    return False


def repaired(ledger: Any, wo: str) -> None:
    from mes_tasks.audit.checks import repair
    from mes_tasks.errors import TransientError

    for _ in range(20):
        try:
            repair(ledger, wo)
            return
        except TransientError:  # the worker holds its lock: it lets go when asked
            time.sleep(0.5)
    raise SystemExit(f"verifyrun: could not repair {wo}")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds a process has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=100, help="updates offered per second")
    parser.add_argument("--injections", type=int, default=20)
    parser.add_argument("--work-orders", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    var = Path(tempfile.mkdtemp(prefix="mes-verifyrun-"))
    redis_port, mongo_port = free_port(), free_port()
    services = [
        redis_service(var / "redis", redis_port, var / "redis.log").start(),
        mongo_service(var / "mongo", mongo_port, var / "mongo.log").start(),
    ]
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    os.environ["MONGODB_URI"] = secantus_uri(mongo_port, "mes")
    os.environ["MES_REPORTS_DIR"] = str(var / "reports")
    processes = {
        "workorder": worker_argv("workorder", "workorder"),
        "audit": worker_argv("audit", "audit"),
        "beat": beat_argv(var / "beat-schedule"),
    }
    children = [
        Child(name, argv, var / f"{name}.log", env=dict(os.environ)).start()
        for name, argv in processes.items()
    ]
    run = Run()
    try:
        return _run(run, args, children, var)
    finally:
        run.stop.set()
        for child in children:
            child.stop()
        for svc in services:
            svc.stop()


def _run(run: Run, args: argparse.Namespace, children: list[Child], var: Path) -> int:
    from mes_tasks import db
    from mes_tasks.apply.ledger import Ledger
    from mes_tasks.audit.checks import run_audit
    from mes_tasks.models import OutboxMessage, QuantityLog, VerifyState, WorkOrder
    from mes_tasks.settings import get_settings

    settings = get_settings()
    mongo = db.prepare(settings)
    ledger = Ledger(mongo, db.redis_client(settings), settings)
    work_orders = [f"WO-R{i:02d}" for i in range(args.work_orders)]
    for wo in work_orders:
        WorkOrder(id=wo).save()
    if not children[0].wait_for(" ready.", 60):
        raise SystemExit(f"verifyrun: the worker did not start; see {var}")
    rng = random.Random(args.seed)
    threading.Thread(target=produce, args=(run, args.rate, work_orders), daemon=True).start()
    threading.Thread(target=run.watch, daemon=True).start()
    slot_s = args.minutes * 60 / args.injections
    started = time.monotonic()
    print(f"verifyrun: {args.minutes:g} min, {args.rate:g} updates/s over {len(work_orders)} work orders, "
          f"{args.injections} injections; logs in {var}", flush=True)  # fmt: skip
    for k in range(args.injections):
        # At a random point of its slot: passes come every 30 s, and an injection in step with
        # them would always be found after the same wait.
        time.sleep(max(0.0, started + (k + rng.uniform(0.2, 0.6)) * slot_s - time.monotonic()))
        means, wo = MEANS[k % len(MEANS)], rng.choice(work_orders)
        run.expected.add(wo)
        inject(means, wo)
        at = time.monotonic()
        found = wait_state(lambda s, wo=wo: wo in s.drift, FOUND_TIMEOUT_S)
        took = time.monotonic() - at if found else float("inf")
        run.found_s.append((means, wo, took))
        print(f"verifyrun: {k + 1:2d}. {means:16s} {wo}: found {took:.1f} s after", flush=True)
        repaired(ledger, wo)
        wait_state(lambda s, wo=wo: wo not in s.drift, FOUND_TIMEOUT_S)
        run.expected.discard(wo)
    time.sleep(max(0.0, started + args.minutes * 60 - time.monotonic()))
    run.stop.set()
    time.sleep(1)
    cpu = {child.name: cpu_s(child.pid) for child in children[:2]}  # the workorder and audit workers
    share = cpu["audit"] / cpu["workorder"]
    print(f"verifyrun: CPU over the run: workorder worker {cpu['workorder']:.0f} s, audit worker "
          f"(the passes, the relay) {cpu['audit']:.0f} s: {share:.2f}x", flush=True)  # fmt: skip
    findings = run_audit(mongo).findings
    worst = max(t for _, _, t in run.found_s)
    ok = worst <= GOAL_S and not run.false_alarms and not findings
    print(f"verifyrun: sent {run.sent}, applied {QuantityLog.objects.count()}; worst detection {worst:.1f} s "
          f"(goal {GOAL_S:g} s); false alarms {len(run.false_alarms)}; audit findings after the repairs "
          f"{len(findings)}: {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
    outbox = OutboxMessage._get_collection().aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
    state = VerifyState.objects(id="last").first()
    print(f"verifyrun: outbox at the end {({r['_id']: r['n'] for r in outbox})} (a settled entry whose log "
          f"an injection deleted is kept); logs without an outbox entry, as the passes counted: "
          f"{state.logs_without_entry_total if state else 0}", flush=True)  # fmt: skip
    for alarm in run.false_alarms[:20]:
        print(f"verifyrun:   false alarm: {alarm}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
