"""Partition throughput: how a backlog drains with MES_PARTITIONS=1, 2 and 4, side by side.

    python bench/partitions.py [--updates N] [--rounds N] [--out FILE]

On one redis-server and one SecantusDB (started here, or REDIS_URL / MONGODB_URI), each
round drains a backlog of ``--updates`` over 24 work orders, enqueued before the workers
start, through

1. mes_tasks, MES_PARTITIONS=1, 2, 4 with as many solo ``-Q workorder`` workers;
2. the classic design (bench/classic.py), one worker, for reference;
3. the ceiling: two independent single-worker deployments (own Redis database, own
   MongoDB database, half the backlog each, on the 12 work orders that one worker of
   MES_PARTITIONS=2 holds) on the same servers, drained at once;
4. the floor: the transactional apply in a loop in this process, no Celery.

A mes_tasks backlog is enqueued under a pause (``pause:workorder``), so every worker has
started and holds its share of the partitions before the first update; each rate is
taken between the first and the last commit. The 24 work orders are chosen so that each
of 2 or 4 partitions gets the same number. Each configuration's updates are enqueued by a
subprocess with its own environment (settings are read once per process), on flushed
Redis databases and dropped collections: point REDIS_URL / MONGODB_URI at nothing you keep
(the ceiling's second deployment uses Redis database 4 and MongoDB database ``<name>_b``
of the same servers). The configurations run in an order rotated per round;
ratios are medians of the ratios within a round. The CPU seconds that the workers,
redis-server and SecantusDB spend during each drain (``/proc/<pid>/stat``) show which
resource bends the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cache, cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py and classic.py, beside this file
from run import BENCH, REPO, machine, start_servers

from devtools.process import Child

CONFIGS = ("p1", "p2", "p4", "classic", "ceiling", "floor")
PARTITIONED = {"p1": 1, "p2": 2, "p4": 4}  # partitions, and as many workers
# pNgM: N partitions (and workers) applying up to M waiting updates together (MES_GROUP_MAX=M)
GROUPED = re.compile(r"p([124])g([1-9][0-9]*)")
CEILING = re.compile(r"ceiling(g[1-9][0-9]*)?")  # ceilinggM: each of the two deployments in groups of M
WORK_ORDER_COUNT = 24
BALANCED_OVER = 4  # the work orders split evenly over 4 partitions, hence over 2
ENQUEUE_BATCH = 100
READY_TIMEOUT_S = 60.0
SHARE_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 600.0
ENQUEUE_TIMEOUT_S = 300.0
POLL_S = 0.2
LOOK_MAX_S = 10.0  # the longest wait between two looks at a drain's progress
SECOND_REDIS_DB = 4  # the ceiling's second deployment (5 if REDIS_URL's is 4)
SECOND_MONGO_DB_SUFFIX = "_b"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def work_orders(half: int | None = None) -> list[str]:
    """24 work-order ids, 6 in each of 4 partitions (CRC-32 mod 4), hence 12 in each of 2.

    ``half``: only the 12 of that partition of 2, the work orders one of 2 workers holds.
    """
    per = WORK_ORDER_COUNT // BALANCED_OVER
    chosen: list[str] = []
    for i in range(10_000):
        wo = f"P-{i:04d}"
        part = zlib.crc32(wo.encode()) % BALANCED_OVER
        if sum(zlib.crc32(c.encode()) % BALANCED_OVER == part for c in chosen) < per:
            chosen.append(wo)
        if len(chosen) == WORK_ORDER_COUNT:
            return chosen if half is None else [wo for wo in chosen if zlib.crc32(wo.encode()) % 2 == half]
    raise RuntimeError("no balanced set of work orders")


def items(n: int, tag: str, half: int | None = None) -> list[dict[str, Any]]:
    wos = work_orders(half)
    return [
        {
            "work_order_id": wos[i % len(wos)],
            "kind": ("input", "output")[i % 2],
            "quantity": 1 + i % 3,
            "request_id": f"{tag}:{i}",
            "context": {"barcode": f"BC{i}", "source": "BENCH"},
        }
        for i in range(n)
    ]


# -- the subprocess: one deployment's fresh state and backlog ------------------------------


def prepare_here(design: str, n: int, tag: str, half: int | None) -> None:
    """Flush Redis, drop the collections, seed the work orders, enqueue n updates (paused)."""
    import classic

    from mes_tasks import db
    from mes_tasks.keys import pause_key
    from mes_tasks.models import ALL_MODELS, WorkOrder
    from mes_tasks.settings import get_settings

    settings = get_settings()
    db.prepare(settings)
    client = db.redis_client(settings)
    client.flushdb()
    c_wo, c_logs = classic._collections()
    for coll in [m._get_collection() for m in ALL_MODELS] + [c_wo, c_logs]:
        coll.drop()
    for model in ALL_MODELS:
        model.ensure_indexes()
    c_logs.create_index("work_order_id")
    seeded = c_wo if design == "classic" else WorkOrder._get_collection()
    seeded.insert_many([{"_id": wo, "input_qty": 0, "output_qty": 0} for wo in work_orders(half)])
    if design == "classic":
        for it in items(n, tag, half):
            classic.update.delay(
                it["work_order_id"], it["kind"], it["quantity"], it["request_id"], it["context"]
            )
    elif design == "mes_tasks":
        client.set(pause_key(settings.key_prefix), json.dumps({"at": datetime.now(UTC).isoformat()}))
        enqueue(items(n, tag, half))


def enqueue(todo: list[dict[str, Any]]) -> None:
    from mes_tasks.send.producer import submit_quantity_updates

    for start in range(0, len(todo), ENQUEUE_BATCH):
        refused = [
            r for r in submit_quantity_updates(todo[start : start + ENQUEUE_BATCH]) if not r["success"]
        ]
        if refused:
            raise RuntimeError(f"enqueue refused: {refused[0]}")


# -- this process: deployments, workers, drains --------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One mes_tasks installation: its Redis database, its MongoDB database, its partitions."""

    redis_url: str
    mongodb_uri: str
    partitions: int = 1
    group_max: int = 1

    def env(self) -> dict[str, str]:
        pythonpath = f"{BENCH}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        return {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "REDIS_URL": self.redis_url,
            "MONGODB_URI": self.mongodb_uri,
            "MES_PARTITIONS": str(self.partitions),
            "MES_GROUP_MAX": str(self.group_max),
        }

    def with_partitions(self, partitions: int, group_max: int = 1) -> Deployment:
        return Deployment(self.redis_url, self.mongodb_uri, partitions, group_max)

    def prepare(self, design: str, n: int, tag: str, tmp: Path, half: int | None = None) -> Child:
        argv = [sys.executable, __file__, "--prepare", design, "--updates", str(n), "--tag", tag]
        argv += [] if half is None else ["--half", str(half)]
        return Child(f"prepare-{tag}", argv, tmp / f"prepare-{tag}.log", env=self.env(), cwd=REPO).start()

    def settings(self) -> Any:
        from mes_tasks.settings import Settings

        return Settings.from_env(self.env())

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def logs(self, design: str) -> Any:
        database = _mongo(self.mongodb_uri)[self.settings().mongodb_db]
        return database.classic_logs if design == "classic" else database.quantity_logs


