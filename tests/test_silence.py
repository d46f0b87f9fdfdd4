"""A Redis gone silent, against a real redis-server behind a proxy that keeps its open
connections open and forwards nothing on them, while new ones work."""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.devserver import Service
from devtools.faultproxy import FaultProxy
from mes_tasks.worker import silence

TIMEOUT_S = 1.0


def _client(port: int) -> redis.Redis:
    """A client that tries each command once, as kombu's and Celery's do."""
    return redis.Redis(port=port, socket_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0))  # type: ignore[no-untyped-call]


def test_one_read_timeout_drops_every_idle_connection_so_the_next_commands_answer_at_once(
    servers: dict[str, Service],
) -> None:
    """A worker holds idle connections in several pools (the acks', the events', the result
    store's, its locks'); after one read timeout each of them would cost its own. Swept, the
    next command on any of them opens a new connection and is answered."""
    silence.install()
    proxy = FaultProxy(servers["redis"].port).start()
    try:
        first, *others = [_client(proxy.port) for _ in range(4)]
        for client in [first, *others]:
            assert client.ping()  # each pool now holds one idle connection
        time.sleep(max(0.0, silence.swept_at() + silence.SWEEP_EVERY_S - time.monotonic()))
        assert proxy.silence_open() == 1 + len(others)
        with pytest.raises(redis.TimeoutError):
            first.ping()
        started = time.monotonic()
        assert all(client.ping() for client in others)
        assert time.monotonic() - started < TIMEOUT_S  # not one more timeout
    finally:
        proxy.close()
