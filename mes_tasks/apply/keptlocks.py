"""Work-order locks a worker keeps between updates, each with the fencing epoch it took.

Taking a lock costs a Redis round trip, bumping the epoch a MongoDB write, releasing
another round trip. While updates for one work order keep coming, the worker keeps the
lock (the watchdog extends it) and the epoch it bumped when it took it, and saves all
three. It also keeps the counters as its own commits left them, so that the next commit
can match them instead of reading them (one MongoDB write fewer, see ``ledger``).

The fence, not the lock, protects the counters, so this is safe: a kept lock the
watchdog lost is dropped, and if another holder took the lock or bumped the epoch
meanwhile, the next update's write is refused (``LOCK_LOST`` or ``FENCE_LOST``) and the
ledger takes a fresh lock and epoch in the same call.

A kept lock is let go when it went unused for ``MES_LOCK_LINGER_S`` (checked between
tasks, every ``RELEASE_CHECK_S``), when another holder waits for it (``keys.wanted_key``,
seen by the check before commit), and when the worker stops. A worker that takes the
``workorder`` lease over deletes the locks its predecessor kept (see ``lease``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mes_tasks.apply.locks import RedisLock

log = logging.getLogger(__name__)


@dataclass
class Kept:
    lock: RedisLock
    epoch: int
    known: dict[str, int]  # the counters under ``epoch`` as this worker left them (see ledger)
    used_at: float


class KeptLocks:
    """The locks one worker process keeps, by work order id (used from the task thread only)."""

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._kept: dict[str, Kept] = {}

    def reuse(self, work_order_id: str) -> Kept | None:
        """The kept lock of a work order, still usable, or None (a stale one is let go)."""
        kept = self._kept.pop(work_order_id, None)
        if kept is not None and not self._usable(kept):
            kept.lock.let_go()
            return None
        return kept

    def keep(self, work_order_id: str, lock: RedisLock, epoch: int, known: dict[str, int]) -> None:
        """Keep ``lock`` after an update, unless someone waits for it or keeping is off."""
        if self.linger_s <= 0 or lock.wanted:
            lock.let_go()
            return
        self._kept[work_order_id] = Kept(lock, epoch, known, time.monotonic())

    def drop(self, work_order_id: str) -> None:
        """Let go of a work order's kept lock, for a caller in this process that takes it itself."""
        kept = self._kept.pop(work_order_id, None)
        if kept is not None:
            kept.lock.let_go()

    def release_idle(self) -> int:
        """Let go of every kept lock that lingered too long, was lost or is wanted."""
        stale = [wo for wo, kept in self._kept.items() if not self._usable(kept)]
        for wo in stale:
            self._kept.pop(wo).lock.let_go()
        return len(stale)

    def release_all(self) -> int:
        count = len(self._kept)
        for kept in self._kept.values():
            kept.lock.let_go()
        self._kept.clear()
        return count

    def __len__(self) -> int:
        return len(self._kept)

    def _usable(self, kept: Kept) -> bool:
        fresh = time.monotonic() - kept.used_at < self.linger_s
        return fresh and kept.lock.lost_reason is None and not kept.lock.wanted
