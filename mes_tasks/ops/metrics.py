"""Prometheus metrics: a collector that reads state per scrape.

The worker counts each update's outcome in Redis (``worker.tally``). A scrape reads those
counts, the broker's queue lists, the
lease, the pause and the first worker's start in one Redis round trip, then the outbox,
the heads of the queues, the open dead letters, the last audit and the first logged update
in at most five MongoDB round trips. Nothing runs between scrapes. docs/metrics.md lists
every series and where its number comes from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import redis
from kombu.transport.redis import PRIORITY_STEPS
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from mes_tasks.broker import task_id_of
from mes_tasks.db import mongo_errors, redis_errors
from mes_tasks.deployment import earliest_start, first_logged_at, recorded_start
from mes_tasks.errors import FenceLost, MesError
from mes_tasks.keys import (
    apply_histogram_key,
    first_start_key,
    http_counts_key,
    http_histogram_key,
    lease_key,
    lease_owner_key,
    pause_key,
    takeovers_key,
    unrecorded_key,
    update_counts_key,
)
from mes_tasks.models import VERIFY_TRIGGER, AuditReport, FailedUpdate, OutboxMessage, VerifyState
from mes_tasks.names import AUDIT_QUEUE, QUEUES, UPDATE_QUANTITY, WORKORDER_QUEUE
from mes_tasks.partitions import every_queue, queue_names
from mes_tasks.queues import UNACKED_KEY, queue_keys
from mes_tasks.send.outbox import SENT, SPOOLED, WAITING
from mes_tasks.tally import (
    APPLIED,
    APPLY_MS_BUCKETS,
    DEAD_LETTERED,
    DUPLICATE,
    GROUP_SERIES,
    HTTP_SEP,
    INF,
    RETRIED,
    SUM,
    bound,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # the lease holder's host and pid are in the series: not public by default
DEFAULT_PORT = 9808
SCRAPE_REDIS_RETRIES = 0  # a failed scrape read is not retried: the next scrape tries again
MAX_ERROR_CHARS = 300  # of a store error's text in the log
T = TypeVar("T")


@dataclass
class RedisState:
    """What one scrape read from Redis."""

    waiting: dict[str, int]
    heads: dict[str, list[str]]  # queue -> task id of the oldest message of each priority list
    unacked: int
    paused: bool
    paused_queues: dict[str, bool]  # per workorder queue: its own pause, or the pause of all
    unrecorded: int
    counts: dict[str, int]
    histogram: dict[str, float]
    http_counts: dict[str, int]  # "method|route|status" -> requests, from the gateway processes
    http_histogram: dict[str, float]  # "method|route|<bucket or sum>" -> requests (ms for sum)
    lease_token: str | None  # with one workorder queue
    lease_tokens: dict[str, str | None]  # per workorder queue (partition)
    lease_owner: str | None
    takeovers: int  # lease take-overs, counted by the workers
    first_start: datetime | None  # when the deployment's first worker started


@dataclass
class MongoState:
    """What one scrape read from MongoDB."""

    outbox: dict[str, tuple[int, datetime | None]]  # state -> (entries, oldest created_at)
    submitted_at: dict[str, datetime]  # job id -> created_at, for the queues' heads
    dead_letters: dict[str, int]  # open dead letters per error code
    last_audit: dict[str, Any] | None
    first_log: datetime | None  # when the first update was logged
    verify: dict[str, Any] | None = None  # the last continuous-verification pass (``VerifyState``)


def read_redis(
    client: redis.Redis,
    prefix: str,
    queues: Sequence[str] = QUEUES,
    leased: Sequence[str] = (WORKORDER_QUEUE,),
) -> RedisState:
    """Everything the scrape needs from Redis, in one pipelined round trip.

    ``queues``: the queues to measure; ``leased``: the workorder queues (partitions) whose
    lease says who consumes them.
    """
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for key in queue_keys(queue):
                pipe.llen(key)
                pipe.lindex(key, -1)  # kombu pushes on the left and pops on the right
        pipe.hlen(UNACKED_KEY)
        pipe.exists(pause_key(prefix))
        pipe.get(unrecorded_key(prefix))
        pipe.hgetall(update_counts_key(prefix))
        pipe.hgetall(apply_histogram_key(prefix))
        pipe.hgetall(http_counts_key(prefix))
        pipe.hgetall(http_histogram_key(prefix))
        pipe.get(lease_owner_key(prefix))
        pipe.get(takeovers_key(prefix))
        pipe.get(first_start_key(prefix))
        for queue in leased:
            pipe.get(lease_key(prefix, queue))
        for queue in leased:
            pipe.exists(pause_key(prefix, queue))
        replies = pipe.execute()
    n = 2 * len(PRIORITY_STEPS)
    per_queue = {q: replies[i * n : (i + 1) * n] for i, q in enumerate(queues)}
    rest = replies[len(queues) * n :]
    unacked, paused, unrecorded, counts, hist, http, http_hist, owner, takeovers, first_start, *leases = rest
    tokens, own_pauses = leases[: len(leased)], leases[len(leased) :]
    token = tokens[0] if len(leased) == 1 else None
    return RedisState(
        waiting={q: sum(r[0::2]) for q, r in per_queue.items()},
        heads={q: [task_id_of(raw) for raw in r[1::2] if raw] for q, r in per_queue.items()},
        unacked=int(unacked),
        paused=bool(paused),
        paused_queues={q: bool(paused or own) for q, own in zip(leased, own_pauses, strict=True)},
        unrecorded=int(unrecorded or 0),
        counts={k: int(v) for k, v in counts.items()},
        histogram={k: float(v) for k, v in hist.items()},
        http_counts={k: int(v) for k, v in http.items()},
        http_histogram={k: float(v) for k, v in http_hist.items()},
        lease_token=token,
        lease_tokens=dict(zip(leased, tokens, strict=True)),
        lease_owner=owner,
        takeovers=int(takeovers or 0),
        first_start=recorded_start(first_start),
    )


def read_mongo(head_job_ids: Iterable[str]) -> MongoState:
    """The outbox, the queues' heads, the open dead letters, the last audit and the first log.

    Five round trips at most (the heads' is skipped while the queues are empty).
    """
    ids = sorted(set(head_job_ids) - {""})
    with mongo_errors():
        rows = OutboxMessage._get_collection().aggregate(
            [
                {"$match": {"state": {"$in": [SENT, *WAITING]}}},  # not the settled ones (index state_sent)
                {"$group": {"_id": "$state", "n": {"$sum": 1}, "oldest": {"$min": "$created_at"}}},
            ]
        )
        outbox = _outbox_by_state(list(rows))
        heads = (
            OutboxMessage._get_collection().find({"job_id": {"$in": ids}}, {"job_id": 1, "created_at": 1})
            if ids
            else []
        )
        submitted = {d["job_id"]: d["created_at"] for d in heads if d.get("created_at")}
        open_rows = FailedUpdate._get_collection().aggregate(
            [{"$match": {"status": "open"}}, {"$group": {"_id": "$error_code", "n": {"$sum": 1}}}]
        )
        dead = {str(r["_id"]): int(r["n"]) for r in open_rows}
        last = AuditReport._get_collection().find_one(
            {"trigger": {"$ne": VERIFY_TRIGGER}},  # the nightly audit's, not a verification pass's
            {"findings": 0, "repairs": 0, "repair_errors": 0},
            sort=[("started_at", -1)],
        )
        first_log = first_logged_at()
        verify = VerifyState._get_collection().find_one({"_id": "last"})
    return MongoState(outbox, submitted, dead, last, first_log, verify)


def _outbox_by_state(rows: list[dict[str, Any]]) -> dict[str, tuple[int, datetime | None]]:
    found: dict[str, tuple[int, datetime | None]] = {SENT: (0, None), SPOOLED: (0, None)}  # no state: spooled
    for row in rows:
        state = SENT if row["_id"] == SENT else SPOOLED
        n, oldest = found[state]
        found[state] = (n + int(row["n"]), _earliest(oldest, row.get("oldest")))
    return found


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


class MesCollector(Collector):
    """Reads mes_tasks's state from Redis and MongoDB at each scrape; a store that is down says so."""

    def __init__(self, client: redis.Redis, prefix: str, partitions: int = 1) -> None:
        self.redis = client
        self.prefix = prefix
        self.current = queue_names(partitions)
        self.leased = every_queue()  # leftovers of another N too: whoever fills them, they are counted
        self.queues = [*self.leased, AUDIT_QUEUE]
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}  # head task id without an outbox entry -> when seen
        self._unconsumed_since: dict[str, float] = {}  # queue with messages and no holder -> first seen

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        now = time.time()
        up = GaugeMetricFamily("mes_store_up", "1 when the scrape could read the store.", labels=["store"])
        rstate = self._try(read_redis, self.redis, self.prefix, self.queues, self.leased)
        if rstate is not None:
            rstate = in_use(rstate, self.current)
        up.add_metric(["redis"], rstate is not None)
        heads = [] if rstate is None else [i for ids in rstate.heads.values() for i in ids]
        mstate = self._try(read_mongo, heads)
        up.add_metric(["mongodb"], mstate is not None)
        with self._lock:
            if rstate is not None:
                yield from self._redis_metrics(rstate, mstate, now)
        if mstate is not None:
            yield from mongo_metrics(mstate, now)
        if rstate is not None and mstate is not None:  # the start needs both stores' word
            yield from deployment_metrics(rstate, mstate)
        yield up
        yield GaugeMetricFamily(
            "mes_scrape_duration_seconds", "How long this scrape took.", time.monotonic() - started
        )

    @staticmethod
    def _try(read: Callable[..., T], *args: Any) -> T | None:
        """The store's state, or None (``mes_store_up`` 0) rather than a failed scrape."""
        try:
            return read(*args)
        except MesError as exc:
            log.warning("metrics: %s", exc.message)
        except Exception as exc:  # any other store error: the other store's series still count
            log.warning("metrics: %s: %s", type(exc).__name__, str(exc)[:MAX_ERROR_CHARS])
        return None

    def _redis_metrics(self, state: RedisState, mongo: MongoState | None, now: float) -> Iterator[Metric]:
        yield from counter_metrics(state)
        yield from queue_metrics(state, self._head_ages(state, mongo, now))
        yield from lease_metrics(state)
        yield unconsumed_metric(self._unconsumed(state, now))

    def _unconsumed(self, state: RedisState, now: float) -> dict[str, float]:
        """Per workorder queue, seconds it has had messages waiting, no lease holder and no pause."""
        idle = {
            q
            for q, token in state.lease_tokens.items()
            if token is None and state.waiting.get(q) and not state.paused_queues.get(q)
        }
        self._unconsumed_since = {q: self._unconsumed_since.get(q, now) for q in idle}
        return {q: now - self._unconsumed_since.get(q, now) if q in idle else 0.0 for q in state.lease_tokens}

    def _head_ages(self, state: RedisState, mongo: MongoState | None, now: float) -> dict[str, float]:
        """Age of each queue's oldest message: from its outbox entry, else since this process saw it."""
        submitted = {} if mongo is None else mongo.submitted_at
        heads = {i for ids in state.heads.values() for i in ids}
        self._first_seen = {i: self._first_seen.get(i, now) for i in heads if i not in submitted}
        return {
            q: max(
                (now - submitted[i].timestamp() if i in submitted else now - self._first_seen.get(i, now))
                for i in ids
            )
            for q, ids in state.heads.items()
            if ids
        }


