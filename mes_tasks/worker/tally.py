"""The worker's outcome counts: kept in memory, added to Redis between tasks (``ops.metrics`` reads them).

The worker counts each update's outcome (and the duration of an applied or duplicate one)
in memory and adds its counts to two Redis hashes between tasks, twice a second, in one
pipelined round trip. Nothing here is imported by the scrape's side but the names below.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import redis

from mes_tasks.keys import apply_histogram_key, update_counts_key

log = logging.getLogger(__name__)

APPLY_MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # upper bounds, ms
INF = "+Inf"
APPLIED, DUPLICATE, RETRIED, DEAD_LETTERED = "applied", "duplicate", "retried", "dead_lettered"
FLUSH_BACKOFF_S = 5.0  # after a failed flush of the worker's counts, the next is tried this much later


def bound(ms: float) -> str:
    """A histogram bucket's field name (its upper bound in ms)."""
    return f"{ms:g}"


def bucket_of(ms: float) -> str:
    """The histogram field an update of ``ms`` milliseconds is counted in."""
    return next((bound(b) for b in APPLY_MS_BUCKETS if ms <= b), INF)


class Tally:
    """The outcomes this worker counted since its last flush, kept in memory between flushes.

    Counting costs no round trip on the update's path: the worker flushes the tally between
    tasks every ``RELEASE_CHECK_S`` and when it stops, in one pipelined round trip. A flush
    that fails keeps its counts for the next one, tried no sooner than ``FLUSH_BACKOFF_S``
    later, and never raises: a statistic must never fail, or delay, an update. What a
    SIGKILLed worker had not flushed (under a second of outcomes) is not counted.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.histogram: Counter[str] = Counter()  # bucket -> updates, and "sum" -> ms (a float)
        self._retry_at = 0.0

    def add(self, outcome: str, code: str | None = None, apply_ms: float | None = None) -> None:
        """Count one update's outcome (and its duration)."""
        self.counts[outcome if code is None else f"{outcome}:{code}"] += 1
        if apply_ms is not None:
            self.histogram.update({bucket_of(apply_ms): 1, "sum": apply_ms})

    def __len__(self) -> int:
        return len(self.counts)

    def flush(self, client: redis.Redis, prefix: str) -> bool:
        """Add the tally to the Redis hashes a scrape reads; False if it is kept for later."""
        if not self.counts or time.monotonic() < self._retry_at:
            return not self.counts
        counts, histogram = self.counts, self.histogram
        self.counts, self.histogram = Counter(), Counter()
        try:
            # MULTI/EXEC: a connection lost part-way applies nothing, so keeping the whole
            # tally for the next flush never counts a field twice.
            pipe = client.pipeline(transaction=True)
            for field, n in counts.items():
                pipe.hincrby(update_counts_key(prefix), field, n)
            for field, x in histogram.items():
                if field == "sum":
                    pipe.hincrbyfloat(apply_histogram_key(prefix), field, x)
                else:
                    pipe.hincrby(apply_histogram_key(prefix), field, int(x))
            pipe.execute()
            return True
        except redis.ResponseError:
            # Redis ran the transaction and refused a command (a field that is not a number):
            # the others counted; kept, they would count twice.
            log.warning("outcome counts refused in part by Redis; %d dropped", counts.total(), exc_info=True)
            return False
        except Exception:
            # Usually Redis down, nothing applied: kept for the next flush. (A flush applied
            # with its answer lost counts twice, which a statistic can bear better than loss.)
            log.debug("could not flush %d outcome counts", counts.total(), exc_info=True)
            self.counts.update(counts)
            self.histogram.update(histogram)
            self._retry_at = time.monotonic() + FLUSH_BACKOFF_S
            return False
