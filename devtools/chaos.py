"""``make chaos``: updates flow while every fault is injected, repeatedly, on default settings.

    python -m devtools.chaos [--repeat 3] [--seed 1] [--faults kill-standby,pause,...]
                              [--rate 20] [--work-orders 20] [--dup-share 0.1] [--updates N]
                              [--recovery-wait 30] [--no-recovery-goal] [--sentinel | --partitions N]

Starts its own Redis (AOF) and SecantusDB, two workers on ``workorder`` (active and
standby) with the project's default settings, reaching both stores through fault proxies,
and in this process a producer thread and the outbox relay (every
``MES_OUTBOX_RELAY_INTERVAL_S``, as beat would), through proxies of their own. Each fault
(``chaosfaults.FAULTS``) is injected ``--repeat`` times in an order shuffled by ``--seed``
while updates keep flowing; after each injection the run waits until every update
accepted before the fault's end has its outcome (at most ``--recovery-wait`` seconds).

A fault's recovery: seconds from its end until every update accepted before that
moment was applied or dead-lettered, from the stores' own timestamps (an update an
earlier injection left without an outcome is charged to that one). Exits 0 only
when lost = 0, double-counted = 0, the audit is clean, no accepted update was
dead-lettered, every fault's own checks held and, unless ``--no-recovery-goal``, every
fault's worst recovery was at most 5 s.

``--sentinel``: Redis is a Sentinel-managed primary and replica (``devtools.sentinel``)
that everyone reaches through the Sentinels, with no Redis proxy: the faults of the
proxied Redis give way to ``redis-failover`` (``chaosfaults.faults_for``).

``--partitions N`` (N > 1): producers and three automatic workers on ``MES_PARTITIONS=N``,
and the faults of ``chaospartitions.PARTITION_FAULTS`` (partition holders, changes of the
fleet, Redis faults while retries wait on their countdown). A watch
(``devtools.chaoswatch``) adds its own checks: every queue with waiting updates consumed
again within 5 s, never by two workers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from devtools.chaosfaults import Fault, faults_for
from devtools.chaospartitions import PARTITION_FAULTS
from devtools.chaosreport import (
    Injection,
    Outcome,
    Row,
    add_injection,
    counting_errors,
    outcomes,
    table,
    verdict,
    worker_events,
)
from devtools.chaosrun import PARTITIONED_WORKERS, Run, proxied_mongo_uri
from devtools.chaoswatch import Watch, charge
from devtools.devserver import free_port, mongo_service, redis_service, secantus_uri
from devtools.faultproxy import FaultProxy
from devtools.load import scans
from devtools.sentinel import SentinelUnsupported, Topology

GAP_S = 2.0  # updates flow undisturbed this long before each injection
RECOVERY_WAIT_S = 30.0
FINAL_WAIT_FACTOR = 4  # after the last fault, wait this many recovery waits for the stragglers
POLL_S = 0.2
LAST_TOLD = 3  # request ids named for a recovery over its goal
# mes_tasks.partitions.MAX_PARTITIONS: importing mes_tasks configures its app from the environment,
# which the run sets only once its stores are up.
MAX_PARTITIONS = 64


def faults_of(run: Run) -> dict[str, Fault]:
    """The faults this run can inject: the partitioned run's, or the classic (or Sentinel) run's."""
    return PARTITION_FAULTS if run.partitioned else faults_for(run.sentinel is not None)


def produce(
    run: Run, rate: float, dup_share: float, limit: int | None, stop: threading.Event, seed: int
) -> None:
    """Valid updates at ``rate`` per second (a share re-sent with the same request id) until ``stop``."""
    from mes_tasks.send.producer import Producer

    producer = Producer()
    work_orders = [d["_id"] for d in run.db.work_orders.find({"_id": {"$regex": "^CH-[0-9]+$"}})]
    updates = scans(random.Random(seed), work_orders, "chaos", dup_share=dup_share)
    started, i = time.monotonic(), 0
    while not stop.is_set() and (limit is None or i < limit):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        u = next(updates)
        run.submit(producer, u["work_order_id"], u["kind"], u["quantity"], u["request_id"])
        i += 1


def relay_forever(run: Run, stop: threading.Event) -> None:
    """Beat's job in a real deployment: publish what was spooled, re-send what the broker lost."""
    from mes_tasks.settings import get_settings
    from mes_tasks.tasks import relay_outbox

    while not stop.wait(get_settings().outbox_relay_interval_s):
        try:
            relay_outbox()
        except Exception:  # a store is down: the next run tries again, as beat's would
            run.relay_errors += 1


