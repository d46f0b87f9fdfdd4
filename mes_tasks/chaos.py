"""``make chaos``: updates flow while faults are injected in turn; nothing may be lost or counted twice.

    python -m mes_tasks.chaos [--updates 5000] [--work-orders 20] [--rate 25] [--dup-share 0.1]
                              [--faults kill,pause,...]

Starts its own Redis (AOF) and SecantusDB, two workers on ``workorder`` (active and standby)
that reach both stores through fault proxies, and a producer thread. Faults, in turn:
SIGKILL of the active worker, SIGSTOP past the lease TTL (then SIGCONT), Redis restart,
SecantusDB restart, latency and dropped connections on each proxy, a burst of bad input.
Exits 0 only when lost = 0, double-counted = 0 and the audit finds nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mes_tasks.chaosreport import Row, Sent, fill_row, lost_and_double_counted, table, worker_events

WORKER_ENV = {
    "MES_LOCK_TTL_S": "3",
    "MES_LOCK_WAIT_S": "2",
    "MES_RETRY_MAX": "400",  # a killed worker's transaction holds its work order up to 60 s
    "MES_RETRY_BACKOFF_S": "0.05",
    "MES_RETRY_BACKOFF_MAX_S": "0.5",
    "MES_VISIBILITY_TIMEOUT_S": "12",
    "MES_UNACKED_RESTORE_INTERVAL_S": "1",
    "MES_CONNECT_TIMEOUT_S": "2",
    "MES_LEASE_TTL_S": "2",
}
FAULT_HOLD_S = 4.0  # how long latency / a pause lasts
SETTLE_S = 3.0  # quiet time between faults
BAD_BURST = 20
FAULTS = {
    "kill": "SIGKILL active worker",
    "pause": "SIGSTOP active > lease TTL",
    "redis-restart": "Redis restart (AOF)",
    "mongo-restart": "MongoDB restart",
    "redis-latency": "Redis latency 50 ms",
    "mongo-latency": "MongoDB latency 50 ms",
    "redis-drop": "Redis connections dropped",
    "mongo-drop": "MongoDB connections dropped",
    "bad-input": "bad input burst",
}
OUTBOX_GRACE_S = 5.0  # the relay re-sends what the broker lost after this long


@dataclass
class Run:
    """The stack under test and what the producer did."""

    tmp: Path
    services: dict[str, Any] = field(default_factory=dict)
    proxies: dict[str, Any] = field(default_factory=dict)
    workers: list[Any] = field(default_factory=list)
    sent: Sent = field(default_factory=Sent)
    duplicates_sent: int = 0
    bad_sent: int = 0
    refused: int = 0

    def worker_env(self) -> dict[str, str]:
        from mes_tasks.devserver import secantus_uri

        return {
            **os.environ,
            **WORKER_ENV,
            "REDIS_URL": f"redis://127.0.0.1:{self.proxies['redis'].port}/3",
            "MONGODB_URI": secantus_uri(self.proxies["mongo"].port, "mes"),
        }

    def start_worker(self) -> Any:
        from mes_tasks.devserver import worker_argv

        log = self.tmp / f"worker-{len(self.workers)}.log"
        worker = _Proc(worker_argv(name=f"chaos{len(self.workers)}"), log, self.worker_env())
        self.workers.append(worker)
        return worker

    def active_worker(self) -> Any:
        live = [w for w in self.workers if w.alive()]
        holders = [w for w in live if "took the workorder lease" in w.log_text()]
        return holders[-1] if holders else live[0]


class _Proc:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        import subprocess

        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except Exception:
            self.proc.kill()


def build_plan(n: int, work_orders: list[str], dup_share: float, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    plan: list[dict[str, Any]] = []
    for i in range(n):
        if plan and rng.random() < dup_share:
            plan.append(dict(rng.choice(plan)))
            continue
        plan.append({"work_order_id": rng.choice(work_orders), "kind": rng.choice(["input", "output"]),
                     "quantity": rng.randint(1, 9), "request_id": f"chaos:{i}"})  # fmt: skip
    return plan


def produce(run: Run, plan: list[dict[str, Any]], rate: float, stop: threading.Event) -> None:
    from mes_tasks.producer import Producer

    producer = Producer()
    seen: set[str] = set()
    started = time.monotonic()
    for i, update in enumerate(plan):
        if stop.is_set():
            return
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        result = producer.submit(**update)
        now, rid = time.time(), update["request_id"]
        run.sent.times.append(now)
        if not result["success"]:
            raise RuntimeError(f"producer lost an update: {result}")  # spooling must cover outages
        if rid in seen:
            run.duplicates_sent += 1
        seen.add(rid)
        run.sent.first_sent.setdefault(rid, now)
        run.sent.accepted[rid] = (update["work_order_id"], update["kind"], update["quantity"])


def relay_forever(stop: threading.Event) -> None:
    """Beat's job in a real deployment: publish what was spooled, re-send what the broker lost."""
    from mes_tasks.tasks import relay_outbox

    while not stop.wait(1.0):
        with contextlib.suppress(Exception):  # a store is down: the next second tries again
            relay_outbox()