@cache
def _mongo(uri: str) -> Any:
    from pymongo import MongoClient

    return MongoClient(uri)


def second(first: Deployment) -> Deployment:
    """The ceiling's other deployment: another Redis database and another MongoDB database."""
    r = urlsplit(first.redis_url)
    m = urlsplit(first.mongodb_uri)
    other = SECOND_REDIS_DB if r.path != f"/{SECOND_REDIS_DB}" else SECOND_REDIS_DB + 1
    return Deployment(
        urlunsplit(r._replace(path=f"/{other}")),
        urlunsplit(m._replace(path=m.path.rstrip("/") + SECOND_MONGO_DB_SUFFIX)),
    )


def finish(children: list[Child]) -> None:
    for child in children:
        child.wait(ENQUEUE_TIMEOUT_S)
        if child.returncode != 0:
            raise RuntimeError(f"{child.name} failed:\n{child.log_text()[-2000:]}")


def start_workers(dep: Deployment, argv_of: list[list[str]], tag: str, tmp: Path) -> list[Child]:
    workers = [
        Child(f"{tag}-w{i}", argv, tmp / f"{tag}-w{i}.log", env=dep.env(), cwd=REPO).start()
        for i, argv in enumerate(argv_of)
    ]
    for worker in workers:
        if not worker.wait_for(" ready.", READY_TIMEOUT_S):
            for w in workers:
                w.kill()
            raise RuntimeError(f"worker did not start:\n{worker.log_text()[-2000:]}")
    return workers