def verify_forever(run: Run, stop: threading.Event) -> None:
    """Beat's other job: a continuous-verification pass every ``MES_VERIFY_INTERVAL_S``. Chaos
    changes no counter behind the ledger's back, so any drift or unexplained update a pass
    reports is a false alarm."""
    from mes_tasks.models import QuantityLog
    from mes_tasks.settings import get_settings
    from mes_tasks.tasks import verify_once

    settings = get_settings()
    while settings.verify_interval_s and not stop.wait(settings.verify_interval_s):
        try:
            outcome, _ = verify_once(QuantityLog._get_collection().database.client, settings)
        except Exception:  # a store is down: the next pass covers it
            run.verify_errors += 1
            continue
        run.verify_passes += 1
        alarms = [*outcome.drift, *(u["request_id"] for u in outcome.unexplained)]
        if alarms:
            run.verify_alarms.extend(alarms)
            print(f"chaos: verification reported {alarms[:10]}", file=sys.stderr, flush=True)


def wait_settled(run: Run, inj: Injection, timeout_s: float, applied: set[str]) -> set[str]:
    """Until every update accepted before the fault's end (and not an earlier one's) has its outcome.

    Returns those still without one after ``timeout_s``. ``applied``: request ids known
    applied, a cache (an applied update stays applied; a dead letter may be retried).
    """
    deadline = time.monotonic() + timeout_s
    waiting = run.sent.before(inj.ended) - inj.excluded - applied
    while waiting:
        with contextlib.suppress(PyMongoError):  # the store may still be coming back
            found = outcomes(run.db, waiting)
            applied.update(rid for rid, o in found.items() if o.applied)
            waiting -= found.keys()
            inj.last = tuple(sorted(found)[:LAST_TOLD]) if found else inj.last
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    inj.settled = time.time()
    return waiting


def inject_all(run: Run, schedule: list[str], recovery_wait_s: float, applied: set[str]) -> None:
    """Each fault in turn, each followed by the wait for its recovery."""
    excluded: set[str] = set()  # left unsettled by an injection: charged to it, not to later ones
    carried: set[str] = set()  # of those, the ones still pending
    for n, key in enumerate(schedule, 1):
        problems = run.ensure_workers()
        time.sleep(GAP_S)
        with contextlib.suppress(PyMongoError):
            carried -= outcomes(run.db, carried).keys()
        inj = Injection(key, time.time(), excluded=frozenset(excluded | run.aside),
                        pending_at_start=len(carried), problems=problems)  # fmt: skip
        run.injections.append(inj)
        print(f"chaos: {time.strftime('%H:%M:%S')} [{n}/{len(schedule)}] {key}", file=sys.stderr, flush=True)
        fault = faults_of(run)[key]
        try:
            fault.inject(run, inj)
        except Exception as exc:
            inj.problems.append(f"the injection failed: {type(exc).__name__}: {exc}")
        inj.ended = inj.ended or time.time()
        left = wait_settled(run, inj, max(recovery_wait_s, fault.goal_s + GAP_S), applied)
        if run.partitioned:
            inj.problems.extend(run.unexpected_exits())
        excluded |= left
        carried |= left
        said = f"{len(left)} update(s) still without an outcome" if left else "all settled"
        late = f" (last: {', '.join(inj.last)})" if inj.settled - inj.ended > fault.goal_s else ""
        print(
            f"chaos:   {said} {inj.settled - inj.ended:.1f} s after its end{late}",
            file=sys.stderr,
            flush=True,
        )
        for problem in inj.problems:
            print(f"chaos:   problem: {problem}", file=sys.stderr, flush=True)


