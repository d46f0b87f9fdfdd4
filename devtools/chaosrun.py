"""The chaos run's stack under test: its workers, what was sent to it, who holds which queue.

The runtime is imported inside the functions: the chaos run sets the environment its
settings read first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devtools.chaosreport import Accepted, Db, Injection
from devtools.devserver import Service, secantus_uri, worker_argv
from devtools.faultproxy import FaultProxy
from devtools.process import Child
from devtools.sentinel import Topology

WORKORDER = "workorder"  # the queue an automatic worker is started on (any N)
WORKERS = 2  # an active consumer and a standby
PARTITIONED_WORKERS = 3  # with --partitions: three automatic workers share the partitions
BOOT_TIMEOUT_S = 90.0
HOLDERS_POLL_S = 0.2
BURST = 20  # updates sent at once right before a fault strikes or ends
BURST_WORK_ORDERS = 5  # spread over the first few work orders
FLOW_WORK_ORDERS = "^CH-[0-9]+$"  # the flow's work orders; the faults' own have other names
ENDED_BY_HARNESS = (signal.SIGKILL, signal.SIGTERM)


def proxied_mongo_uri(port: int) -> str:
    """SecantusDB through the proxy on ``port``.

    ``directConnection``: otherwise the driver discovers the replica set, connects to the
    member the server names (its real port) and every MongoDB fault misses.
    """
    return f"{secantus_uri(port, 'mes')}&directConnection=true"


class Worker(Child):
    """A worker subprocess on ``queue`` (``workorder``: automatic; ``workorder.{i}``: pinned).

    Remembers whether the harness ended it (SIGKILL, SIGTERM) or stopped it (SIGSTOP), so
    that an exit of its own, or a holder that cannot consume, can be told apart.
    """

    def __init__(
        self, name: str, log: Path, env: dict[str, str], hold: str | None = None, queue: str = WORKORDER
    ) -> None:
        super().__init__(name, worker_argv(queue=queue, name=name, hold=hold), log, env=env)
        self.log, self.queue = log, queue
        self.partitions = int(env.get("MES_PARTITIONS", "1"))
        self.ended_by_harness = False
        self.stopped = False  # SIGSTOPped and not resumed
        self.exit_reported = False
        self.start()

    def signal(self, signum: int) -> None:
        self.ended_by_harness = self.ended_by_harness or signum in ENDED_BY_HARNESS
        self.stopped = signum == signal.SIGSTOP or (self.stopped and signum != signal.SIGCONT)
        super().signal(signum)

    def kill(self) -> None:
        self.ended_by_harness = True
        super().kill()


@dataclass
class Run:
    """The stack under test, what was sent to it, and what the faults did."""

    tmp: Path
    db: Db  # a direct client of the store, past the proxy: the harness's own view
    redis: redis.Redis  # likewise
    services: dict[str, Service] = field(default_factory=dict)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    sentinel: Topology | None = None  # instead of the one Redis behind proxies (--sentinel)
    partitions: int = 1  # MES_PARTITIONS of the producers and of the workers it starts
    fleet: int = WORKERS  # live workers it keeps between injections
    workers: list[Worker] = field(default_factory=list)
    sent: Accepted = field(default_factory=Accepted)
    aside: set[str] = field(default_factory=set)  # request ids every recovery leaves out (own checks)
    injections: list[Injection] = field(default_factory=list)
    final_checks: list[tuple[Injection, Callable[[], list[str]]]] = field(default_factory=list)
    duplicates_sent: int = 0
    bad_sent: int = 0
    refused: int = 0  # bad input refused at the call site
    producer_refused: int = 0  # valid updates the producer did not take
    relay_errors: int = 0
    verify_passes: int = 0  # continuous-verification passes that finished
    verify_errors: int = 0  # passes a store outage cut short
    verify_alarms: list[str] = field(default_factory=list)  # what passes reported: all false alarms
    _producer: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1

    def worker_env(self, **extra: str) -> dict[str, str]:
        """Default settings: only the stores' addresses (the proxies), the run's N, and ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MES_")}
        redis_url = (
            self.sentinel.url() if self.sentinel else f"redis://127.0.0.1:{self.proxies['redis'].port}/3"
        )
        own_n = {"MES_PARTITIONS": str(self.partitions)} if self.partitioned else {}
        return {
            **env,
            "REDIS_URL": redis_url,
            "MONGODB_URI": proxied_mongo_uri(self.proxies["mongo"].port),
            **own_n,
            **extra,
        }

    def start_worker(self, hold: str | None = None, queue: str = WORKORDER, **extra: str) -> Worker:
        name = f"chaos{len(self.workers)}"
        log = self.tmp / f"worker-{len(self.workers)}.log"
        worker = Worker(name, log, self.worker_env(**extra), hold, queue)
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def lease_holder(self) -> Worker | None:
        """The live worker whose token holds the ``workorder`` lease, if any."""
        return self.holder_of(WORKORDER)

    def holder_of(self, queue: str) -> Worker | None:
        """The live worker whose token holds ``queue``'s lease, if any."""
        from mes_tasks.keys import lease_key
        from mes_tasks.settings import get_settings

        try:
            token = self.redis.get(lease_key(get_settings().key_prefix, queue))
        except redis.RedisError:
            return None
        return self.worker_of(token)

    def worker_of(self, token: Any) -> Worker | None:
        """The live worker a lease or lock token (``host:pid:tag/...``) names."""
        owner = token.split("/")[0].split(":") if isinstance(token, str) else []  # host:pid:tag
        pid = owner[-2] if len(owner) >= 3 else None
        return next((w for w in self.live_workers() if str(w.pid) == pid), None)

    def describe_holder(self, queue: str) -> str:
        """Who holds ``queue``'s lease, for a report: a worker's name and state, or nobody."""
        from mes_tasks.keys import lease_key
        from mes_tasks.settings import get_settings

        try:
            token = self.redis.get(lease_key(get_settings().key_prefix, queue))
        except redis.RedisError:
            return "unknown (Redis did not answer)"
        if not isinstance(token, str):
            return "nobody"
        owner = token.split("/")[0]
        worker = next((w for w in self.workers if f":{w.pid}:" in f"{owner}:"), None)
        if worker is None:
            return f"{owner} (not a worker of this run)"
        state = "exited" if not worker.alive() else "SIGSTOPped" if worker.stopped else "running"
        return f"{worker.name} ({state})"

    def queues(self) -> list[str]:
        """The workorder queues of the run's current N."""
        from mes_tasks.partitions import queue_names

        return queue_names(self.partitions)

    def unheld(self) -> list[str]:
        """The current queues no live worker holds the lease of."""
        return [q for q in self.queues() if self.holder_of(q) is None]

    def active_worker(self) -> Worker:
        holder = self.lease_holder()
        if holder is not None:
            return holder
        live = self.live_workers()
        took = [w for w in live if "took the workorder lease" in w.log_text()]
        return (took or live)[-1]

    def ensure_workers(self) -> list[str]:
        """Back to the fleet, all up, every queue held; what went wrong on the way.

        The fleet: an active worker and a standby; with partitions, three automatic workers
        on the run's N (a pinned one, or one left on another N, is stopped first).
        """
        for worker in self.live_workers():
            if worker.queue != WORKORDER or worker.partitions != self.partitions:
                worker.stop()
        for _ in range(self.fleet - len(self.live_workers())):
            self.start_worker()
        problems = [f"{w.name} did not start" for w in self.live_workers()
                    if not w.wait_for(" ready.", BOOT_TIMEOUT_S)]  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.unheld() and time.monotonic() < deadline:
            time.sleep(HOLDERS_POLL_S)
        unheld = self.unheld()
        if unheld:
            problems.append("no worker took the lease" if not self.partitioned else f"nobody holds {unheld}")
        return problems

    def unexpected_exits(self) -> list[str]:
        """A line for each worker that exited without the harness ending it (once each)."""
        lines = []
        for worker in self.workers:
            if worker.alive() or worker.ended_by_harness or worker.exit_reported:
                continue
            worker.exit_reported = True
            said = last_error(worker.log_text())
            lines.append(f"{worker.name} exited by itself (status {worker.returncode}){said}")
        return lines

    def set_producers(self, partitions: int) -> None:
        """The producers (this process: the flow, the faults, the relay) and new workers on ``partitions``."""
        from mes_tasks.settings import get_settings

        os.environ["MES_PARTITIONS"] = str(partitions)
        get_settings.cache_clear()
        self.partitions = partitions

    def submit(self, producer: Any, wo: str, kind: str, qty: int, rid: str) -> dict[str, Any]:
        """Submit one valid update; record it when the producer took it."""
        try:
            result: dict[str, Any] = producer.submit(wo, kind, qty, request_id=rid)
        except Exception as exc:  # the contract is a result dict, never an exception
            result = {"success": False, "code": "RAISED", "error": repr(exc)}
        if not result["success"]:
            self.producer_refused += 1
            print(f"chaos: the producer refused {rid}: {result}", file=sys.stderr, flush=True)
        elif not self.sent.accept(rid, (wo, kind, qty), time.time()):
            self.duplicates_sent += 1
        return result

    def burst(self, n: int = BURST, work_orders: list[str] | None = None, tag: str = "") -> None:
        """``n`` updates at once, so that the fault finds work queued and in hand.

        Request ids ``chaos:burst:{injection}{tag}:{i}``: a fault that bursts more than once
        tags each burst.
        """
        at = len(self.injections)
        wos = work_orders or [f"CH-{i:03d}" for i in range(BURST_WORK_ORDERS)]
        for i in range(n):
            self.submit(self.producer(), wos[i % len(wos)], "input", 1, f"chaos:burst:{at}{tag}:{i}")

    def work_orders_of(self, queue: str) -> list[str]:
        """The flow's work orders whose updates go to ``queue`` now."""
        from mes_tasks.partitions import queue_for

        ids = [d["_id"] for d in self.db.work_orders.find({"_id": {"$regex": FLOW_WORK_ORDERS}}, {"_id": 1})]
        return [wo for wo in sorted(ids) if queue_for(wo, self.partitions) == queue]

    def producer(self) -> Any:
        """The faults' own producer (the flow has another)."""
        from mes_tasks.send.producer import Producer

        with self._lock:
            if self._producer is None:
                self._producer = Producer()
            return self._producer

    def new_work_order(self, wo: str) -> None:
        self.db.work_orders.insert_one({"_id": wo, "input_qty": 0, "output_qty": 0})


ERROR_MARKS = ("Traceback", "Error", "ERROR", "CRITICAL", "exited")


def last_error(log: str) -> str:
    """``": <the log's last line that names an error>"``, or nothing."""
    lines = [line.strip() for line in log.splitlines() if any(m in line for m in ERROR_MARKS)]
    return f": {lines[-1][:300]}" if lines else ""
