"""``make bench``: what exactness costs, measured side by side on the same servers in one run.

    python bench/run.py [--quick] [--updates N] [--rounds N] [--rates 50,100,200] [--duration S]
                        [--audit-sizes 10000,100000,1000000] [--memory-sizes 1000,100000]
                        [--phases throughput,latency,memory,audit] [--profile [FILE]]

Starts its own redis-server and SecantusDB (or uses REDIS_URL / MONGODB_URI) and prints a
table, then writes bench/results.json:

1. throughput through one solo worker: mes_tasks, the classic design (bench/classic.py),
   the floor (the same transactional apply in a loop, no Celery) and mes_tasks without
   kept locks; and what enqueueing costs with and without the outbox record;
2. latency from delay() to commit at fixed offered rates and at saturation;
3. worker RSS after 1k and after 100k updates;
4. audit time against a bare $group, with the audit's peak memory.

``--profile`` samples the mes_tasks worker with py-spy in an extra, unmeasured round and
writes the functions that took the most wall time (bench/profile.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools: not installed

from devtools.process import Child

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK_ORDERS = [f"B-{i:03d}" for i in range(20)]
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 3600.0
ENQUEUE_BATCH = 500
PHASES = ("throughput", "latency", "memory", "audit")
ENQUEUED: dict[str, float] = {}


def start_servers(base: Path) -> list[Any]:
    """Own Redis + SecantusDB unless REDIS_URL / MONGODB_URI are set; sets the env for children."""
    from devtools.devserver import free_port, mongo_service, redis_service, secantus_uri

    started = []
    if not os.environ.get("REDIS_URL"):
        port = free_port()
        started.append(redis_service(base / "redis", port, base / "redis.log").start())
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/3"
    if not os.environ.get("MONGODB_URI"):
        port = free_port()
        started.append(mongo_service(base / "mongo", port, base / "mongo.log").start())
        os.environ["MONGODB_URI"] = secantus_uri(port, "mes_bench")
    return started


class Worker(Child):
    """A worker subprocess, started and waited for until ready; its RSS can be read."""

    def __init__(self, argv: list[str], log: Path, **extra_env: str) -> None:
        pythonpath = f"{BENCH}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "PYTHONPATH": pythonpath, **extra_env}
        log.unlink(missing_ok=True)
        super().__init__(log.stem, argv, log, env=env, cwd=REPO)
        self.start()
        if not self.wait_for(" ready.", READY_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"worker did not start:\n{self.log_text()[-2000:]}")

    def stop(self, timeout_s: float = 30.0) -> None:
        super().stop(timeout_s)


def reset(collections: list[Any]) -> None:
    """Drop and re-index (deleting a large collection document by document leaves it slow)."""
    from mes_tasks.models import ALL_MODELS

    for coll in collections:
        coll.drop()
    for model in ALL_MODELS:
        model.ensure_indexes()


def seed_work_orders(coll: Any) -> None:
    coll.insert_many([{"_id": wo, "input_qty": 0, "output_qty": 0} for wo in WORK_ORDERS])


def updates(n: int, prefix: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    return [
        (
            (WORK_ORDERS[i % len(WORK_ORDERS)], ("input", "output")[i % 2], 1 + i % 3),
            {"request_id": f"{prefix}:{i}", "context": {"barcode": f"BC{i}", "source": "BENCH"}},
        )
        for i in range(n)
    ]


def wait_for_logs(logs: Any, n: int, progress: str) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while (done := logs.estimated_document_count()) < n:  # a count scan would load the server
        if time.monotonic() > deadline:
            raise RuntimeError(f"{progress}: only {done}/{n} applied")
        print(f"\r  {progress}: {done}/{n}", end="", file=sys.stderr, flush=True)
        time.sleep(0.5)
    print(f"\r  {progress}: {n}/{n}", file=sys.stderr, flush=True)


def commit_rate(logs: Any) -> float:
    """Updates per second between the first and the last commit (worker start-up excluded)."""
    first = logs.find_one(sort=[("created_at", 1)])["created_at"]
    last = logs.find_one(sort=[("created_at", -1)])["created_at"]
    n = logs.count_documents({})
    return float((n - 1) / max((last - first).total_seconds(), 1e-9))


def run_queued(
    task: Any,
    worker_argv: list[str],
    logs: Any,
    n: int,
    name: str,
    tmp: Path,
    profile: Path | None = None,
    **worker_env: str,
) -> float:
    """Enqueue n updates, then start the worker and measure its commit rate (under py-spy if asked).

    The enqueue rate is kept in ``ENQUEUED[name]``: mes_tasks records each update in the
    outbox before publishing it, the classic design only publishes.
    """
    started = time.perf_counter()
    for args, kwargs in updates(n, name):
        task.apply_async(args, kwargs)
    ENQUEUED[name] = n / (time.perf_counter() - started)
    worker = Worker(worker_argv, tmp / f"{name}.log", **worker_env)
    raw = None if profile is None else profile.with_suffix(".raw")
    spy = None if raw is None else start_py_spy(worker.pid, raw)
    try:
        wait_for_logs(logs, n, f"{name} throughput")
    finally:
        worker.stop()
    if spy is not None and raw is not None and profile is not None:
        spy.wait(30)
        profile.write_text(summarize_profile(raw, worker.pid))
    return commit_rate(logs)


def py_spy() -> str | None:
    """py-spy from this interpreter's environment (``make install`` puts it there), else the PATH."""
    here = Path(sys.executable).parent
    return shutil.which("py-spy", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")


def start_py_spy(pid: int, out: Path) -> Child:
    """py-spy sampling the worker until it exits, waits included, as collapsed stacks per thread."""
    argv = [py_spy() or "py-spy", "record", "--format", "raw", "--idle", "--threads", "--rate", "200"]
    spy = Child("py-spy", [*argv, "-o", str(out), "-p", str(pid)]).start()
    time.sleep(1.0)  # attached before the first task
    return spy


def summarize_profile(raw: Path, pid: int, top: int = 60) -> str:
    """Wall-time share of the worker's main thread per function (each counted once per stack)."""
    main = f"thread ({pid})"
    total = 0
    inclusive: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(main) or not count.isdigit():
            continue
        total += int(count)
        for frame in set(frames[1:]):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    # Frames (nearly) every sample shares are the worker's start-up stack: left out.
    ranked = [kv for kv in sorted(inclusive.items(), key=lambda kv: -kv[1]) if kv[1] < 0.9 * total]
    lines = [f"{total} samples of the worker's main thread, waits included (py-spy --idle, 200/s)"]
    lines += [f"{100 * n / max(total, 1):5.1f} %  {frame}" for frame, n in ranked[:top]]
    return "\n".join(lines) + "\n"


def throughput(n: int, rounds: int, tmp: Path, profile: Path | None = None) -> dict[str, float]:
    """The designs in interleaved rounds on fresh collections; medians over the rounds.

    ``unkept`` is mes_tasks with ``MES_LOCK_LINGER_S=0`` (a lock and an epoch per update),
    to show what keeping them saves.
    """
    import classic

    from devtools.devserver import worker_argv
    from mes_tasks import db
    from mes_tasks.apply.keptlocks import KeptLocks
    from mes_tasks.apply.ledger import Ledger
    from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder
    from mes_tasks.settings import get_settings
    from mes_tasks.tasks import update_quantity
    from mes_tasks.validation import validate_update

    settings = get_settings()
    mongo = db.prepare(settings)
    wo, logs = WorkOrder._get_collection(), QuantityLog._get_collection()
    c_wo, c_logs = classic._collections()
    c_logs.create_index("work_order_id")
    ledger = Ledger(mongo, db.redis_client(settings), settings, KeptLocks(settings.lock_linger_s))
    outbox = OutboxMessage._get_collection()
    classic_argv = worker_argv(classic.QUEUE, "classic", app="classic")
    per_round = n // rounds

    def floor(prefix: str) -> float:
        started = time.perf_counter()
        for args, kwargs in updates(per_round, prefix):
            ledger.apply(validate_update(*args, context=kwargs["context"]), kwargs["request_id"])
        took = time.perf_counter() - started
        assert ledger.kept is not None
        ledger.kept.release_all()
        return per_round / took

    if profile is not None:  # py-spy slows what it samples: a round of its own, not measured
        reset([wo, logs, outbox])
        seed_work_orders(wo)
        run_queued(update_quantity, worker_argv(), logs, per_round, "profiled", tmp, profile)
    rates: dict[str, list[float]] = {"mes_tasks": [], "classic": [], "floor": [], "unkept": []}
    designs = list(rates)
    for r in range(rounds):
        first = r % len(designs)
        for design in designs[first:] + designs[:first]:  # rotated: no design always runs first
            reset([wo, logs, c_wo, c_logs, outbox])
            seed_work_orders(c_wo if design == "classic" else wo)
            if design == "mes_tasks":
                rate = run_queued(update_quantity, worker_argv(), logs, per_round, f"mes_tasks-{r}", tmp)
            elif design == "unkept":
                rate = run_queued(
                    update_quantity, worker_argv(), logs, per_round, f"unkept-{r}", tmp, MES_LOCK_LINGER_S="0"
                )
            elif design == "classic":
                rate = run_queued(classic.update, classic_argv, c_logs, per_round, f"classic-{r}", tmp)
            else:
                rate = floor(f"floor-{r}")
            rates[design].append(rate)
    med = {design: statistics.median(values) for design, values in rates.items()}

    def paired(other: str) -> float:
        """Median over rounds of the ratio within a round (the server drifts between rounds)."""
        pairs = zip(rates["mes_tasks"], rates[other], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    return {
        **{design: round(value, 1) for design, value in med.items()},
        "ratio_vs_classic": paired("classic"),
        "ratio_vs_floor": paired("floor"),
        "ratio_vs_unkept": paired("unkept"),
        "enqueue_per_s": {
            design: round(statistics.median(v for k, v in ENQUEUED.items() if k.startswith(f"{design}-")), 1)
            for design in ("mes_tasks", "classic")
        },
        "updates": per_round * rounds,
        "rounds": rounds,
        "per_round": {design: [round(v, 1) for v in values] for design, values in rates.items()},
    }


def offered(rate: float, duration_s: float, send: Callable[[int], None]) -> None:
    started = time.monotonic()
    for i in range(int(rate * duration_s)):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        send(i)


def latency(rates: list[float], duration_s: float, tmp: Path) -> dict[str, dict[str, float]]:
    """Steady-state latency per offered rate, after a warm-up of one update per work order.

    The first update of a work order on fresh collections takes its lock and fence, and
    the worker's first task opens its connections; on a slow server that start costs a
    backlog the rest of a short run then queues behind. It is measured on its own
    (``warm_up_max_ms``), not mixed into the percentiles.
    """
    from devtools.devserver import worker_argv
    from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder
    from mes_tasks.tasks import update_quantity

    logs = QuantityLog._get_collection()
    out: dict[str, dict[str, float]] = {}
    worker = Worker(worker_argv(), tmp / "latency.log")
    try:
        for rate in rates:
            reset([WorkOrder._get_collection(), logs, OutboxMessage._get_collection()])
            seed_work_orders(WorkOrder._get_collection())
            warm: dict[str, datetime] = {}
            offered(rate, len(WORK_ORDERS) / rate, _sender(update_quantity, rate, warm, "warm"))
            wait_for_logs(logs, len(warm), f"warm-up at {rate:g}/s")
            sent: dict[str, datetime] = {}
            offered(rate, duration_s, _sender(update_quantity, rate, sent))
            wait_for_logs(logs, len(warm) + len(sent), f"latency at {rate:g}/s")
            at = {**warm, **sent}
            took = {
                log["request_id"]: (log["created_at"].replace(tzinfo=UTC) - at[log["request_id"]])
                for log in logs.find({}, {"request_id": 1, "created_at": 1})
            }
            ms = sorted(took[rid].total_seconds() * 1000 for rid in sent)
            out[f"{rate:g}"] = {
                "p50_ms": pct(ms, 50),
                "p95_ms": pct(ms, 95),
                "p99_ms": pct(ms, 99),
                "max_ms": round(ms[-1], 1),
                "n": len(ms),
                "warm_up_max_ms": round(max(took[rid].total_seconds() * 1000 for rid in warm), 1),
            }
    finally:
        worker.stop()
    return out


def _sender(task: Any, rate: float, sent: dict[str, datetime], prefix: str = "lat") -> Callable[[int], None]:
    def send(i: int) -> None:
        rid = f"{prefix}:{rate:g}:{i}"
        sent[rid] = datetime.now(UTC)
        task.apply_async((WORK_ORDERS[i % len(WORK_ORDERS)], "output", 1), {"request_id": rid})

    return send


def pct(sorted_ms: list[float], p: float) -> float:
    return round(sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p / 100))], 1)