def counter_metrics(state: RedisState) -> Iterator[Metric]:
    """The worker's outcome counters and apply-time histogram, as mes_* and celery_task_* series."""
    counts = state.counts
    by_code: dict[str, dict[str, int]] = {RETRIED: {}, DEAD_LETTERED: {}}
    for key, n in counts.items():
        outcome, _, code = key.partition(":")
        if outcome in by_code and code:
            by_code[outcome][code] = n
    yield _counter("mes_updates_applied", "Updates that changed a counter.", counts.get(APPLIED, 0))
    yield _counter(
        "mes_updates_duplicate", "Updates whose request id was logged already.", counts.get(DUPLICATE, 0)
    )
    yield _by_code("mes_updates_retried", "Update attempts that failed and were retried.", by_code[RETRIED])
    yield _by_code("mes_updates_dead_lettered", "Updates that failed for good.", by_code[DEAD_LETTERED])
    fence = by_code[RETRIED].get(FenceLost.code, 0) + by_code[DEAD_LETTERED].get(FenceLost.code, 0)
    yield _counter("mes_fence_rejections", "Commits refused because a newer holder took the fence.", fence)
    yield _counter(
        "mes_submissions_unrecorded", "Submissions queued without an outbox record.", state.unrecorded
    )
    yield apply_histogram(state.histogram)
    yield group_histogram(state.histogram)
    yield from http_metrics(state)
    yield from celery_task_metrics(counts.get(APPLIED, 0) + counts.get(DUPLICATE, 0), by_code)