def verify(run: Run, watch: Watch | None = None) -> tuple[list[Row], dict[str, int]]:
    """One row per fault, and the totals; with a ``watch``, its consumption figures too."""
    from mes_tasks.audit.checks import run_audit
    from mes_tasks.models import QuantityLog

    done: dict[str, Outcome] = outcomes(run.db)
    for inj, check in run.final_checks:
        inj.problems.extend(check())
    faults = faults_of(run)
    rows = {key: Row(key, fault.name, fault.goal_s) for key, fault in faults.items()}
    events = worker_events(w.log for w in run.workers)
    for inj in run.injections:
        add_injection(rows[inj.key], inj, run.db, run.sent, events, done)
    if watch is not None:
        whole = {key for key, fault in faults.items() if fault.whole}
        charge(rows, run.injections, watch, whole, [w.log for w in run.workers])
    lost, dead, double = counting_errors(run.db, run.sent, done)
    failed = {d["request_id"] for d in run.db.failed_updates.find({}, {"request_id": 1})}
    totals = {
        "accepted": len(run.sent.accepted),
        "duplicates_sent": run.duplicates_sent,
        "duplicates_suppressed": len(events["duplicates"]),
        "applied": run.db.quantity_logs.estimated_document_count(),
        "failed": len(failed),
        "lost": len(lost),
        "double_counted": double,
        "dead_lettered": len(dead),
        "audit_findings": len(run_audit(QuantityLog._get_collection().database.client).findings),
        "bad_sent": run.bad_sent,
        "bad_accounted": run.refused + len([rid for rid in failed if rid.startswith("chaos:bad:")]),
        "producer_refused": run.producer_refused,
        "retries": len(events["retries"]),
        "relay_errors": run.relay_errors,
        "verify_passes": run.verify_passes,
        "verify_errors": run.verify_errors,
        "verify_false_alarms": len(run.verify_alarms),
        "outbox_spooled": run.db.outbox.count_documents({"state": {"$nin": ["sent", "settled"]}}),
    }
    if watch is not None:
        totals["double_consumers"] = len(watch.doubles)
        totals["watch_samples"] = watch.samples
    if lost:
        print(f"chaos: lost {sorted(lost)[:20]}", file=sys.stderr, flush=True)
    return [r for r in rows.values() if r.injected], totals


@contextlib.contextmanager
def stack(tmp: Path, work_orders: int, sentinel: bool = False) -> Iterator[Run]:
    """Redis and SecantusDB, each behind two proxies: the workers' (where the network faults
    strike) and this process's (producer and relay: the main app and beat, whose connections
    only the outage of ``spooled-corrections`` cuts). With ``sentinel``, Redis is a primary,
    a replica and three Sentinels instead, reached without a proxy."""
    mongo_port = free_port()
    services = {"mongo": mongo_service(tmp / "mongo", mongo_port, tmp / "mongo.log")}
    stores = [("mongo", mongo_port)]
    topology = Topology(tmp / "sentinel") if sentinel else None
    if topology is None:
        stores.append(("redis", free_port()))
        services["redis"] = redis_service(tmp / "redis", stores[-1][1], tmp / "redis.log")
    mongo: MongoClient[dict[str, Any]] = MongoClient(
        secantus_uri(mongo_port, "mes"), serverSelectionTimeoutMS=2000
    )
    proxies = {f"{side}{name}": FaultProxy(port).start() for side in ("", "app-") for name, port in stores}
    run: Run | None = None
    try:
        for service in services.values():
            service.start()
        if topology is not None:
            start_topology(topology)
        harness = (
            topology.client(decode_responses=True, socket_timeout=2)
            if topology
            else redis.Redis(port=stores[-1][1], db=3, decode_responses=True, socket_timeout=2)
        )
        run = Run(tmp, mongo["mes"], harness, services, proxies, sentinel=topology)
        for name in [k for k in os.environ if k.startswith("MES_")]:
            del os.environ[name]  # the project's defaults, here as in the workers
        os.environ["REDIS_URL"] = (
            topology.url() if topology else f"redis://127.0.0.1:{proxies['app-redis'].port}/3"
        )
        os.environ["MONGODB_URI"] = proxied_mongo_uri(proxies["app-mongo"].port)
        from mes_tasks import db
        from mes_tasks.settings import get_settings

        db.prepare(get_settings())
        run.db.work_orders.insert_many([{"_id": f"CH-{i:03d}", "input_qty": 0, "output_qty": 0}
                                        for i in range(work_orders)])  # fmt: skip
        yield run
    finally:
        for worker in run.workers if run is not None else []:
            worker.stop()
        for proxy in proxies.values():
            proxy.close()
        for service in services.values():
            service.stop()
        if topology is not None:
            topology.stop()
        mongo.close()


def start_topology(topology: Topology) -> None:
    try:
        topology.start()
    except SentinelUnsupported as exc:
        raise SystemExit(f"chaos: --sentinel: {exc}") from None