def wait_for_shares(dep: Deployment, workers: list[Child]) -> None:
    """Until each worker holds its equal share of the partitions' leases (still paused)."""
    from mes_tasks.keys import lease_key
    from mes_tasks.partitions import queue_names

    client, prefix = dep.redis(), dep.settings().key_prefix
    keys = [lease_key(prefix, q) for q in queue_names(dep.partitions)]
    want = {str(w.pid): dep.partitions // len(workers) for w in workers}
    deadline = time.monotonic() + SHARE_TIMEOUT_S
    while (held := _holders(client.mget(keys))) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"partitions not shared out: {held}, expected {want}")
        time.sleep(POLL_S)


def _holders(tokens: list[bytes | None]) -> dict[str, int]:
    pids = [t.decode().partition("/")[0].rpartition(":")[0].rpartition(":")[2] for t in tokens if t]
    return {pid: pids.count(pid) for pid in set(pids)} if len(pids) == len(tokens) else {}


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy, on all cores (others' work included)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {
        **{name: sum(cpu_s(pid) for pid in pids) for name, pids in groups.items()},
        "machine": machine_busy_s(),
    }


def usage(before: dict[str, float], after: dict[str, float], updates: int, rate: float) -> dict[str, Any]:
    """CPU per update of each process group, and the cores each kept busy at that rate."""
    per = {k: (after[k] - before[k]) / updates for k in after}
    return {
        "rate": rate,
        "cpu_ms_per_update": {k: round(1000 * v, 3) for k, v in per.items()},
        "cores_busy": {k: round(v * rate, 2) for k, v in per.items()},
    }


@dataclass
class Drain:
    """Backlogs being drained: where their logs appear, what they expect, whose CPU counts."""

    sources: list[tuple[Any, int]]  # (logs collection, updates expected)
    pids: dict[str, list[int]]

    def run(self, resume: list[tuple[Deployment, bool]]) -> dict[str, Any]:
        from mes_tasks.keys import pause_key

        before = cpu_of(self.pids)
        already = sum(logs.estimated_document_count() for logs, _ in self.sources)
        for dep, paused in resume:
            if paused:
                dep.redis().delete(pause_key(dep.settings().key_prefix))
        self.wait()
        after = cpu_of(self.pids)
        counted = sum(n for _, n in self.sources) - already  # the classic worker starts at once
        return usage(before, after, counted, commit_rate([logs for logs, _ in self.sources]))

    def wait(self) -> None:
        """Until every source has its logs. SecantusDB answers even an estimated count by
        reading every document, so a look costs the server in proportion to the logs: five
        looks a second took a tenth of a core from the drain being measured. The next look
        is timed by the rate so far (half the time the rest should take): a few looks per
        drain, then every ``POLL_S`` near its end."""
        started = time.monotonic()
        deadline = started + DRAIN_TIMEOUT_S
        for logs, n in self.sources:
            while (have := logs.estimated_document_count()) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {have}/{n} applied")
                rate = have / max(time.monotonic() - started, POLL_S)
                time.sleep(min(LOOK_MAX_S, max(POLL_S, (n - have) / (2 * rate))) if rate else POLL_S)


def commit_rate(all_logs: list[Any]) -> float:
    """Updates per second between the first and the last commit over all the collections."""
    firsts = [logs.find_one(sort=[("created_at", 1)])["created_at"] for logs in all_logs]
    lasts = [logs.find_one(sort=[("created_at", -1)])["created_at"] for logs in all_logs]
    n = sum(logs.count_documents({}) for logs in all_logs)
    return float((n - 1) / max((max(lasts) - min(firsts)).total_seconds(), 1e-9))


