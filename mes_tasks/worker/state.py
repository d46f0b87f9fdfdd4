"""This worker process's state, in one place: its ledger (made on first use) and its apply-time estimate.

The tasks read it, and so do the consumer steps that run between tasks (``ReleaseKeptLocks``
here, and the lease in ``lease``); nothing that they import imports this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task, bootsteps

from mes_tasks import db
from mes_tasks.apply.keptlocks import KeptLocks
from mes_tasks.apply.ledger import Ledger
from mes_tasks.apply.sessions import SessionLog
from mes_tasks.keys import apply_ms_key
from mes_tasks.settings import get_settings
from mes_tasks.tally import Tally

log = logging.getLogger(__name__)

RELEASE_CHECK_S = 0.5  # how often the worker looks for kept locks to let go, and flushes its counts
APPLY_MS_EWMA_WEIGHT = 0.1  # weight of the newest duration in the moving average
APPLY_MS_TTL_S = 3600
APPLY_MS_PUBLISH_INTERVAL_S = 1.0  # the estimate is written to Redis at most this often


class WorkerState:
    """The ledger this process applies updates with, and how long one takes on average."""

    def __init__(self) -> None:
        self._ledger: Ledger | None = None
        self.apply_ms: float | None = None
        self._published_at = 0.0
        self.tally = Tally()  # outcomes for the metrics endpoint, flushed between tasks
        self.consumer: Any = None  # Celery's consumer, where a group takes the waiting updates from
        self.between_tasks: list[Callable[[], None]] = []  # run by the tick below (never raising)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            s = get_settings()
            client = db.redis_client(s)
            kept = KeptLocks(s.lock_linger_s)
            self._ledger = Ledger(db.connect(s), client, s, kept, SessionLog(client, s.key_prefix))
        return self._ledger

    @property
    def kept_locks(self) -> KeptLocks | None:
        """The locks the ledger keeps, once it exists."""
        return None if self._ledger is None else self._ledger.kept

    def flush_counts(self) -> None:
        """Add the outcomes counted since the last flush to Redis (one round trip); never raises."""
        if self._ledger is not None and len(self.tally):
            self.tally.flush(self._ledger.redis, self._ledger.settings.key_prefix)

    def record_duration(self, started: float, updates: int = 1) -> None:
        """Fold one update's duration (a group's, shared by its ``updates``) into the estimate;
        publish it for the producer now and then."""
        ms = (time.monotonic() - started) * 1000 / max(1, updates)
        prev = self.apply_ms
        self.apply_ms = avg = ms if prev is None else prev + APPLY_MS_EWMA_WEIGHT * (ms - prev)
        if time.monotonic() - self._published_at < APPLY_MS_PUBLISH_INTERVAL_S:
            return
        self._published_at = time.monotonic()
        s = self.ledger.settings
        try:
            self.ledger.redis.set(apply_ms_key(s.key_prefix), f"{avg:.2f}", ex=APPLY_MS_TTL_S)
        except Exception:  # a statistic must never fail an applied update
            log.debug("could not store apply_ms", exc_info=True)


STATE = WorkerState()


class ReleaseKeptLocks(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: between tasks, let go of idle kept locks and flush the outcome counts;
    at shutdown, let go of every kept lock and flush."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry: Any = None

    def start(self, c: Any) -> None:
        STATE.consumer = c
        self.timer_entry = c.timer.call_repeatedly(RELEASE_CHECK_S, self.tick, priority=10)

    def tick(self) -> None:
        """Run in the worker's event loop, between tasks, like the tasks themselves."""
        kept = STATE.kept_locks
        if kept is not None:
            kept.release_idle()
        STATE.flush_counts()
        for hook in STATE.between_tasks:
            hook()

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        kept = STATE.kept_locks
        if kept is not None and len(kept):
            log.info("released %d kept work-order lock(s)", kept.release_all())
        STATE.flush_counts()

    shutdown = stop


class LedgerTask(Task):  # type: ignore[misc]
    """Base of the tasks a worker runs: this worker process's ledger."""

    @property
    def ledger(self) -> Ledger:
        return STATE.ledger