def celery_task_metrics(succeeded: int, by_code: dict[str, dict[str, int]]) -> Iterator[Metric]:
    """celery-exporter's task counters, for update_quantity (``name`` label, as there)."""
    for suffix, what, value in (
        ("succeeded", "Tasks that succeeded.", succeeded),
        ("failed", "Tasks that failed for good.", sum(by_code[DEAD_LETTERED].values())),
        ("retried", "Tasks that were retried.", sum(by_code[RETRIED].values())),
    ):
        family = CounterMetricFamily(f"celery_task_{suffix}", what, labels=["name"])
        family.add_metric([UPDATE_QUANTITY], value)
        yield family


def apply_histogram(hist: dict[str, float]) -> Metric:
    """The worker's per-bucket counts in Redis as a cumulative Prometheus histogram, in seconds."""
    family = HistogramMetricFamily(
        "mes_update_apply_seconds", "Time the worker took per applied or duplicate update."
    )
    family.add_metric([], *_cumulative(hist))
    return family


def group_histogram(hist: dict[str, float]) -> Metric:
    """The sizes of the worker's group commits (``MES_GROUP_MAX``), as a Prometheus histogram."""
    family = HistogramMetricFamily(
        "mes_group_size", "Updates applied together in one group commit (a lone update is not a group)."
    )
    family.add_metric([], *_cumulative(hist, GROUP_SERIES, scale=1))
    return family


