"""Counts kept in memory and added to Redis now and then, for the collector (``ops.metrics``) to read.

The worker counts each update's outcome (and the duration of an applied or duplicate one)
and adds its counts to two Redis hashes between tasks, twice a second, in one round trip;
the HTTP gateway counts its requests by route, method and status the same way. Counting
never costs a round trip on the counted path. Nothing of the scrape's side is imported here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import redis

from mes_tasks.keys import apply_histogram_key, update_counts_key

log = logging.getLogger(__name__)

APPLY_MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # upper bounds, ms
INF = "+Inf"
SUM = "sum"  # the histogram field of the durations' sum (ms)
HTTP_SEP = "|"  # between method, route and status in the gateway's fields


def http_field(method: str, route: str, status: int) -> str:
    """The counts field of one gateway request."""
    return HTTP_SEP.join((method, route, str(status)))


def http_series(method: str, route: str) -> str:
    """The histogram fields' prefix of one gateway route."""
    return f"{method}{HTTP_SEP}{route}{HTTP_SEP}"


APPLIED, DUPLICATE, RETRIED, DEAD_LETTERED = "applied", "duplicate", "retried", "dead_lettered"
GROUP_SERIES = f"group{HTTP_SEP}"  # group commits' sizes: the same bucket bounds, read as updates
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

    def __init__(
        self, counts_key: Callable[[str], str] = update_counts_key,
        histogram_key: Callable[[str], str] = apply_histogram_key,
    ) -> None:  # fmt: skip
        self.counts: Counter[str] = Counter()
        # "<series><bucket>" -> events, and "<series>sum" -> ms (a float); the worker's series is ""
        self.histogram: Counter[str] = Counter()
        self.counts_key, self.histogram_key = counts_key, histogram_key
        self._retry_at = 0.0

    def add(self, outcome: str, code: str | None = None, apply_ms: float | None = None) -> None:
        """Count one update's outcome (and its duration)."""
        self.count(outcome if code is None else f"{outcome}:{code}", apply_ms)

    def count(self, field: str, ms: float | None = None, series: str = "") -> None:
        """Count one event under ``field``, and its duration in ``series``' histogram."""
        self.counts[field] += 1
        if ms is not None:
            self.histogram.update({f"{series}{bucket_of(ms)}": 1, f"{series}{SUM}": ms})

    def observe(self, value: float, series: str) -> None:
        """One observation in ``series``' histogram only (no outcome counted: a group's size)."""
        self.histogram.update({f"{series}{bucket_of(value)}": 1, f"{series}{SUM}": value})

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
                pipe.hincrby(self.counts_key(prefix), field, n)
            for field, x in histogram.items():
                if field.endswith(SUM):
                    pipe.hincrbyfloat(self.histogram_key(prefix), field, x)
                else:
                    pipe.hincrby(self.histogram_key(prefix), field, int(x))
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
