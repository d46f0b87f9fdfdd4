"""The work-order lock against a real redis-server: owned, TTL'd, extension verified."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from devtools.devserver import Service
from devtools.faultproxy import FaultProxy
from mes_tasks import db
from mes_tasks.apply.locks import CheckLine, RedisLock, Watchdog
from mes_tasks.errors import LockBusy, LockLost, RedisUnavailable
from mes_tasks.settings import LEASE_TTL_S, Settings
from mes_tasks.worker.lease import Lease


def lock(client: redis.Redis, ttl_s: float = 1.0, wait_s: float = 0.0, **kw: float) -> RedisLock:
    return RedisLock(client, "mes:lock:WO-1", ttl_s, wait_s=wait_s, **kw)


def test_a_held_lock_is_busy_for_another_holder_until_released(redis_client: redis.Redis) -> None:
    first = lock(redis_client)
    first.acquire()
    with pytest.raises(LockBusy):
        lock(redis_client, wait_s=0.05).acquire()
    assert first.release()
    lock(redis_client).acquire()


def test_the_key_holds_the_owner_token_with_a_ttl(redis_client: redis.Redis) -> None:
    held = lock(redis_client, ttl_s=5)
    held.acquire()
    assert redis_client.get(held.key) == held.token
    assert 4000 < redis_client.pttl(held.key) <= 5000


def test_release_and_extend_leave_a_key_owned_by_someone_else_alone(redis_client: redis.Redis) -> None:
    held = lock(redis_client)
    held.acquire()
    redis_client.set(held.key, "someone-else")
    assert not held.extend()
    assert not held.release()
    assert redis_client.get(held.key) == "someone-else"


def test_a_waiting_holder_gets_the_lock_once_it_is_released(redis_client: redis.Redis) -> None:
    first = lock(redis_client, ttl_s=5)
    first.acquire()
    threading.Timer(0.1, first.release).start()
    second = lock(redis_client, wait_s=2)
    second.acquire()
    assert redis_client.get(second.key) == second.token


def test_the_watchdog_keeps_a_lock_alive_past_its_ttl(redis_client: redis.Redis) -> None:
    with lock(redis_client, ttl_s=0.3) as held:
        threading.Event().wait(0.9)  # three TTLs: the key must still be ours
        assert redis_client.get(held.key) == held.token
        held.ensure_held()
    assert redis_client.get(held.key) is None


@pytest.mark.parametrize("tamper", ["delete", "overwrite"])
def test_ensure_held_notices_a_deleted_or_overwritten_key_at_once(
    redis_client: redis.Redis, tamper: str
) -> None:
    with lock(redis_client, ttl_s=30) as held:
        if tamper == "delete":
            redis_client.delete(held.key)
        else:
            redis_client.set(held.key, "intruder")
        with pytest.raises(LockLost):
            held.ensure_held()


def test_the_watchdog_records_a_failed_extension(redis_client: redis.Redis) -> None:
    with lock(redis_client, ttl_s=0.3) as held:
        redis_client.set(held.key, "intruder")
        deadline = time.monotonic() + 2
        while held.lost_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held.lost_reason and "refused" in held.lost_reason
        assert not held.watchdog.watching(held)
        redis_client.set(held.key, held.token)  # even if the key came back, the loss is remembered
        with pytest.raises(LockLost):
            held.ensure_held()


@pytest.mark.slow  # waits out a connect timeout
def test_an_unreachable_redis_is_a_transient_error() -> None:
    client = redis.Redis(port=1, socket_connect_timeout=0.2)
    with pytest.raises(RedisUnavailable):
        lock(client).acquire()


def test_one_watchdog_thread_keeps_several_locks_with_different_ttls_alive(redis_client: redis.Redis) -> None:
    short = RedisLock(redis_client, "mes:lock:A", 0.3)
    long = RedisLock(redis_client, "mes:lock:B", 0.6)
    with short, long:
        threading.Event().wait(1.2)
        assert redis_client.get(short.key) == short.token
        assert redis_client.get(long.key) == long.token
    assert not short.watchdog.watching(short) and not long.watchdog.watching(long)


def test_a_client_failing_outside_redis_errors_marks_the_lock_lost_and_the_watchdog_survives(
    redis_client: redis.Redis,
) -> None:
    broken = RedisLock(redis_client, "mes:lock:X", 0.3)
    broken.acquire()

    def fail(*_: object) -> bool:
        raise OSError(9, "Bad file descriptor")

    broken.extend = fail  # type: ignore[method-assign]
    broken.start_watchdog()
    deadline = time.monotonic() + 2
    while broken.lost_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broken.lost_reason and "OSError" in broken.lost_reason
    with lock(redis_client, ttl_s=0.3) as healthy:  # the same thread still extends other locks
        threading.Event().wait(0.9)
        assert redis_client.get(healthy.key) == healthy.token


def test_an_error_reply_to_the_check_is_a_lost_lock_and_leaves_the_line_clean(
    redis_client: redis.Redis,
) -> None:
    line = CheckLine(redis_client)
    lock = RedisLock(redis_client, "mes:lock:T-1", 5.0)
    other = RedisLock(redis_client, "mes:lock:T-2", 5.0)
    lock.acquire()
    other.acquire()
    redis_client.delete(lock.key)
    redis_client.rpush(lock.key, "not a token")  # GET in the check script now fails: WRONGTYPE
    with pytest.raises(LockLost, match="unverifiable"), lock.check_sent(line) as check:
        check.confirm()
    with other.check_sent(line) as check:  # the same connection answers the next check, not the last
        check.confirm()
    assert line.conn is not None and redis_client.pttl(other.key) > 4000


def test_a_lease_outlives_every_open_connection_going_silent(
    servers: dict[str, Service], redis_client: redis.Redis
) -> None:
    """Every open connection stops answering and stays open (a frozen or cut-off master), new
    ones work. The watchdog's next extension gives its connection up after
    ``MES_REDIS_TIMEOUT_S`` and is retried on a new one, inside the lease's TTL: the holder
    keeps consuming. (With the connect timeout as read timeout and no retry, every lease of
    the worker was lost, and its queues went unconsumed for 18-23 s in the chaos run.)"""
    proxy = FaultProxy(servers["redis"].port).start()
    try:
        client = db.redis_client(Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/3"))  # default timeouts
        lease = Lease(client, "mes:lease:workorder", LEASE_TTL_S, watchdog=Watchdog())
        assert lease.try_acquire()
        assert proxy.silence_open() > 0
        time.sleep(LEASE_TTL_S * 1.5)
        assert lease.held, lease.lost_reason
        assert redis_client.get(lease.key) == lease.token
        lease.release()
    finally:
        proxy.close()
