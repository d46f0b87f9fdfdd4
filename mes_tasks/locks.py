"""The per-work-order Redis lock: token-owned, TTL'd, extension verified by a watchdog.

The lock serialises holders; it does not by itself protect the data (a holder can
be paused past its TTL). The fencing epoch in MongoDB does that (see ``ledger``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import TracebackType

import redis

from mes_tasks.errors import LockBusy, LockLost, RedisUnavailable

ACQUIRE_POLL_MIN_S = 0.005
ACQUIRE_POLL_MAX_S = 0.1

# Extend / release only while the key still holds our token.
_IF_OWNER = "if redis.call('get', KEYS[1]) == ARGV[1] then return {} else return 0 end"
_EXTEND = _IF_OWNER.format("redis.call('pexpire', KEYS[1], ARGV[2])")
_RELEASE = _IF_OWNER.format("redis.call('del', KEYS[1])")


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py connection failures into ``RedisUnavailable``."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis unreachable: {exc}") from exc


class RedisLock:
    """A lock on one Redis key owned by a random token.

    Args:
        client: redis-py client (decoded or not).
        key: the lock's key, see ``mes_tasks.keys.lock_key``.
        ttl_s: expiry of the key; the watchdog keeps pushing it back while held.
        wait_s: how long ``acquire`` waits for a busy lock before ``LockBusy``.
        extend_interval_s: watchdog period, a third of the TTL by default.
        watchdog: the thread that extends the lock while held (the process's own by default).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        ttl_s: float,
        *,
        wait_s: float = 0.0,
        extend_interval_s: float | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.wait_s = wait_s
        self.extend_interval_s = extend_interval_s or ttl_s / 3
        self.token = secrets.token_hex(16)
        self.lost_reason: str | None = None
        self.watchdog = watchdog or WATCHDOG

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait_s``.

        Raises:
            LockBusy: still held by someone else when the wait ran out.
            RedisUnavailable: Redis could not be reached.
        """
        deadline = time.monotonic() + self.wait_s
        pause = ACQUIRE_POLL_MIN_S
        self.token = secrets.token_hex(16)
        with redis_errors():
            while not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                if time.monotonic() + pause > deadline:
                    raise LockBusy(f"lock {self.key} busy for {self.wait_s:g}s")
                time.sleep(pause)
                pause = min(pause * 2, ACQUIRE_POLL_MAX_S)
        self.lost_reason = None

    def extend(self) -> bool:
        """Push the expiry back to a full TTL if we still own the key."""
        with redis_errors():
            return bool(self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> bool:
        """Delete the key if we still own it; True when it was ours."""
        self.stop_watchdog()
        with redis_errors():
            return bool(self.client.eval(_RELEASE, 1, self.key, self.token))

    def ensure_held(self) -> None:
        """Check ownership now (and the watchdog's record) and renew the TTL.

        Raises:
            LockLost: the watchdog failed an extension, or the key is gone or not ours.
        """
        if self.lost_reason:
            raise LockLost(f"lock {self.key} lost: {self.lost_reason}")
        try:
            held = self.extend()
        except RedisUnavailable as exc:
            raise LockLost(f"lock {self.key} unverifiable: {exc}") from exc
        if not held:
            self.lost_reason = "key expired or taken by another owner"
            raise LockLost(f"lock {self.key} lost: {self.lost_reason}")

    def start_watchdog(self) -> None:
        self.watchdog.watch(self)

    def stop_watchdog(self) -> None:
        self.watchdog.unwatch(self)

    def __enter__(self) -> RedisLock:
        self.acquire()
        self.start_watchdog()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with suppress(RedisUnavailable):  # the key expires by itself; the fence covers the gap
            self.release()


class Watchdog:
    """One daemon thread per process that extends every watched lock at its interval.

    A thread per lock would cost a start and a join on every update; this one sleeps
    until the next extension is due. A failed or refused extension is recorded on the
    lock (``lost_reason``) and the lock is no longer watched.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, RedisLock]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, lock: RedisLock) -> None:
        with self._cond:
            self._due[id(lock)] = (time.monotonic() + lock.extend_interval_s, lock)
            if self._thread is None or not self._thread.is_alive():  # first use, or after a fork
                self._thread = threading.Thread(target=self._run, name="lock-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def unwatch(self, lock: RedisLock) -> None:
        with self._cond:
            self._due.pop(id(lock), None)

    def watching(self, lock: RedisLock) -> bool:
        with self._cond:
            return id(lock) in self._due

    def _run(self) -> None:
        while True:
            for lock in self._next_due():
                self._extend(lock)

    def _next_due(self) -> list[RedisLock]:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [lock for at, lock in self._due.values() if at <= now]
                if due:
                    for lock in due:
                        self._due[id(lock)] = (now + lock.extend_interval_s, lock)
                    return due
                soonest = min((at for at, _ in self._due.values()), default=None)
                self._cond.wait(None if soonest is None else soonest - now)

    def _extend(self, lock: RedisLock) -> None:
        try:
            ok = lock.extend()
        except Exception as exc:  # any failure (even a raw OSError) is a lost lock, never a dead thread
            lock.lost_reason = f"extension failed: {type(exc).__name__}: {exc}"
            ok = None
        if not ok:
            lock.lost_reason = lock.lost_reason or "extension refused: key expired or taken"
            self.unwatch(lock)


WATCHDOG = Watchdog()
