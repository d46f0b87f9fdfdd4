"""The per-work-order Redis lock: token-owned, TTL'd, extension verified by a watchdog.

The lock serialises holders; it does not by itself protect the data (a holder can
be paused past its TTL). The fencing epoch in MongoDB does that (see ``ledger``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType

import redis
from redis.connection import Connection

from mes_tasks.apply.owners import TOKEN_SEP, holder_is_dead, owner_id, owner_of
from mes_tasks.db import redis_errors
from mes_tasks.errors import LockBusy, LockLost, RedisUnavailable

log = logging.getLogger(__name__)

ACQUIRE_POLL_MIN_S = 0.005
ACQUIRE_POLL_MAX_S = 0.1
WANTED_TTL_MS = 1000  # a waiter's request outlives a few of its polls

# Extend / release only while the key still holds our token. Extend answers 2 when
# someone waits for the lock (KEYS[2], optional), so that a holder keeping it lets go.
_EXTEND = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
if KEYS[2] and redis.call('exists', KEYS[2]) == 1 then return 2 end
return 1
"""
NOT_OURS = "key expired or taken by another owner"
# Delete a key only while it holds ARGV[1]: a lock's or a lease's release, an operator's unlock.
RELEASE_IF_HELD = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
)
# Take over a key that still holds ARGV[1], an orphaned token (see ``RedisLock._reclaimed``).
_RECLAIM = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# Tokens of this process's locks that are held as far as this process knows; any other
# token of ours found in Redis is orphaned (its release failed while Redis was down, and
# the key came back with the AOF): the next acquire takes it over at once.
_LIVE: set[str] = set()


class RedisLock:
    """A lock on one Redis key owned by a random token.

    Args:
        client: redis-py client (decoded or not).
        key: the lock's key, see ``mes_tasks.keys.lock_key``.
        ttl_s: expiry of the key; the watchdog keeps pushing it back while held.
        wait_s: how long ``acquire`` waits for a busy lock before ``LockBusy``.
        extend_interval_s: watchdog period, a third of the TTL by default.
        watchdog: the thread that extends the lock while held (the process's own by default).
        wanted_key: where a waiter asks the holder to let go (``keys.wanted_key``); the
            holder sees it as ``wanted`` after its next extension.
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
        wanted_key: str | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> None:
        self.client = client
        self.on_wait = on_wait  # called once when ``acquire`` has to wait (see ``ledger``)
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.wait_s = wait_s
        self.extend_interval_s = extend_interval_s or ttl_s / 3
        self.token = ""
        self.extended_at = 0.0  # monotonic time of the last request that confirmed the key ours
        self.lost_reason: str | None = None
        self.wanted = False
        self.wanted_key = wanted_key
        self.watchdog = watchdog or WATCHDOG

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait_s``.

        Raises:
            LockBusy: still held by someone else when the wait ran out.
            RedisUnavailable: Redis could not be reached.
        """
        deadline = time.monotonic() + self.wait_s
        pause = ACQUIRE_POLL_MIN_S
        _LIVE.discard(self.token)
        self.token = f"{owner_id()}{TOKEN_SEP}{secrets.token_hex(12)}"
        asked = False
        with redis_errors():
            sent = time.monotonic()
            while not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                if self._reclaimed():
                    break
                if time.monotonic() + pause > deadline:
                    raise LockBusy(f"lock {self.key} busy for {self.wait_s:g}s")
                if not asked and self.on_wait is not None:
                    self.on_wait()
                asked = self._ask() or asked
                time.sleep(pause)
                pause = min(pause * 2, ACQUIRE_POLL_MAX_S)
                sent = time.monotonic()
            if asked:
                self.client.delete(self.wanted_key)  # type: ignore[arg-type]
        _LIVE.add(self.token)
        self.extended_at = sent
        self.lost_reason = None
        self.wanted = False

    def _reclaimed(self) -> bool:
        """Take the key over if it holds an orphaned token: one of this process's (see ``_LIVE``),
        or one of a process of this host that no longer runs (killed while it kept the lock).

        The dead holder can write nothing: the fence it held is bumped by whoever applies next.
        """
        found = self.client.get(self.key)
        holder = found.decode() if isinstance(found, bytes) else found
        if not holder or holder in _LIVE:
            return False
        mine = holder.startswith(f"{owner_id()}{TOKEN_SEP}")
        if not mine and not holder_is_dead(holder):
            return False
        taken = bool(self.client.eval(_RECLAIM, 1, self.key, holder, self.token, self.ttl_ms))
        if taken and not mine:
            log.warning("the %s holder %s is not running any more: taking over", self.key, owner_of(holder))
        return taken

    def _ask(self) -> bool:
        """Tell a holder that keeps the lock between updates that we wait for it."""
        if self.wanted_key is None or self.wait_s <= 0:
            return False
        self.client.set(self.wanted_key, self.token, px=WANTED_TTL_MS)
        return True

    @property
    def extend_keys(self) -> tuple[str, ...]:
        """The keys ``_EXTEND`` reads: the lock, and where waiters ask for it if any."""
        return (self.key,) if self.wanted_key is None else (self.key, self.wanted_key)

    def extend(self) -> bool:
        """Push the expiry back to a full TTL if we still own the key (and note ``wanted``)."""
        keys = self.extend_keys
        sent = time.monotonic()
        with redis_errors():
            answer = self.client.eval(_EXTEND, len(keys), *keys, self.token, self.ttl_ms)
        if answer:
            self.extended_at = sent
        return self._answered(answer)

    def fresh(self) -> bool:
        """Whether the key was last confirmed ours less than a TTL ago, by this process's clock.

        False right after this process was stopped (SIGSTOP, a long GC pause) for longer
        than the TTL, before the watchdog has even tried again.
        """
        return time.monotonic() - self.extended_at < self.ttl_ms / 1000

    def _answered(self, answer: object) -> bool:
        """Note what an ``_EXTEND`` answer says about waiters; whether the key is still ours."""
        self.wanted = answer == 2
        return bool(answer)

    def _lost(self, reason: str | None = None) -> LockLost:
        """``LockLost`` for the recorded reason (recording ``reason`` first, if given)."""
        if reason is not None:
            self.lost_reason = reason
        return LockLost(f"lock {self.key} lost: {self.lost_reason}")

    def _unverifiable(self, exc: Exception) -> LockLost:
        return LockLost(f"lock {self.key} unverifiable: {exc}")

    def release(self) -> bool:
        """Delete the key if we still own it; True when it was ours."""
        self.stop_watchdog()
        _LIVE.discard(self.token)  # from now on, a key still holding it is an orphan
        with redis_errors():
            return bool(self.client.eval(RELEASE_IF_HELD, 1, self.key, self.token))

    def let_go(self) -> None:
        """Release if still ours; with Redis down the key expires by itself (the fence covers it)."""
        with suppress(RedisUnavailable):
            self.release()

    def ensure_held(self) -> None:
        """Check ownership now (and the watchdog's record) and renew the TTL.

        Raises:
            LockLost: the watchdog failed an extension, or the key is gone or not ours.
        """
        if self.lost_reason:
            raise self._lost()
        try:
            held = self.extend()
        except RedisUnavailable as exc:
            raise self._unverifiable(exc) from exc
        if not held:
            raise self._lost(NOT_OURS)

    def check_sent(self, line: CheckLine) -> PendingCheck:
        """Send the check of ``ensure_held`` now on ``line`` and read its answer later.

        The Redis round trip then overlaps whatever the caller does meanwhile (the log
        insert); the answer is still known before the commit.
        """
        if self.lost_reason:
            raise self._lost()
        return PendingCheck(self, line)

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
        self.let_go()


