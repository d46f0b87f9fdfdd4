"""Connections to the two stores: MongoDB (mongoengine, transactions required) and Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mongoengine
import redis
import redis.sentinel
from mongoengine.connection import get_connection
from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError
from redis.backoff import NoBackoff
from redis.retry import Retry

from mes_tasks.errors import MongoUnavailable, RedisUnavailable, TransactionsUnsupported, WriteConflict
from mes_tasks.models import ALL_MODELS
from mes_tasks.settings import Settings, mask_url

Mongo = MongoClient[dict[str, Any]]
# WriteConflict, MaxTimeMSExpired: the document is busy in another transaction
RETRYABLE_CODES = frozenset({112, 50})
REDIS_HEALTH_CHECK_INTERVAL_S = 30


# A connection idle this long asks the Sentinels where the master is before its next command.
# No failover completes sooner after a master's last answer (down-after-milliseconds, 1000 at
# the least), so a connection used more often than this has not slept through one.
MASTER_RECHECK_IDLE_S = 1.0


class MasterConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the Sentinels' current master, also when a dropped or idle one is used again.

    redis-py asks the Sentinels only when it connects, and reconnects a connection that a
    command finds closed to the address it had: one kept out of the pool (the lock checks'
    line) would keep calling a dead or demoted master after a failover. And a connection
    left idle through a failover is still open to the old master: a frozen master that
    resumes answers as a master, from the data it had, until the Sentinels demote it
    about 10 s later (lock checks answered "not ours", writes that are then lost).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.sent_at = 0.0  # monotonic time of the last command sent on this socket

    def connect_to(self, address: Any) -> None:
        self.sent_at = time.monotonic()  # just asked: its handshake need not ask again
        super().connect_to(address)  # type: ignore[no-untyped-call]

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock and time.monotonic() - self.sent_at > MASTER_RECHECK_IDLE_S and self._moved():
            self.disconnect()  # type: ignore[no-untyped-call]
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
        self.sent_at = time.monotonic()
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    def _moved(self) -> bool:
        """Whether the Sentinels name another master than this connection's; False if none answers."""
        try:
            master = self.connection_pool.get_master_address()
        except (redis.ConnectionError, redis.TimeoutError):
            return False  # the command itself will tell whether this master still answers
        return tuple(master) != (self.host, self.port)


def redis_client(settings: Settings, *, retry: bool = True) -> redis.Redis:
    """A client for mes_tasks's Redis database (locks, stats), with bounded timeouts.

    A command whose connection fails or stays silent past ``MES_REDIS_TIMEOUT_S`` is tried
    once more at once, on a new connection (``retry``): a master that keeps its connections
    open and answers nothing on them (frozen, cut off, or a proxy gone quiet) costs one
    timeout, not an error, so a lease's extension outlives it. (redis-py's ``from_url``
    retries nothing unless told.) A write retried after its reply was lost runs twice:
    every write here is conditional on a token, idempotent, or a statistic that may count one
    twice.

    With Sentinels in ``REDIS_URL``, a client of their current master: each new connection
    asks them where it is, and one to a master that failed or was demoted is dropped, so
    every user of this client follows a failover.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL_S,
        "decode_responses": True,
        "retry": Retry(NoBackoff(), 1 if retry else 0),  # type: ignore[no-untyped-call]
    }
    sentinel = settings.sentinel
    if sentinel is None:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinels = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(sentinel.hosts), sentinel_kwargs=settings.sentinel_kwargs
    )
    # One dict[str, Any] of keywords: a narrower value type would be matched against
    # master_for's typed positional parameters, which redis-py's stubs change between releases.
    options |= {"db": sentinel.db, "connection_class": MasterConnection}
    options |= {"username": sentinel.username or None, "password": sentinel.password}
    master: redis.Redis = sentinels.master_for(sentinel.master, **options)  # type: ignore[no-untyped-call]
    return master


def mongo_client(settings: Settings) -> Mongo:
    """A plain pymongo client of its own, with bounded timeouts, beside any mongoengine connection."""
    timeout_ms = int(settings.connect_timeout_s * 1000)
    return MongoClient(settings.mongodb_uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)


def connect(settings: Settings, alias: str = mongoengine.DEFAULT_CONNECTION_NAME) -> Mongo:
    """Register the mongoengine connection for ``settings`` (replacing any old one)."""
    mongoengine.disconnect(alias)
    timeout_ms = int(settings.connect_timeout_s * 1000)
    mongoengine.connect(
        db=settings.mongodb_db,
        host=settings.mongodb_uri,
        alias=alias,
        tz_aware=True,
        uuidRepresentation="standard",
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
    )
    client: Mongo = get_connection(alias)
    return client


def prepare(settings: Settings) -> Mongo:
    """Connect, refuse a server without transactions, create the indexes.

    Raises:
        TransactionsUnsupported: the server is a standalone ``mongod``.
        MongoUnavailable: the server cannot be reached.
    """
    client = connect(settings)
    with mongo_errors():
        check_transactions(client, settings)
        for model in ALL_MODELS:
            model.ensure_indexes()
    return client


def check_transactions(client: Mongo, settings: Settings) -> None:
    """Raise ``TransactionsUnsupported`` unless the server is a replica set or mongos."""
    hello = client.admin.command("hello")
    if hello.get("setName") or hello.get("msg") == "isdbgrid":
        return
    raise TransactionsUnsupported(
        f"MongoDB at {mask_url(settings.mongodb_uri)} is a standalone server and cannot run "
        "transactions, which mes_tasks needs to count every request exactly once. Start "
        "mongod with --replSet rs0 and run rs.initiate() once (a single node is enough), "
        "then point MONGODB_URI at it (e.g. mongodb://host:27017/mes?replicaSet=rs0)."
    )


@contextmanager
def mongo_errors() -> Iterator[None]:
    """Turn pymongo's retryable failures into mes_tasks's transient errors."""
    try:
        yield
    except DuplicateKeyError:
        raise
    except ConnectionFailure as exc:
        raise MongoUnavailable(f"MongoDB unreachable: {exc}") from exc
    except OperationFailure as exc:
        if exc.code in RETRYABLE_CODES or exc.has_error_label("TransientTransactionError"):
            reason = (exc.details or {}).get("errmsg") or str(exc)
            name = (exc.details or {}).get("codeName") or exc.code
            raise WriteConflict(f"{name}: {reason}") from exc
        raise
    except PyMongoError as exc:
        if exc.has_error_label("TransientTransactionError"):
            raise WriteConflict(f"transaction aborted: {exc}") from exc
        if exc.has_error_label("UnknownTransactionCommitResult"):
            raise MongoUnavailable(f"commit result unknown: {exc}") from exc
        raise


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py connection failures into ``RedisUnavailable``."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis unreachable: {exc}") from exc