def run_chaos(args: argparse.Namespace, tmp: Path) -> int:
    stop = threading.Event()
    with stack(tmp, args.work_orders, args.sentinel) as run:
        if args.partitions > 1:
            run.fleet = PARTITIONED_WORKERS
            run.set_producers(args.partitions)
        problems = run.ensure_workers()
        if problems:
            raise SystemExit(f"chaos: the workers did not come up: {problems}")
        watch = start_watch(run) if run.partitioned else None
        schedule = [key for key in args.faults for _ in range(args.repeat)]
        random.Random(args.seed).shuffle(schedule)
        producing = threading.Event()  # production spans every fault, until the last has recovered
        flow = (run, args.rate, args.dup_share, args.updates, producing, args.seed)
        producer = threading.Thread(target=produce, args=flow, daemon=True)
        threading.Thread(target=relay_forever, args=(run, stop), daemon=True).start()
        threading.Thread(target=verify_forever, args=(run, stop), daemon=True).start()
        producer.start()
        applied: set[str] = set()
        try:
            inject_all(run, schedule, args.recovery_wait, applied)
        finally:
            producing.set()
            producer.join()
        end = Injection("end", started=time.time(), ended=time.time())
        wait_settled(run, end, FINAL_WAIT_FACTOR * args.recovery_wait, applied)
        if watch is not None:
            watch.stop()
        rows, totals = verify(run, watch)
        stop.set()
    partitioned = args.partitions > 1
    ok, lines = verdict(rows, totals, recovery_goal=args.recovery_goal, partitioned=partitioned)
    print(table(rows, totals, partitioned=partitioned))
    print("\n".join(lines))
    return 0 if ok else 1


def start_watch(run: Run) -> Watch:
    """The watch on the queues, reading Redis directly and asking the workers as an operator would."""
    from mes_tasks.app import app
    from mes_tasks.ops.status import consumers

    def ask() -> dict[str, list[str]]:
        return {q: [w.split("@")[0] for w in ws] for q, ws in consumers(app).items()}

    return Watch(run.redis, run.describe_holder, ask).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repeat", type=positive, default=3, help="injections of each fault (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="orders the injections and the updates")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated; default all: {','.join(faults_for(False))} "
                             f"(with --sentinel: {','.join(faults_for(True))}; "
                             f"with --partitions: {','.join(PARTITION_FAULTS)})")  # fmt: skip
    parser.add_argument("--rate", type=float, default=20.0, help="updates per second offered")
    parser.add_argument("--work-orders", type=int, default=20)
    parser.add_argument("--dup-share", type=float, default=0.1, help="share re-sent with the same request id")
    parser.add_argument("--updates", type=int, default=None, help="stop sending after this many")
    parser.add_argument("--recovery-wait", type=float, default=RECOVERY_WAIT_S,
                        help="seconds to wait for an injection's updates before going on")  # fmt: skip
    parser.add_argument("--no-recovery-goal", dest="recovery_goal", action="store_false",
                        help="report recoveries (and, with --partitions, queues left unconsumed) over 5 s "
                             "without failing the run")  # fmt: skip
    parser.add_argument("--sentinel", action="store_true",
                        help="Redis managed by Sentinels, with the redis-failover fault")  # fmt: skip
    parser.add_argument("--partitions", type=positive, default=1,
                        help="MES_PARTITIONS of a partitioned run: three workers, the partition faults "
                             "(default 1: the classic run)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.partitions > MAX_PARTITIONS:
        parser.error(f"--partitions: at most {MAX_PARTITIONS}")
    if args.partitions > 1 and args.sentinel:
        parser.error("--partitions and --sentinel: one or the other")
    known = PARTITION_FAULTS if args.partitions > 1 else faults_for(args.sentinel)
    args.faults = fault_list(parser, args.faults, known)
    tmp = Path(tempfile.mkdtemp(prefix="mes-chaos-"))
    print(f"chaos: logs in {tmp}", file=sys.stderr, flush=True)
    logging.basicConfig(filename=tmp / "harness.log", level=logging.INFO,
                        format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")  # fmt: skip
    return run_chaos(args, tmp)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def fault_list(parser: argparse.ArgumentParser, text: str | None, known: dict[str, Any]) -> list[str]:
    if text is None:
        return list(known)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        parser.error(f"--faults: unknown fault {unknown} in this run; choose from {', '.join(known)}")
    return keys


if __name__ == "__main__":
    sys.exit(main())