def audit_scaling(sizes: list[int]) -> dict[str, dict[str, float]]:
    import audit_scale

    from mes_tasks import db
    from mes_tasks.settings import get_settings

    mongo = db.prepare(get_settings())
    out = {}
    for n in sizes:
        print(f"  audit: loading {n} logs", file=sys.stderr, flush=True)
        audit_scale.load(n, audit_scale.DEFAULT_WORK_ORDERS)
        group = min(audit_scale.bare_group_s() for _ in range(2))
        took, peak_mb, _ = audit_scale.audit_s(mongo)
        out[str(n)] = {
            "audit_s": round(took, 3),
            "group_floor_s": round(group, 3),
            "ratio": round(took / group, 3),
            "peak_py_mb": round(peak_mb, 2),
        }
    return out


def worker_memory(sizes: list[int], tmp: Path) -> dict[str, float]:
    from devtools.devserver import worker_argv
    from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder
    from mes_tasks.tasks import update_quantity

    logs = QuantityLog._get_collection()
    reset([WorkOrder._get_collection(), logs, OutboxMessage._get_collection()])
    seed_work_orders(WorkOrder._get_collection())
    worker = Worker(worker_argv(), tmp / "memory.log")
    out = {"rss_mb_start": round(worker.rss_mb(), 1)}
    try:
        done = 0
        for size in sorted(sizes):
            batch = updates(size, "mem")[done:]
            for start in range(0, len(batch), ENQUEUE_BATCH):
                for args, kwargs in batch[start : start + ENQUEUE_BATCH]:
                    update_quantity.apply_async(args, kwargs)
            wait_for_logs(logs, size, f"memory to {size}")
            done = size
            out[f"rss_mb_{_label(size)}"] = round(worker.rss_mb(), 1)
    finally:
        worker.stop()
    return out


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "celery": version("celery"),
        "mongodb_server": server_version(),
        "redis_server": redis_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def server_version() -> str:
    from mes_tasks import db
    from mes_tasks.settings import get_settings

    return str(db.connect(get_settings()).server_info().get("version"))