def http_metrics(state: RedisState) -> Iterator[Metric]:
    """The gateway's requests by method, route and status, and their durations by route."""
    requests = CounterMetricFamily(
        "mes_http_requests", "Requests the HTTP gateway answered.", labels=["method", "route", "status"]
    )
    for field, n in sorted(state.http_counts.items()):
        requests.add_metric(field.split(HTTP_SEP, 2), n)
    seconds = HistogramMetricFamily(
        "mes_http_request_seconds", "Time the HTTP gateway took per request.", labels=["method", "route"]
    )
    by_series: dict[tuple[str, str], dict[str, float]] = {}
    for field, x in state.http_histogram.items():
        method, route, bucket = field.split(HTTP_SEP, 2)
        by_series.setdefault((method, route), {})[bucket] = x
    for (method, route), hist in sorted(by_series.items()):
        seconds.add_metric([method, route], *_cumulative(hist))
    yield requests
    yield seconds


def _cumulative(
    hist: dict[str, float], series: str = "", scale: float = 1000
) -> tuple[list[tuple[str, float]], float]:
    """Per-bucket counts (ms bounds) as Prometheus's cumulative buckets (s bounds), and the sum (s);
    ``scale`` 1: the bounds and sum as they are (a group's size)."""
    buckets, total = [], 0.0
    for field in [*(bound(b) for b in APPLY_MS_BUCKETS), INF]:
        total += hist.get(series + field, 0.0)
        buckets.append((field if field == INF else repr(float(field) / scale), total))
    return buckets, hist.get(series + SUM, 0.0) / scale


