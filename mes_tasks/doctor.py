"""Pre-flight checks of a deployment: one line per check, OK / WARN / FAIL, and how to fix it."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery
from celery.schedules import BaseSchedule, crontab, maybe_schedule

from mes_tasks import db
from mes_tasks.errors import MesError
from mes_tasks.keys import first_start_key
from mes_tasks.models import AuditReport, FailedUpdate, QuantityLog, utcnow
from mes_tasks.names import AUDIT_WORK_ORDERS, WORKORDER_QUEUE
from mes_tasks.settings import Settings, mask_secrets, mask_url
from mes_tasks.status import consumers, pause_state

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"  # INFO: nothing wrong, but worth knowing
AUDIT_MAX_AGE = timedelta(hours=26)  # a nightly audit plus slack
FLOWER_PROBE_PATH = "/api/workers"  # guarded by --basic-auth; /healthcheck and /metrics are not
SOLO_POOL = "celery.concurrency.solo:TaskPool"


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Context:
    """What the checks share: settings, the app, and connections made once."""

    settings: Settings
    app: Celery
    redis: redis.Redis | None = None
    mongo: db.Mongo | None = None


def run_checks(ctx: Context) -> list[Check]:
    """Every check, in order; a check that crashes is a FAIL, never an exception."""
    results = []
    for check in CHECKS:
        try:
            results.extend(check(ctx))
        except Exception as exc:
            results.append(Check(FAIL, check.__name__.removeprefix("check_"), mask_secrets(str(exc))))
    return results


def check_redis(ctx: Context) -> list[Check]:
    client = db.redis_client(ctx.settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        return [
            Check(FAIL, "redis", f"unreachable: {mask_secrets(str(exc))}", "start Redis or fix REDIS_URL")
        ]
    ctx.redis = client
    info = client.info("server")
    out = [Check(OK, "redis", f"reachable, version {info.get('redis_version')}")]
    try:
        conf = {**client.config_get("appendonly"), **client.config_get("maxmemory-policy")}
    except redis.ResponseError:
        return [*out, Check(WARN, "redis config", "CONFIG GET refused; cannot verify AOF and eviction")]
    aof = conf.get("appendonly") == "yes"
    out.append(
        Check(
            OK if aof else FAIL,
            "redis aof",
            f"appendonly {conf.get('appendonly')}",
            "" if aof else "set appendonly yes: queued updates must survive a Redis restart",
        )
    )
    policy = conf.get("maxmemory-policy")
    out.append(
        Check(
            OK if policy == "noeviction" else FAIL,
            "redis eviction",
            f"maxmemory-policy {policy}",
            ""
            if policy == "noeviction"
            else "set maxmemory-policy noeviction: evicted queue keys are lost updates",
        )
    )
    return out


def check_redis_isolation(ctx: Context) -> list[Check]:
    db_number = ctx.settings.redis_db
    if db_number != 0:
        return [Check(OK, "redis database", f"mes_tasks uses its own database {db_number}")]
    return [
        Check(
            WARN,
            "redis database",
            "database 0, usually shared with other apps",
            "give mes_tasks its own database (e.g. REDIS_URL=.../3): kombu's unacked index is per database",
        )
    ]


def check_mongo(ctx: Context) -> list[Check]:
    try:
        ctx.mongo = db.prepare(ctx.settings)
    except MesError as exc:
        return [Check(FAIL, "mongodb", f"[{exc.code}] {mask_secrets(exc.message)}", "see the message")]
    return [Check(OK, "mongodb", "reachable; replica set, transactions available")]


def check_indexes(ctx: Context) -> list[Check]:
    if ctx.mongo is None:
        return [Check(FAIL, "indexes", "not checked: MongoDB unreachable")]
    info = QuantityLog._get_collection().index_information()
    unique = any(spec.get("unique") and spec["key"][0][0] == "request_id" for spec in info.values())
    if not unique:
        return [
            Check(FAIL, "indexes", "no unique index on quantity_logs.request_id", "start the worker once")
        ]
    return [Check(OK, "indexes", f"{len(info)} on quantity_logs, request_id unique")]


def check_timing(ctx: Context) -> list[Check]:
    s = ctx.settings
    return [
        Check(
            OK,
            "timing",
            f"visibility timeout {s.visibility_timeout_s:g}s >= 2 x (lock wait "
            f"{s.lock_wait_s:g}s + lock TTL {s.lock_ttl_s:g}s + max countdown {s.retry_backoff_max_s:g}s); "
            f"watchdog every {s.lock_extend_interval_s:g}s",
        )
    ]


def check_consumers(ctx: Context) -> list[Check]:
    if ctx.redis is None:
        return [Check(FAIL, "workorder consumer", "not checked: Redis unreachable")]
    workers = consumers(ctx.app).get(WORKORDER_QUEUE, [])
    paused = pause_state(ctx.redis, ctx.settings)
    if paused is not None:
        return [
            Check(
                WARN,
                "workorder consumer",
                f"paused since {paused.get('at')}",
                "celery -A mes_tasks queue resume",
            )
        ] + (
            [] if not workers else [Check(FAIL, "workorder consumer", f"consumed while paused by {workers}")]
        )
    if not workers:
        return [
            Check(WARN, "workorder consumer", "no worker answered", "start one solo worker on -Q workorder")
        ]
    if len(workers) > 1:
        return [
            Check(
                FAIL,
                "workorder consumer",
                f"{len(workers)} workers: {', '.join(workers)}",
                "run exactly one worker on workorder",
            )
        ]
    stats = ctx.app.control.inspect(destination=workers, timeout=1.0).stats() or {}
    pool = (stats.get(workers[0]) or {}).get("pool", {}).get("implementation", "?")
    if pool != SOLO_POOL:
        return [Check(FAIL, "workorder consumer", f"{workers[0]} runs pool {pool}", "start it with -P solo")]
    return [Check(OK, "workorder consumer", f"exactly one, {workers[0]}, solo pool")]


def check_audit(ctx: Context) -> list[Check]:
    entry = next((e for e in ctx.app.conf.beat_schedule.values() if e.get("task") == AUDIT_WORK_ORDERS), None)
    schedule = None if entry is None else maybe_schedule(entry["schedule"], app=ctx.app)
    out = [
        Check(OK, "audit schedule", _describe(schedule, ctx.app))
        if isinstance(schedule, BaseSchedule)
        else Check(FAIL, "audit schedule", "not in beat_schedule", "remove the override of beat_schedule")
    ]
    if ctx.mongo is None:
        return out
    out.append(_last_audit(ctx, schedule))
    open_failed = FailedUpdate.objects(status="open").count()
    out.append(
        Check(
            OK if not open_failed else WARN,
            "failed updates",
            f"{open_failed} open",
            "" if not open_failed else "celery -A mes_tasks failed list",
        )
    )
    return out


def _last_audit(ctx: Context, schedule: BaseSchedule | None) -> Check:
    """The last audit's age and findings; a deployment younger than the audit period has none yet."""
    last = AuditReport.objects.order_by("-started_at").first()
    now = utcnow()
    if last is not None and now - last.started_at <= AUDIT_MAX_AGE:
        return Check(
            OK if not last.finding_count else WARN,
            "last audit",
            f"{last.started_at:%Y-%m-%d %H:%M} UTC, {last.finding_count} findings",
            "" if not last.finding_count else f"celery -A mes_tasks audit show {last.id}",
        )
    started = deployment_started(ctx)
    if last is None and started is not None and now - started <= AUDIT_MAX_AGE:
        minutes = (now - started).total_seconds() / 60
        age = f"{minutes:.0f} min" if minutes < 60 else f"{minutes / 60:.1f} h"
        first = f"; {_next_run(schedule, ctx.app)}" if schedule is not None else ""
        return Check(INFO, "last audit", f"none yet: the deployment is {age} old{first}")
    if last is None and started is None:
        return Check(INFO, "last audit", "none yet: no worker has started here yet")
    when = "none ever" if last is None else f"the last one was at {last.started_at:%Y-%m-%d %H:%M} UTC"
    return Check(WARN, "last audit", f"none in the last 26 hours ({when})", "is celery beat running?")