def redis_version() -> str:
    from mes_tasks import db
    from mes_tasks.settings import get_settings

    return str(db.redis_client(get_settings()).info("server")["redis_version"])


def table(results: dict[str, Any]) -> str:
    lines = []
    if t := results.get("throughput"):
        lines += [
            f"throughput (updates/s, {t['updates']} updates, one solo worker)",
            f"  mes_tasks {t['mes_tasks']:>8}   classic {t['classic']:>8}   floor {t['floor']:>8}"
            f"   unkept locks {t['unkept']:>8}",
            f"  mes_tasks / classic = {t['ratio_vs_classic']:.2f}"
            f"   mes_tasks / floor = {t['ratio_vs_floor']:.2f}"
            f"   mes_tasks / unkept = {t['ratio_vs_unkept']:.2f}",
            f"  enqueue/s: mes_tasks (recorded in the outbox) {t['enqueue_per_s']['mes_tasks']}"
            f"   classic {t['enqueue_per_s']['classic']}",
        ]
    if "latency" in results:
        header = "  offered/s      p50      p95      p99      max  warm-up max"
        lines += ["latency delay() -> commit (ms), after a warm-up of one update per work order", header]
        for rate, row in results["latency"].items():
            lines.append(
                f"  {rate:>9} {row['p50_ms']:>8} {row['p95_ms']:>8} {row['p99_ms']:>8} {row['max_ms']:>8}"
                f" {row.get('warm_up_max_ms', '-'):>12}"
            )
    if "audit" in results:
        lines.append("audit (s)\n      logs    audit   $group    ratio  peak MB")
        for n, row in results["audit"].items():
            cells = (n, row["audit_s"], row["group_floor_s"], row["ratio"], row["peak_py_mb"])
            lines.append("  " + " ".join(f"{cell:>8}" for cell in cells))
    if "memory" in results:
        lines.append("worker RSS (MB): " + ", ".join(f"{k}={v}" for k, v in results["memory"].items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--rates", default="50,100,200")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per offered rate")
    parser.add_argument("--audit-sizes", default="10000,100000,1000000")
    parser.add_argument("--memory-sizes", default="1000,100000")
    parser.add_argument("--phases", default=",".join(PHASES), help="a subset of " + ",".join(PHASES))
    parser.add_argument(
        "--profile",
        nargs="?",
        const=str(BENCH / "profile.txt"),
        help="py-spy the mes_tasks worker in an extra throughput round; write its top entries here",
    )
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    args = parser.parse_args()
    if args.quick:
        args.updates, args.rounds, args.rates, args.duration = 300, 1, "50,100", 3.0
        args.audit_sizes, args.memory_sizes = "2000,10000", "500,2000"
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        parser.error(f"--phases: unknown {', '.join(sorted(phases - set(PHASES)))}; choose from {PHASES}")
    if args.profile and not py_spy():
        parser.error("--profile needs py-spy on the PATH (pip install py-spy)")
    sys.path.insert(0, str(BENCH))
    with tempfile.TemporaryDirectory(prefix="mes-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        servers = start_servers(tmp)
        try:
            results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
            profile = None if args.profile is None else Path(args.profile)
            rates = [float(r) for r in args.rates.split(",")]
            if "throughput" in phases:
                results["throughput"] = throughput(args.updates, args.rounds, tmp, profile)
                rates.append(results["throughput"]["mes_tasks"])
                save(results, args.out)
            if "latency" in phases:
                results["latency"] = latency(rates, args.duration, tmp)
                save(results, args.out)
            if "memory" in phases:
                results["memory"] = worker_memory([int(n) for n in args.memory_sizes.split(",")], tmp)
                save(results, args.out)
            if "audit" in phases:
                results["audit"] = audit_scaling([int(n) for n in args.audit_sizes.split(",")])
        finally:
            for server in reversed(servers):
                server.stop()
    print(table(results))
    save(results, args.out)
    print(f"written to {args.out}")
    return 0


def save(results: dict[str, Any], out: str) -> None:
    """Written after every phase, so a long run that is cut short keeps what it measured."""
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