def queue_metrics(state: RedisState, ages: dict[str, float]) -> Iterator[Metric]:
    waiting = GaugeMetricFamily("mes_queue_waiting", "Messages waiting in the queue.", labels=["queue"])
    length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"])
    oldest = GaugeMetricFamily(
        "mes_queue_oldest_age_seconds", "Age of the oldest waiting message (0: none).", labels=["queue"]
    )
    for queue, n in state.waiting.items():
        waiting.add_metric([queue], n)
        length.add_metric([queue], n)
        oldest.add_metric([queue], ages.get(queue, 0.0))
    yield from (waiting, length, oldest)
    yield GaugeMetricFamily(
        "mes_broker_unacked", "Messages delivered and not yet acknowledged (all queues).", state.unacked
    )
    yield GaugeMetricFamily(
        "mes_workorder_paused", "1 while `queue pause` (of every queue) is in force.", state.paused
    )
    paused = GaugeMetricFamily(
        "mes_queue_paused",
        "1 while this workorder queue is paused (its own pause, or of all).",
        labels=["queue"],
    )
    for queue, on in state.paused_queues.items():
        paused.add_metric([queue], on)
    yield paused


def unconsumed_metric(seconds: dict[str, float]) -> Metric:
    family = GaugeMetricFamily(
        "mes_queue_unconsumed_seconds",
        "How long this workorder queue has had messages waiting, no lease holder and no pause (0: consumed).",
        labels=["queue"],
    )
    for queue, s in seconds.items():
        family.add_metric([queue], s)
    return family


def in_use(state: RedisState, current: Sequence[str]) -> RedisState:
    """The state of the current workorder queues, ``audit``, and any other that holds or is held."""
    keep = {q for q in state.waiting if q == AUDIT_QUEUE or q in current or state.waiting[q]}
    keep |= {q for q, token in state.lease_tokens.items() if token is not None}
    kept = [q for q in state.lease_tokens if q in keep]
    return replace(
        state,
        waiting={q: n for q, n in state.waiting.items() if q in keep},
        heads={q: ids for q, ids in state.heads.items() if q in keep},
        lease_token=state.lease_tokens.get(WORKORDER_QUEUE) if kept == [WORKORDER_QUEUE] else None,
        lease_tokens={q: state.lease_tokens[q] for q in kept},
        paused_queues={q: state.paused_queues[q] for q in kept},
    )


def lease_metrics(state: RedisState) -> Iterator[Metric]:
    tokens = state.lease_tokens
    yield GaugeMetricFamily(
        "mes_workorder_active_consumer",
        "1 while a worker holds the workorder lease (with partitions: every partition's).",
        bool(tokens) and all(t is not None for t in tokens.values()),
    )
    per = GaugeMetricFamily(
        "mes_partition_active_consumer",
        "1 while a worker holds this workorder queue's lease.",
        labels=["queue"],
    )
    for queue, token in tokens.items():
        per.add_metric([queue], token is not None)
    yield per
    info = GaugeMetricFamily(
        "mes_workorder_active_consumer_info", "The lease holders' processes (host:pid:tag).", labels=["owner"]
    )
    for owner in sorted({t.split("/", 1)[0] for t in tokens.values() if t is not None}):
        info.add_metric([owner], 1)
    yield info
    yield _counter("mes_lease_takeovers", "Times a worker took the workorder lease.", state.takeovers)


def mongo_metrics(state: MongoState, now: float) -> Iterator[Metric]:
    entries = GaugeMetricFamily("mes_outbox_entries", "Outbox entries without an outcome.", labels=["state"])
    oldest = GaugeMetricFamily(
        "mes_outbox_oldest_age_seconds", "Age of the oldest outbox entry (0: none).", labels=["state"]
    )
    for state_name, (n, first) in sorted(state.outbox.items()):
        entries.add_metric([state_name], n)
        oldest.add_metric([state_name], 0.0 if first is None else max(0.0, now - first.timestamp()))
    yield from (entries, oldest)
    yield GaugeMetricFamily("mes_dead_letters_open", "Open dead letters.", sum(state.dead_letters.values()))
    by_code = GaugeMetricFamily(
        "mes_dead_letters_open_by_code", "Open dead letters per code.", labels=["code"]
    )
    for code, n in sorted(state.dead_letters.items()):
        by_code.add_metric([code], n)
    yield by_code
    yield from audit_metrics(state.last_audit)
    yield from verify_metrics(state.verify, now)


