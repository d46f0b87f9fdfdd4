"""A Redis Sentinel topology from the one ``redis-server`` binary, for the tests and the chaos run.

A primary and a replica (``--replicaof``), both with AOF on as ``redis_service`` runs
them, and three Sentinels (``redis-server sentinel.conf --sentinel``, quorum 2), all on
free ports of 127.0.0.1 with their files in one directory::

    topology = Topology(tmp).start()      # returns once the Sentinels agree on the primary
    os.environ["REDIS_URL"] = topology.url()
    topology.kill_primary(lag_s=0.5)      # SIGKILL; its last writes never reach the replica
    topology.wait_failover()              # the replica promoted, every Sentinel says so
    topology.rejoin()                     # the old primary back, as a replica of the new one

    python -m devtools.sentinel           # start one, print its REDIS_URL, stop on Ctrl-C

Replication is asynchronous, so a primary that dies takes with it the writes it had not
yet streamed. ``kill_primary(lag_s=...)`` makes that loss certain instead of a race: it
stops the replica, writes more to the primary than the kernel's socket buffers hold (so
everything after it waits in the primary's own memory), lets the application write for
``lag_s``, kills the primary and resumes the replica.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.sentinel

from devtools.devserver import Service, free_port, redis_answers, redis_server_binary, redis_service

MASTER_NAME = "mymaster"
SENTINELS = 3
QUORUM = 2
# 2000 pushed the chaos run's failover recovery past 5 s; 1000 once failed over spuriously under load.
# No lower: db.MASTER_RECHECK_IDLE_S assumes no failover completes within 1 s of the master's last answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
# A Sentinel does not start a second failover of the same master sooner than this.
FAILOVER_SPACING_S = 2 * FAILOVER_TIMEOUT_MS / 1000
AGREE_TIMEOUT_S = 30.0
POLL_S = 0.1
LAG_FILL_BYTES = 32 * 1024 * 1024  # beyond loopback's socket buffers: the rest waits in the primary
LAG_KEY = "mes:devtools:replication-lag"


class SentinelUnsupported(RuntimeError):
    """This ``redis-server`` has no Sentinel mode."""


def sentinel_supported(binary: str | None = None) -> bool:
    """Whether ``redis-server`` runs as a Sentinel (its help names the mode)."""
    shown = subprocess.run([binary or redis_server_binary(), "--help"], capture_output=True, text=True)
    return "--sentinel" in shown.stdout + shown.stderr


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=1, socket_connect_timeout=1)


class Topology:
    """One primary, one replica and three Sentinels; which node is primary changes on failover."""

    def __init__(self, base: Path, db: int = 3) -> None:
        self.base, self.db = base, db
        self.nodes: dict[int, Service] = {}  # port -> redis-server
        self.frozen: list[int] = []  # nodes left stopped by freeze_primary
        self.sentinels: list[Service] = []
        self.primary = 0  # port of the node the Sentinels were last seen to agree on
        self.killed: int | None = None  # port of a killed node not yet rejoined
        self.failed_over_at = 0.0

    def url(self, master_in_url: bool = True) -> str:
        """``REDIS_URL`` for mes_tasks: every Sentinel, then the database and the master's name."""
        hosts = ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{hosts}/{self.db}" + (f"?master_name={MASTER_NAME}" if master_in_url else "")

    def start(self) -> Topology:
        if not sentinel_supported():
            raise SentinelUnsupported(f"{redis_server_binary()} has no Sentinel mode (--sentinel)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.primary = free_port()
        self._start_node(self.primary, None)
        self._start_node(free_port(), self.primary)
        for i in range(SENTINELS):
            self.sentinels.append(self._start_sentinel(i, free_port()))
        self.wait_agreed(self.primary)
        return self

    def stop(self) -> None:
        for port in self.frozen:  # a stopped process acts on SIGTERM only once resumed
            self.nodes[port].signal(signal.SIGCONT)
        for service in [*self.sentinels, *self.nodes.values()]:
            service.stop()

    def client(self, **options: Any) -> redis.Redis:
        """A client of the current primary's database, found through the Sentinels."""
        sentinels = redis.sentinel.Sentinel([("127.0.0.1", s.port) for s in self.sentinels])  # type: ignore[no-untyped-call]
        master: redis.Redis = sentinels.master_for(MASTER_NAME, db=self.db, **options)  # type: ignore[no-untyped-call]
        return master

    def replica(self) -> int:
        return next(port for port in self.nodes if port not in (self.primary, self.killed))

    def kill_primary(self, lag_s: float = 0.0, during_lag: Callable[[], object] | None = None) -> int:
        """SIGKILL the primary; with ``lag_s``, after that long of writes the replica never got
        (``during_lag`` is called at its start, to write some).

        Returns the killed node's port.
        """
        wait = self.failed_over_at + FAILOVER_SPACING_S - time.monotonic()
        time.sleep(max(0.0, wait))
        victim, replica = self.nodes[self.primary], self.nodes[self.replica()]
        if lag_s:
            replica.signal(signal.SIGSTOP)
            try:
                _client(victim.port).set(LAG_KEY, b"x" * LAG_FILL_BYTES)
                lag_ends = time.monotonic() + lag_s
                if during_lag is not None:
                    during_lag()
                time.sleep(max(0.0, lag_ends - time.monotonic()))
            except Exception:  # never leave a node stopped: the stack would hang on it
                replica.signal(signal.SIGCONT)
                raise
        victim.signal(signal.SIGKILL)
        victim.wait(5.0)
        replica.signal(signal.SIGCONT)
        self.killed = victim.port
        return victim.port

    def freeze_primary(self) -> int:
        """SIGSTOP the primary and leave it stopped: it keeps its connections open and answers
        nothing, like a master cut off by a network partition. Returns its port."""
        time.sleep(max(0.0, self.failed_over_at + FAILOVER_SPACING_S - time.monotonic()))
        port = self.primary
        self.nodes[port].signal(signal.SIGSTOP)
        self.frozen.append(port)
        self.killed = port
        return port

    def wait_failover(self, timeout_s: float = AGREE_TIMEOUT_S) -> int:
        """Until every Sentinel names the replica as the new primary and it acts as one; its port."""
        old = self.killed if self.killed is not None else self.primary
        deadline = time.monotonic() + timeout_s
        while True:
            named = {self._named_by(s) for s in self.sentinels}
            if len(named) == 1 and None not in named and old not in named:
                new = named.pop()
                assert new is not None
                if self._role(new) == "master":
                    self.primary, self.failed_over_at = new, time.monotonic()
                    return new
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover away from port {old} within {timeout_s:g} s: {named}")
            time.sleep(POLL_S)

    def rejoin(self, wait: bool = True) -> None:
        """Start the killed node again (resume a frozen one) as a replica of the current primary;
        with ``wait``, until the Sentinels agree.

        A resumed node comes back a master, with the data it had when frozen, and stays one
        until the Sentinels demote it: they wait for it to report that role for 8 s (four of
        their 2 s hello periods, fixed in Redis) after it answers again, about 10 s in all.
        """
        if self.killed is None:
            return
        port, self.killed = self.killed, None
        if port in self.frozen:  # the partition heals: the Sentinels turn it into a replica
            self.frozen.remove(port)
            self.nodes[port].signal(signal.SIGCONT)
        else:
            self._start_node(port, self.primary)
        if wait:
            self.wait_agreed(self.primary)

    def wait_agreed(self, primary: int, timeout_s: float = AGREE_TIMEOUT_S) -> None:
        """Until every Sentinel names ``primary``, knows the others, and sees its replica in sync."""
        deadline = time.monotonic() + timeout_s
        while not self._agreed(primary):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels did not agree on port {primary} within {timeout_s:g} s")
            time.sleep(POLL_S)

    def _agreed(self, primary: int) -> bool:
        try:
            info = _client(primary).info("replication")
            states = [self._sentinel_view(s) for s in self.sentinels]
        except redis.RedisError:
            return False
        in_sync = info.get("role") == "master" and info.get("connected_slaves", 0) >= len(self.nodes) - 1
        in_sync = in_sync and all(
            v.get("state") == "online"
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict)
        )
        return in_sync and all(state == (primary, SENTINELS - 1, "master") for state in states)

    def _sentinel_view(self, sentinel: Service) -> tuple[int, int, str]:
        master: dict[str, Any] = _client(sentinel.port).sentinel_master(MASTER_NAME)  # type: ignore[assignment]
        return int(master["port"]), int(master["num-other-sentinels"]), _flags(master)

    def _named_by(self, sentinel: Service) -> int | None:
        try:
            addr: Any = _client(sentinel.port).sentinel_get_master_addr_by_name(MASTER_NAME)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def _role(self, port: int) -> str:
        try:
            return str(_client(port).info("replication").get("role"))
        except redis.RedisError:
            return ""

    def _start_node(self, port: int, replica_of: int | None) -> None:
        service = redis_service(self.base / f"redis-{port}", port, self.base / f"redis-{port}.log")
        if replica_of is not None:
            service.argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[port] = service.start()

    def _start_sentinel(self, i: int, port: int) -> Service:
        home = self.base / f"sentinel-{i}"
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "sentinel.conf"  # Sentinel rewrites it with what it learns
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {home.resolve()}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        argv = [redis_server_binary(), str(conf.resolve()), "--sentinel"]
        return Service(
            f"sentinel{i}", argv, port, self.base / f"sentinel-{i}.log", ready=redis_answers
        ).start()


def _flags(master: dict[str, object]) -> str:
    """redis-py reads a Sentinel's flags into booleans (``is_master``, ``is_sdown``...)."""
    if master.get("is_odown") or master.get("is_sdown") or master.get("is_failover_in_progress"):
        return "down"
    return "master" if master.get("is_master") else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.sentinel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--dir", default="var/sentinel", help="data, configuration and log directory")
    args = parser.parse_args(argv)
    topology = Topology(Path(args.dir)).start()
    print(f"REDIS_URL={topology.url()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        topology.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
