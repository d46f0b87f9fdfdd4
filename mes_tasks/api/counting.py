"""The gateway's requests, counted by method, route and status, with their durations, for Prometheus.

An ASGI middleware counts each request in memory (``tally.Tally``, the worker's kind of
counts); a thread adds the counts to two Redis hashes every ``FLUSH_INTERVAL_S``, where the
metrics endpoint reads them (``mes_http_requests_total``, ``mes_http_request_seconds``), so
every gateway process of a deployment adds to one set of series. A route is its template
(``/api/workorder/{work_order_id}``), never the path a caller sent: the series stay few.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from mes_tasks.keys import http_counts_key, http_histogram_key
from mes_tasks.tally import Tally, http_field, http_series

FLUSH_INTERVAL_S = 0.5
UNMATCHED = "unmatched"  # a path no route takes (404)


class RequestCounts:
    """This process's request counts; ``record`` from the event loop, ``flush`` from a thread."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._tally = self._new()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, method: str, route: str, status: int, ms: float) -> None:
        with self._lock:
            self._tally.count(http_field(method, route, status), ms, http_series(method, route))

    def flush(self) -> None:
        """Add what was counted to Redis; kept for the next flush if Redis does not answer."""
        with self._lock:
            pending, self._tally = self._tally, self._new()
        if pending.flush(self.client, self.prefix) or not pending.counts:
            return
        with self._lock:  # kept: back into the counts for the next flush
            self._tally.counts.update(pending.counts)
            self._tally.histogram.update(pending.histogram)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mes-http-counts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * FLUSH_INTERVAL_S)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()

    @staticmethod
    def _new() -> Tally:
        return Tally(http_counts_key, http_histogram_key)


class CountRequests:
    """ASGI middleware: each HTTP request counted once its answer started (or failed)."""

    def __init__(self, app: Any, counts: RequestCounts) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.counts.record(scope["method"], route, status, (time.perf_counter() - started) * 1000)
