"""Test servers: a real redis-server and SecantusDB on free ports, plus worker subprocesses.

The test environment is set in ``pytest_configure``, before any test module (and so
mes_tasks, whose app reads its settings at import) is imported, so the producer in this
process and every worker subprocess agree. Nothing here imports mes_tasks at module level.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devtools.devserver import free_port, mongo_service, redis_service, secantus_uri, worker_argv
from devtools.process import Child

REDIS_PORT = free_port()
MONGO_PORT = free_port()
TEST_ENV = {
    "REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/3",
    "MONGODB_URI": secantus_uri(MONGO_PORT, "mes_test"),
    "MES_LOCK_TTL_S": "3",
    "MES_LOCK_WAIT_S": "2",
    "MES_RETRY_MAX": "5",
    "MES_RETRY_BACKOFF_S": "0.05",
    "MES_RETRY_BACKOFF_MAX_S": "0.5",
    "MES_VISIBILITY_TIMEOUT_S": "12",
    "MES_UNACKED_RESTORE_INTERVAL_S": "1",
    "MES_CONNECT_TIMEOUT_S": "2",
    "MES_LEASE_TTL_S": "3",
}
# The shipped defaults of every timing TEST_ENV shortens: recovery is proved on these.
DEFAULT_TIMINGS = {
    "MES_LOCK_TTL_S": "30",
    "MES_LOCK_WAIT_S": "10",
    "MES_RETRY_MAX": "8",
    "MES_RETRY_BACKOFF_S": "1",
    "MES_RETRY_BACKOFF_MAX_S": "60",
    "MES_VISIBILITY_TIMEOUT_S": "600",
    "MES_UNACKED_RESTORE_INTERVAL_S": "10",
    "MES_CONNECT_TIMEOUT_S": "5",
    "MES_LEASE_TTL_S": "3",
}

if TYPE_CHECKING:
    from devtools.devserver import Service
    from mes_tasks import db
    from mes_tasks.settings import Settings

REPO = Path(__file__).resolve().parent.parent
WORKER_READY_TIMEOUT_S = 60.0


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(TEST_ENV)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("servers")
    redis_svc = redis_service(base / "redis", REDIS_PORT, base / "redis.log").start()
    mongo_svc = mongo_service(base / "mongo", MONGO_PORT, base / "mongo.log").start()
    yield {"redis": redis_svc, "mongo": mongo_svc}
    redis_svc.stop()
    mongo_svc.stop()


@pytest.fixture(scope="session")
def settings(servers: dict[str, object]) -> Settings:
    from mes_tasks.settings import get_settings

    return get_settings()


@pytest.fixture()
def mongo(settings: Settings) -> Iterator[db.Mongo]:
    from mes_tasks import db
    from mes_tasks.models import ALL_MODELS

    client = db.prepare(settings)
    for model in ALL_MODELS:
        model._get_collection().delete_many({})
    yield client


@pytest.fixture()
def redis_client(settings: Settings, mongo: db.Mongo) -> Iterator[object]:
    from mes_tasks import db

    client = db.redis_client(settings)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture()
def services(mongo: db.Mongo, redis_client: object) -> object:
    """Both stores, clean; the Redis client."""
    return redis_client


@pytest.fixture()
def env_override(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set environment variables for this process's settings, for one test."""
    from mes_tasks.settings import get_settings

    def override(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield override
    monkeypatch.undo()
    get_settings.cache_clear()


def outbox_waiting() -> int:
    """Outbox entries still without their outcome (a settled one waits only for a verification pass)."""
    from mes_tasks.models import OUTBOX_SETTLED, OutboxMessage

    return int(OutboxMessage.objects(state__ne=OUTBOX_SETTLED).count())


def make_work_orders(ids: list[str], **counters: int) -> None:
    from mes_tasks.models import WorkOrder

    for wo in ids:
        WorkOrder(id=wo, **counters).save()


def with_redis_down(servers: dict[str, Service], call: Callable[[], Any]) -> Any:
    """``call()`` while the test Redis is stopped; it is started again afterwards."""
    servers["redis"].stop()
    try:
        return call()
    finally:
        servers["redis"].start()


class Worker(Child):
    """A real ``celery`` process (a worker on ``workorder``, or beat) with its log."""

    def log(self) -> str:
        return self.log_text()

    def wait_for_log(self, text: str, timeout_s: float = 30.0) -> None:
        if not self.wait_for(text, timeout_s):
            state = f"exited ({self.returncode})" if not self.alive() else f"still running after {timeout_s}s"
            raise AssertionError(f"{text!r} not in the worker log, {state}:\n{self.log()[-3000:]}")


def spawn_worker(
    log_path: Path,
    name: str = "workorder",
    queue: str = "workorder",
    hold: str | None = None,
    **env: str,
) -> Worker:
    return spawn(worker_argv(queue=queue, name=name, hold=hold), log_path, **env)


def spawn(argv: list[str], log_path: Path, **env: str) -> Worker:
    """Any celery process (worker, beat) with the test environment, output to ``log_path``."""
    return Worker(log_path.stem, argv, log_path, env={**os.environ, **TEST_ENV, **env}, cwd=REPO).start()


@pytest.fixture()
def start_worker(tmp_path: Path, mongo: db.Mongo, redis_client: object) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(
        name: str = "workorder",
        wait: bool = True,
        queue: str = "workorder",
        hold: str | None = None,
        **env: str,
    ) -> Worker:
        """``hold``: ``POINT=SECONDS``, every update stops at that fault point (devtools.faultworker)."""
        log_path = tmp_path / f"worker-{len(workers)}.log"
        worker = spawn_worker(log_path, f"{name}{len(workers)}", queue, hold, **env)
        worker.name = f"{name}{len(workers)}@{socket.gethostname()}"
        workers.append(worker)
        if wait:
            worker.wait_for_log(" ready.", WORKER_READY_TIMEOUT_S)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


# Test tiers. fast: no servers, no subprocesses (``make test-fast``, seconds); the rest are
# integration tests (real Redis and SecantusDB over TCP) and end-to-end tests (``slow``:
# celery worker subprocesses). ``make test`` runs every tier.
SERVER_FIXTURES = {"servers", "settings", "mongo", "redis_client", "start_worker", "services"}
SUBPROCESS_FIXTURES = {"start_worker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SUBPROCESS_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if not names & SERVER_FIXTURES and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.fast)
