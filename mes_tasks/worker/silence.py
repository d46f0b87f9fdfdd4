"""A Redis gone silent is left all at once: a read timeout drops every idle Redis connection.

A master that stops answering without closing its connections (frozen, cut off by a
partition, a proxy or NAT that lost its state) leaves every open connection of the worker
silent while new ones work. Each is given up only after its own read timeout
(``MES_REDIS_TIMEOUT_S``), and a worker holds several, in mes_tasks's pools and in kombu's
and Celery's (the acks, the task events, the result store, the retries' publisher, the
locks): met one after another in the event loop, they cost a second each, 8-12 s in the
partitioned chaos run, with the partitions unconsumed meanwhile. After one read timeout the
others are most likely silent too: every idle pooled connection of the process is dropped at
once, and the next command on it opens a new one (a millisecond on a healthy Redis, so a
timeout that was only a slow reply costs next to nothing). A connection in use is left to its
own timeout; the consume's is the broker watchdog's (``consumer.BrokerWatchdog``), which
reconnects it sooner shortly after a sweep.

Installed in the worker process only (``consumer.Consumer``): redis-py's pools are told to
note themselves when they make a connection, and its reads to report a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import redis
from redis.connection import AbstractConnection, BlockingConnectionPool, ConnectionPool

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0  # a Redis that stays silent is swept again at most this often

_POOLS: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
_LOCK = threading.Lock()
_installed = False
_swept_at = 0.0


def install() -> None:
    """Note every pool that makes a connection from now on, and sweep them on a read timeout."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
    for pool_class in (ConnectionPool, BlockingConnectionPool):
        pool_class.make_connection = _noting(pool_class.make_connection)  # type: ignore[method-assign]
    read = AbstractConnection.read_response

    def read_response(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(self, *args, **kwargs)
        except redis.TimeoutError:
            sweep()
            raise

    AbstractConnection.read_response = read_response  # type: ignore[method-assign]


def _noting(make: Any) -> Any:
    def make_connection(pool: ConnectionPool) -> Any:
        _POOLS.add(pool)
        return make(pool)

    return make_connection


def swept_at() -> float:
    """When the last sweep ran (``time.monotonic``; 0.0: never)."""
    return _swept_at


def sweep() -> int:
    """Disconnect every idle connection of every noted pool; how many pools (0: swept just now)."""
    global _swept_at
    with _LOCK:
        if time.monotonic() - _swept_at < SWEEP_EVERY_S:
            return 0
        _swept_at = time.monotonic()
        pools = list(_POOLS)
    for pool in pools:
        try:
            pool.disconnect(inuse_connections=False)
        except Exception:  # a pool closing meanwhile: nothing to drop
            log.debug("could not sweep a Redis pool", exc_info=True)
    log.warning("a Redis read timed out: dropped the idle connections of %d pool(s)", len(pools))
    return len(pools)
