"""Pre-flight checks of a deployment: one line per check, OK / WARN / FAIL, and how to fix it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery

from mes_tasks import db
from mes_tasks.errors import ConfigurationError, MesError
from mes_tasks.flowerauth import check_basic_auth
from mes_tasks.models import AuditReport, FailedUpdate, QuantityLog, utcnow
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.settings import Settings, mask_secrets
from mes_tasks.status import consumers, pause_state

OK, WARN, FAIL = "OK", "WARN", "FAIL"
AUDIT_MAX_AGE = timedelta(hours=26)  # a nightly audit plus slack
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
    db_number = (urlsplit(ctx.settings.redis_url).path.lstrip("/") or "0").split("?")[0]
    if db_number != "0":
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
    scheduled = any(
        e.get("task") == "mes_tasks.tasks.audit_work_orders" for e in ctx.app.conf.beat_schedule.values()
    )
    out = [
        Check(
            OK if scheduled else FAIL,
            "audit schedule",
            f"at {ctx.settings.audit_at} {ctx.settings.audit_timezone}"
            if scheduled
            else "not in beat_schedule",
        )
    ]
    if ctx.mongo is not None:
        last = AuditReport.objects.order_by("-started_at").first()
        if last is None or utcnow() - last.started_at > AUDIT_MAX_AGE:
            out.append(Check(WARN, "last audit", "none in the last 26 hours", "is celery beat running?"))
        else:
            out.append(
                Check(
                    OK if not last.finding_count else WARN,
                    "last audit",
                    f"{last.started_at:%Y-%m-%d %H:%M} UTC, {last.finding_count} findings",
                )
            )
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


def check_flower_auth(ctx: Context) -> list[Check]:
    basic = os.environ.get("FLOWER_BASIC_AUTH")
    if basic:
        try:
            check_basic_auth(basic)
        except ConfigurationError as exc:
            return [Check(FAIL, "flower auth", exc.message, "see the message")]
    if basic or os.environ.get("FLOWER_AUTH"):
        return [Check(OK, "flower auth", "configured")]
    return [
        Check(
            WARN,
            "flower auth",
            "FLOWER_BASIC_AUTH is not set here",
            "run Flower with --basic-auth (make run and docker-compose do)",
        )
    ]


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