def faults(run: Run) -> dict[str, Callable[[], None]]:
    def kill_active() -> None:
        run.active_worker().signal(signal.SIGKILL)
        run.start_worker()  # the replacement joins as standby

    def pause_active() -> None:
        worker = run.active_worker()
        worker.signal(signal.SIGSTOP)
        time.sleep(FAULT_HOLD_S)  # past the lease TTL: the standby takes over
        worker.signal(signal.SIGCONT)

    def restart(name: str) -> Callable[[], None]:
        return lambda: run.services[name].restart()

    def latency(name: str) -> Callable[[], None]:
        def inject() -> None:
            run.proxies[name].latency_s = 0.05
            time.sleep(FAULT_HOLD_S)
            run.proxies[name].latency_s = 0.0

        return inject

    def drop(name: str) -> Callable[[], None]:
        return lambda: run.proxies[name].drop_all() and None

    def bad_burst() -> None:
        from mes_tasks.producer import submit_quantity_update
        from mes_tasks.tasks import update_quantity

        for _ in range(BAD_BURST // 2):
            run.bad_sent += 1
            run.refused += not submit_quantity_update("", "output", 1)["success"]
        for i in range(BAD_BURST // 2):  # valid in form, refused by the worker
            run.bad_sent += 1
            update_quantity.apply_async(
                ("WO-NONE", "output", 1), {"request_id": f"chaos:bad:{i}"}, ignore_result=True
            )

    return {
        "kill": kill_active,
        "pause": pause_active,
        "redis-restart": restart("redis"),
        "mongo-restart": restart("mongo"),
        "redis-latency": latency("redis"),
        "mongo-latency": latency("mongo"),
        "redis-drop": drop("redis"),
        "mongo-drop": drop("mongo"),
        "bad-input": bad_burst,
    }


def recovery_after(at: datetime, timeout_s: float = 120.0) -> float | None:
    """Seconds from ``at`` to the first commit after it."""
    from mes_tasks.models import QuantityLog

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            log = QuantityLog._get_collection().find_one(
                {"created_at": {"$gt": at}}, sort=[("created_at", 1)]
            )
        except Exception:
            log = None
        if log is not None:
            return float(max(0.0, (log["created_at"].replace(tzinfo=UTC) - at).total_seconds()))
        time.sleep(0.2)
    return None


def settle(run: Run, timeout_s: float) -> None:
    """Until every accepted request is logged or dead-lettered and nothing waits anywhere."""
    from mes_tasks.models import FailedUpdate, OutboxMessage, QuantityLog

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a store may still be coming back
            done = {d["request_id"] for d in QuantityLog._get_collection().find({}, {"request_id": 1})}
            done |= {d["request_id"] for d in FailedUpdate._get_collection().find({}, {"request_id": 1})}
            if set(run.sent.accepted) <= done and OutboxMessage.objects.count() == 0:
                return
        time.sleep(1)


def verify(run: Run, rows: list[Row]) -> dict[str, int]:
    """Fill each fault's row; the totals: lost, double-counted, audit findings, bad input."""
    from mes_tasks.audit import run_audit
    from mes_tasks.models import FailedUpdate, QuantityLog

    lost, double = lost_and_double_counted(run.sent)
    events = worker_events(w.log for w in run.workers)
    for row in rows:
        fill_row(row, run.sent, events, lost)
    failed = {d["request_id"] for d in FailedUpdate._get_collection().find({}, {"request_id": 1})}
    return {
        "accepted": len(run.sent.accepted),
        "duplicates_sent": run.duplicates_sent,
        "duplicates_suppressed": len(events["duplicates"]),
        "applied": QuantityLog._get_collection().estimated_document_count(),
        "failed": len(failed),
        "lost": len(lost),
        "double_counted": double,
        "audit_findings": len(run_audit(QuantityLog._get_collection().database.client).findings),
        "bad_sent": run.bad_sent,
        "bad_accounted": run.refused + len([rid for rid in failed if rid.startswith("chaos:bad:")]),
        "retries": len(events["retries"]),
    }


def run_chaos(
    updates: int, work_orders: int, rate: float, dup_share: float, seed: int, tmp: Path, only: list[str]
) -> int:
    from mes_tasks.devserver import free_port, mongo_service, redis_service, secantus_uri
    from mes_tasks.faultproxy import FaultProxy

    run = Run(tmp)
    redis_port, mongo_port = free_port(), free_port()
    run.services["redis"] = redis_service(tmp / "redis", redis_port, tmp / "redis.log").start()
    run.services["mongo"] = mongo_service(tmp / "mongo", mongo_port, tmp / "mongo.log").start()
    run.proxies = {"redis": FaultProxy(redis_port).start(), "mongo": FaultProxy(mongo_port).start()}
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/3"
    os.environ["MONGODB_URI"] = secantus_uri(mongo_port, "mes")
    os.environ["MES_CONNECT_TIMEOUT_S"] = "2"
    os.environ.setdefault("MES_OUTBOX_GRACE_S", str(OUTBOX_GRACE_S))
    stop = threading.Event()
    try:
        from mes_tasks import db
        from mes_tasks.models import WorkOrder
        from mes_tasks.settings import get_settings

        db.prepare(get_settings())
        wos = [f"CH-{i:03d}" for i in range(work_orders)]
        WorkOrder._get_collection().insert_many([{"_id": w, "input_qty": 0, "output_qty": 0} for w in wos])
        run.start_worker()
        time.sleep(3)
        run.start_worker()
        plan = build_plan(updates, wos, dup_share, seed)
        stop_producing = threading.Event()  # production spans every fault, until the last has passed
        producer = threading.Thread(target=produce, args=(run, plan, rate, stop_producing), daemon=True)
        threading.Thread(target=relay_forever, args=(stop,), daemon=True).start()
        producer.start()
        rows = []
        injectors = faults(run)
        for key in only:
            inject, name = injectors[key], FAULTS[key]
            time.sleep(SETTLE_S)
            row = Row(name, injected=1)
            start = datetime.now(UTC)
            print(f"chaos: {name}", file=sys.stderr, flush=True)
            inject()
            db.connect(get_settings())  # the harness's own connection may have been cut too
            row.recovery_s = recovery_after(datetime.now(UTC))
            row.window = (start, datetime.now(UTC))
            rows.append(row)
        time.sleep(SETTLE_S)
        stop_producing.set()
        producer.join()
        settle(run, timeout_s=300)
        totals = verify(run, rows)
        print(table(rows, totals))
        ok = totals["lost"] == 0 and totals["double_counted"] == 0 and totals["audit_findings"] == 0
        return 0 if ok and totals["bad_accounted"] == totals["bad_sent"] else 1
    finally:
        stop.set()
        for worker in run.workers:
            worker.stop()
        for proxy in run.proxies.values():
            proxy.close()
        for service in run.services.values():
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__)
    parser.add_argument("--updates", type=int, default=5000, help="at most; sending stops after the faults")
    parser.add_argument("--work-orders", type=int, default=20)
    parser.add_argument("--rate", type=float, default=25.0, help="updates per second offered")
    parser.add_argument("--dup-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", type=fault_list, default=list(FAULTS),
                        help=f"comma-separated, in order; default all: {','.join(FAULTS)}")  # fmt: skip
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mes-chaos-"))
    print(f"chaos: logs in {tmp}", file=sys.stderr, flush=True)
    return run_chaos(args.updates, args.work_orders, args.rate, args.dup_share, args.seed, tmp, args.faults)


def fault_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FAULTS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown fault {unknown}; choose from {', '.join(FAULTS)}")
    return keys


if __name__ == "__main__":
    sys.exit(main())