@dataclass
class Bench:
    first: Deployment
    servers: dict[str, list[int]]
    n: int
    tmp: Path

    @cached_property
    def ledger(self) -> Any:
        """The floor's ledger, in this process, on the first deployment (one partition)."""
        from mes_tasks import db
        from mes_tasks.apply.keptlocks import KeptLocks
        from mes_tasks.apply.ledger import Ledger
        from mes_tasks.settings import get_settings

        settings = get_settings()
        return Ledger(
            db.prepare(settings), db.redis_client(settings), settings, KeptLocks(settings.lock_linger_s)
        )

    def measure(self, config: str, tag: str) -> dict[str, Any]:
        if config == "floor":
            return self.floor(tag)
        if CEILING.fullmatch(config):
            group_max = int(config[len("ceilingg") :] or 1) if config != "ceiling" else 1
            deps = [replace(d, group_max=group_max) for d in (self.first, second(self.first))]
            # each deployment the 12 work orders one worker of 2 partitions holds: the same work
            finish(
                [d.prepare("mes_tasks", self.n // 2, f"{tag}-{i}", self.tmp, i) for i, d in enumerate(deps)]
            )
            return self.drain([(d, [_argv(f"{tag}-{i}")]) for i, d in enumerate(deps)], "mes_tasks", tag)
        if config == "classic":
            finish([self.first.prepare("classic", self.n, tag, self.tmp)])
            return self.drain([(self.first, [_argv(tag, classic=True)])], "classic", tag)
        dep = self.first.with_partitions(*shape(config))
        finish([dep.prepare("mes_tasks", self.n, tag, self.tmp)])
        return self.drain([(dep, [_argv(f"{tag}-{i}") for i in range(dep.partitions)])], "mes_tasks", tag)

    def drain(self, plan: list[tuple[Deployment, list[list[str]]]], design: str, tag: str) -> dict[str, Any]:
        """Start each deployment's workers, wait for their shares, resume them all at once, time it."""
        groups: list[tuple[Deployment, list[Child]]] = []
        try:
            for i, (dep, argv_of) in enumerate(plan):
                groups.append((dep, start_workers(dep, argv_of, f"{tag}-{i}", self.tmp)))
            paused = design == "mes_tasks"
            for dep, workers in groups if paused else []:
                wait_for_shares(dep, workers)
            sources = [(dep.logs(design), self.n // len(plan)) for dep, _ in groups]
            pids = {"workers": [w.pid for _, workers in groups for w in workers], **self.servers}
            return Drain(sources, pids).run([(dep, paused) for dep, _ in groups])
        finally:
            for _, workers in groups:
                for worker in workers:
                    worker.stop()

    def floor(self, tag: str) -> dict[str, Any]:
        from mes_tasks.validation import validate_update

        finish([self.first.prepare("floor", 0, tag, self.tmp)])
        ledger = self.ledger
        pids = {"workers": [os.getpid()], **self.servers}
        before, started = cpu_of(pids), time.perf_counter()
        for it in items(self.n, tag):
            update = validate_update(it["work_order_id"], it["kind"], it["quantity"], context=it["context"])
            ledger.apply(update, it["request_id"])
        took, after = time.perf_counter() - started, cpu_of(pids)
        assert ledger.kept is not None
        ledger.kept.release_all()
        return usage(before, after, self.n, self.n / took)


def shape(config: str) -> tuple[int, int]:
    """A mes_tasks configuration's partitions and MES_GROUP_MAX."""
    grouped = GROUPED.fullmatch(config)
    if grouped:
        return int(grouped[1]), int(grouped[2])
    return PARTITIONED[config], 1


def known(config: str) -> bool:
    return config in CONFIGS or GROUPED.fullmatch(config) is not None or CEILING.fullmatch(config) is not None


def _argv(name: str, classic: bool = False) -> list[str]:
    from devtools.devserver import worker_argv

    if classic:
        import classic as design

        return worker_argv(design.QUEUE, name, app="classic")
    return worker_argv(name=name)


RATIOS = {  # name: (numerator, denominator, workers the denominator is scaled by)
    "p2/p1": ("p2", "p1", 1),
    "p4/p1": ("p4", "p1", 1),
    "ceiling/p1": ("ceiling", "p1", 1),
    "efficiency p2": ("p2", "p1", 2),
    "efficiency p4": ("p4", "p1", 4),
    "efficiency ceiling": ("ceiling", "p1", 2),
    "p1/classic": ("p1", "classic", 1),
    "p1/floor": ("p1", "floor", 1),
}


def rounds(bench: Bench, count: int, configs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every configuration once per round, in an order rotated per round."""
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in configs}
    for r in range(count):
        first = r % len(configs)
        for config in configs[first:] + configs[:first]:
            runs[config].append(bench.measure(config, f"{config}-{r}"))
            print(
                f"  round {r + 1}/{count} {config}: {runs[config][-1]['rate']:.1f}/s",
                file=sys.stderr,
                flush=True,
            )
    return runs


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rates = {config: [float(run["rate"]) for run in values] for config, values in runs.items()}

    def paired(a: str, b: str, scale: int) -> float:
        return round(statistics.median(x / (scale * y) for x, y in zip(rates[a], rates[b], strict=True)), 2)

    def median_of(config: str, field: str) -> dict[str, float]:
        keys = runs[config][0][field]
        return {k: round(statistics.median(run[field][k] for run in runs[config]), 2) for k in keys}

    bases = ("classic", "floor", "p1", "p1g100")
    grouped = {
        f"{g}/{b}": (g, b, 1)
        for g in rates
        if GROUPED.fullmatch(g) or (g != "ceiling" and CEILING.fullmatch(g))
        for b in bases
        if b != g
    }
    return {
        "per_s": {config: round(statistics.median(values), 1) for config, values in rates.items()},
        "ratios": {
            name: paired(*spec)
            for name, spec in {**RATIOS, **grouped}.items()
            if {spec[0], spec[1]} <= rates.keys()
        },
        "cpu_ms_per_update": {config: median_of(config, "cpu_ms_per_update") for config in runs},
        "cores_busy": {config: median_of(config, "cores_busy") for config in runs},
        "per_round": {config: [round(v, 1) for v in values] for config, values in rates.items()},
    }


LABELS = {
    "p1": "mes_tasks, 1 partition, 1 worker",
    "p2": "mes_tasks, 2 partitions, 2 workers",
    "p4": "mes_tasks, 4 partitions, 4 workers",
    "classic": "classic, 1 worker",
    "ceiling": "ceiling: 2 deployments x 1 worker",
    "floor": "floor: apply in a loop, no Celery",
}


def label_of(config: str) -> str:
    if CEILING.fullmatch(config):
        return f"ceiling: 2 deployments x 1 worker, groups of {config[len('ceilingg') :]}"
    partitions, group_max = shape(config)
    return f"mes_tasks, {partitions} partition(s), groups of {group_max}"


GROUPS = ("workers", "redis", "mongo", "machine")


def table(res: dict[str, Any], n: int, count: int) -> str:
    lines = [
        f"drain rate (updates/s committed; median of {count} rounds of {n})",
        f"  {'':36} {'per s':>7}   CPU ms per update ({'/'.join(GROUPS)})   cores busy (same)",
    ]
    labels = {**LABELS, **{c: label_of(c) for c in res["per_s"] if c not in LABELS}}
    for config, label in labels.items():
        if config not in res["per_s"]:
            continue
        cpu = "/".join(f"{res['cpu_ms_per_update'][config].get(g, 0):.2f}" for g in GROUPS)
        busy = "/".join(f"{res['cores_busy'][config].get(g, 0):.2f}" for g in GROUPS)
        lines.append(f"  {label:36} {res['per_s'][config]:>7}   {cpu:<38} {busy}")
    lines.append("ratios (median of the per-round ratios)")
    lines += [f"  {name:<20} {value:.2f}" for name, value in res["ratios"].items()]
    return "\n".join(lines)


def server_pids(servers: list[Any]) -> dict[str, list[int]]:
    """The servers started here, each with its child processes (SecantusDB may fork)."""
    return {server.name: [server.pid, *children(server.pid)] for server in servers}


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        listed = task / "children"  # absent without CONFIG_PROC_CHILDREN: the server alone
        for child in listed.read_text().split() if listed.exists() else []:
            found += [int(child), *children(int(child))]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=1200, help="backlog per configuration per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the results, as JSON, here")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"a subset of {','.join(CONFIGS)}, and pNgM: N partitions, groups of M (default: {CONFIGS})",
    )
    parser.add_argument("--prepare", choices=("mes_tasks", "classic", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--half", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or not all(known(c) for c in configs):
        parser.error(f"--configs: choose from {','.join(CONFIGS)}, or pNgM (N partitions, groups of M)")
    if args.prepare:
        prepare_here(args.prepare, args.updates, args.tag, args.half)
        return 0
    with tempfile.TemporaryDirectory(prefix="mes-bench-partitions-") as tmp_dir:
        tmp = Path(tmp_dir)
        servers = start_servers(tmp)
        try:
            first = Deployment(os.environ["REDIS_URL"], os.environ["MONGODB_URI"])
            bench = Bench(first, server_pids(servers), args.updates, tmp)
            results = {"machine": machine(), "updates": args.updates, "rounds": args.rounds}
            results["drain"] = summary(rounds(bench, args.rounds, configs))
        finally:
            for server in reversed(servers):
                server.stop()
    print(table(results["drain"], args.updates, args.rounds))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