def deployment_metrics(rstate: RedisState, mstate: MongoState) -> Iterator[Metric]:
    """The deployment's start (as doctor has it); no series while no worker has started."""
    started = earliest_start(rstate.first_start, mstate.first_log)
    if started is not None:
        yield GaugeMetricFamily(
            "mes_deployment_started_timestamp_seconds",
            "When the first worker started, or the first update was logged if earlier (Unix time).",
            started.timestamp(),
        )


def audit_metrics(report: dict[str, Any] | None) -> Iterator[Metric]:
    """The last audit; a timestamp of 0 when there was none (MesAuditStale then counts from the start)."""
    report = report or {}
    started, finished = report.get("started_at"), report.get("finished_at")
    yield GaugeMetricFamily(
        "mes_audit_last_run_timestamp_seconds",
        "When the last audit ended (Unix time; 0: never).",
        0.0 if started is None else (finished or started).timestamp(),
    )
    yield GaugeMetricFamily(
        "mes_audit_last_duration_seconds",
        "How long the last audit took.",
        0.0 if started is None or finished is None else (finished - started).total_seconds(),
    )
    for name, what, key in (
        ("mes_audit_last_findings", "Findings of the last audit.", "finding_count"),
        ("mes_audit_last_work_orders_scanned", "Work orders the last audit scanned.", "work_orders_scanned"),
        ("mes_audit_last_repaired", "1 when the last audit repaired.", "repaired"),
    ):
        yield GaugeMetricFamily(name, what, float(report.get(key) or 0))


def verify_metrics(state: dict[str, Any] | None, now: float) -> Iterator[Metric]:
    """The last continuous-verification pass; timestamps and lag 0 while none has run."""
    state = state or {}
    finished, up_to = state.get("finished_at"), state.get("verified_up_to")
    yield GaugeMetricFamily(
        "mes_verify_last_pass_timestamp_seconds",
        "When the last verification pass ended (Unix time; 0: never).",
        0.0 if finished is None else finished.timestamp(),
    )
    yield GaugeMetricFamily(
        "mes_verify_lag_seconds",
        "Age of the oldest counter change not yet verified (0: no pass yet).",
        0.0 if up_to is None else max(0.0, now - up_to.timestamp()),
    )
    yield GaugeMetricFamily(
        "mes_verify_drift_work_orders",
        "Work orders whose counters do not equal their logs, as the last pass found.",
        len(state.get("drift") or ()),
    )
    yield GaugeMetricFamily(
        "mes_verify_unexplained_updates",
        "Accepted updates with no outcome that are waiting nowhere, as the last pass found.",
        len(state.get("unexplained") or ()),
    )
    yield _counter(
        "mes_verify_logs_without_outbox",
        "Logs the passes read whose request id has no outbox entry (sent with MES_JOURNAL=0, or by hand).",
        float(state.get("logs_without_entry_total") or 0),
    )


def _counter(name: str, what: str, value: float) -> Metric:
    return CounterMetricFamily(name, what, value)


def _by_code(name: str, what: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, what, labels=["code"])
    for code, n in sorted(counts.items()):
        family.add_metric([code], n)
    return family


def registry_for(client: redis.Redis, prefix: str, partitions: int = 1) -> CollectorRegistry:
    """A registry with only mes_tasks's collector (no process or platform series).

    The client does not retry: a scrape with Redis down must answer (``mes_store_up`` 0)
    inside Prometheus's scrape timeout, and the next scrape tries again anyway.
    """
    client.set_retry(Retry(NoBackoff(), SCRAPE_REDIS_RETRIES))
    registry = CollectorRegistry()
    registry.register(MesCollector(client, prefix, partitions))
    return registry