class CheckLine:
    """A Redis connection one thread keeps out of the pool for its lock checks.

    A ``PendingCheck`` on it skips the pool's get and release (and the pool's poll for
    stray data) on every update. It reconnects by itself after a failure.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.conn: Connection | None = None

    def get(self) -> Connection:
        if self.conn is None:
            self.conn = self.client.connection_pool.get_connection()
        return self.conn


class PendingCheck:
    """An ownership check (with TTL renewal) in flight on a thread's ``CheckLine``.

    Use as a context manager: ``confirm()`` reads the answer and raises ``LockLost`` like
    ``ensure_held``; leaving without confirming reads and drops the answer, so the
    connection is clean for the next check.
    """

    def __init__(self, lock: RedisLock, line: CheckLine) -> None:
        self.lock = lock
        keys = lock.extend_keys
        self.answered = False
        try:
            with redis_errors():
                self.conn = line.get()
        except RedisUnavailable as exc:
            raise lock._unverifiable(exc) from exc
        command = ("EVAL", _EXTEND, len(keys), *keys, lock.token, lock.ttl_ms)
        try:
            with redis_errors():
                try:
                    self.conn.send_command(*command)  # type: ignore[no-untyped-call]
                except (redis.ConnectionError, redis.TimeoutError):
                    self.conn.disconnect()  # type: ignore[no-untyped-call]
                    self.conn.send_command(*command)  # type: ignore[no-untyped-call]  # reconnects
        except BaseException as exc:
            self._done(broken=True)
            if isinstance(exc, RedisUnavailable):
                raise lock._unverifiable(exc) from exc
            raise

    def confirm(self) -> None:
        try:
            with redis_errors():
                answer = self.conn.read_response()
        except RedisUnavailable:
            # The kept line may be stale (Redis restarted since its last check): ask again,
            # once, on a fresh connection; the check is idempotent.
            self._done(broken=True)
            self.lock.ensure_held()
            return
        except redis.ResponseError as exc:  # an error reply (wrong type, READONLY, OOM): read in full
            self._done(broken=False)
            raise self.lock._unverifiable(exc) from exc
        self._done(broken=False)
        if not self.lock._answered(answer):
            raise self.lock._lost(NOT_OURS)
        if self.lock.lost_reason:  # the watchdog failed meanwhile
            raise self.lock._lost()

    def __enter__(self) -> PendingCheck:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.answered:
            return
        try:
            self.conn.read_response()
        except Exception:
            self._done(broken=True)
        else:
            self._done(broken=False)

    def _done(self, *, broken: bool) -> None:
        if self.answered:
            return
        self.answered = True
        if broken:  # an answer may still be on its way: never read it as the next one
            self.conn.disconnect()  # type: ignore[no-untyped-call]


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