def deployment_started(ctx: Context) -> datetime | None:
    """When the first worker started (``first_start_key``), or the first update was logged."""
    times = []
    if ctx.redis is not None:
        raw = ctx.redis.get(first_start_key(ctx.settings.key_prefix))
        if raw is not None:
            times.append(datetime.fromtimestamp(float(raw), UTC))
    first_log = QuantityLog.objects.order_by("id").only("created_at").first()  # _id: in time order
    if first_log is not None and first_log.created_at is not None:
        times.append(first_log.created_at)
    return min(times, default=None)


def _describe(schedule: BaseSchedule, app: Celery) -> str:
    if isinstance(schedule, crontab) and len(schedule.hour) == len(schedule.minute) == 1:
        return f"at {min(schedule.hour):02d}:{min(schedule.minute):02d} {app.timezone}"
    return str(schedule)


def _next_run(schedule: BaseSchedule, app: Celery) -> str:
    if not isinstance(schedule, crontab):
        return f"beat runs it {schedule}"
    now = app.now()
    at = (now + schedule.remaining_estimate(now) + timedelta(seconds=1)).astimezone(app.timezone)
    return f"the first runs at {at:%Y-%m-%d %H:%M} {app.timezone}"


def check_flower_auth(ctx: Context) -> list[Check]:
    """Flower's own environment is not doctor's: probe it over HTTP where its address is known.

    Every process that loads mes_tasks's configuration, Flower included, already refuses a
    ``FLOWER_BASIC_AUTH`` that Flower would misread, so a malformed value never gets here.
    """
    url = ctx.settings.flower_url
    if not url:
        return [
            Check(
                INFO,
                "flower auth",
                "not checked: Flower runs in its own process with its own environment",
                "set MES_FLOWER_URL (e.g. http://127.0.0.1:5555) and doctor checks it refuses strangers",
            )
        ]
    shown = mask_url(url)
    status = _http_status(url.rstrip("/") + FLOWER_PROBE_PATH, ctx.settings.connect_timeout_s)
    if status == 401:
        return [Check(OK, "flower auth", f"{shown} refuses {FLOWER_PROBE_PATH} without credentials")]
    if isinstance(status, int) and 200 <= status < 300:
        return [
            Check(
                FAIL,
                "flower auth",
                f"{shown} answers {FLOWER_PROBE_PATH} without credentials",
                "start Flower with FLOWER_BASIC_AUTH=user:password (make run and docker-compose do)",
            )
        ]
    return [Check(WARN, "flower auth", f"{shown}{FLOWER_PROBE_PATH}: {status}", "is Flower running there?")]


def _http_status(url: str, timeout_s: float) -> int | str:
    """The HTTP status of an unauthenticated GET, or why there is none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # http(s): checked in settings
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable ({getattr(exc, 'reason', exc)})"


def check_serializer(ctx: Context) -> list[Check]:
    accepted = list(ctx.app.conf.accept_content)
    if accepted == ["json"] and ctx.app.conf.task_serializer == "json":
        return [Check(OK, "serializer", "JSON only")]
    return [Check(FAIL, "serializer", f"accepts {accepted}", "accept JSON only: pickle runs code")]


CHECKS: list[Callable[[Context], list[Check]]] = [
    check_redis,
    check_redis_isolation,
    check_mongo,
    check_indexes,
    check_timing,
    check_consumers,
    check_audit,
    check_flower_auth,
    check_serializer,
]


def summary(results: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == FAIL for c in results), "checks": [c.to_dict() for c in results]}
