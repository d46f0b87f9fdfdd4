"""Pre-flight checks of a deployment: one line per check, OK / WARN / FAIL, and how to fix it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from celery.schedules import BaseSchedule, crontab, maybe_schedule
from mongoengine.connection import ConnectionFailure, get_connection
from pymongo.errors import OperationFailure

from mes_tasks import db
from mes_tasks.deployment import deployment_started
from mes_tasks.errors import MesError
from mes_tasks.keys import lease_key, pause_key
from mes_tasks.models import ALL_MODELS, AuditReport, FailedUpdate, QuantityLog, utcnow
from mes_tasks.names import AUDIT_WORK_ORDERS, WORKORDER_QUEUE
from mes_tasks.ops.status import consumers, pause_state
from mes_tasks.partitions import queue_names
from mes_tasks.queues import ask_waiting, in_use, waiting_from
from mes_tasks.settings import Settings, mask_secrets, mask_url

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"  # INFO: nothing wrong, but worth knowing
AUDIT_MAX_AGE = timedelta(hours=26)  # a nightly audit plus slack
FLOWER_PROBE_PATH = "/api/workers"  # guarded by --basic-auth; /healthcheck and /metrics are not
SOLO_POOL = "celery.concurrency.solo:TaskPool"
MONGOS = "isdbgrid"  # the ``msg`` of a mongos's ``hello`` reply
TRANSACTION_COLLECTIONS = ("work_orders", "quantity_logs")  # one update's transaction writes both
UNCONSUMED_GRACE_S = 3.0  # a queue without a holder is looked at again this much later


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


def check_sharding(ctx: Context) -> list[Check]:
    """On a sharded cluster, each collection's shard key against the indexes and the transaction.

    A replica set costs one ``hello``; a cluster two reads of its ``config`` database more.
    """
    client = ctx.mongo if ctx.mongo is not None else _answering_client()
    if client is None:
        return [Check(FAIL, "sharding", "not checked: MongoDB unreachable")]
    hello = client.admin.command("hello")
    if not is_sharded_cluster(hello):
        return sharding_checks(hello, {}, set(), {})
    names = [m._get_collection_name() for m in ALL_MODELS]
    spaces = {f"{ctx.settings.mongodb_db}.{name}": name for name in names}
    try:
        found = client.config.collections.find({"_id": {"$in": list(spaces)}, "dropped": {"$ne": True}})
        layout = {spaces[doc["_id"]]: doc for doc in found}
        zoned = {spaces[ns] for ns in client.config.tags.distinct("ns", {"ns": {"$in": list(spaces)}})}
    except OperationFailure as exc:
        return [
            Check(
                WARN,
                "sharding",
                f"a sharded cluster, but its config database is unreadable: {mask_secrets(str(exc))}",
                "give doctor's user the clusterMonitor role (it reads config.collections and config.tags)",
            )
        ]
    return sharding_checks(hello, layout, zoned, unique_indexes())


def _answering_client() -> db.Mongo | None:
    """mongoengine's connection if a server answered it (``prepare`` failed after connecting)."""
    try:
        client: db.Mongo = get_connection()
    except ConnectionFailure:
        return None
    return client if client.topology_description.has_known_servers else None


def unique_indexes() -> dict[str, list[tuple[str, ...]]]:
    """Per collection, the fields of each unique index the models create."""
    return {
        m._get_collection_name(): [
            tuple(field for field, _ in spec["fields"])
            for spec in m._meta["index_specs"]
            if spec.get("unique")
        ]
        for m in ALL_MODELS
    }


def is_sharded_cluster(hello: dict[str, Any]) -> bool:
    return hello.get("msg") == MONGOS


def sharding_checks(
    hello: dict[str, Any],
    layout: dict[str, dict[str, Any]],
    zoned: set[str],
    unique: dict[str, list[tuple[str, ...]]],
) -> list[Check]:
    """The sharding checks, from ``hello`` and the cluster's ``config`` documents (docs/sharding.md).

    Args:
        hello: the server's ``hello`` reply.
        layout: collection name -> its ``config.collections`` document, for those tracked there.
        zoned: the collections with zone ranges (``config.tags``).
        unique: collection name -> the fields of each unique index mes_tasks creates on it.
    """
    if not is_sharded_cluster(hello):
        return [Check(OK, "sharding", f"not sharded: replica set {hello.get('setName')}")]
    shown = ", ".join(f"{name} {_placement(layout.get(name))}" for name in unique)
    out = [Check(INFO, "sharding", f"a sharded cluster: {shown}")]
    for name, doc in layout.items():
        problem = None if _unsplit(doc) else _key_problem(name, tuple(doc["key"]), unique.get(name, []))
        if problem is not None:
            out.append(
                Check(FAIL, f"shard key {name}", f"{_shown(doc['key'])}: {problem}", _key_fix(name, unique))
            )
    return [*out, _transaction_check(layout, zoned)]


def _key_problem(name: str, key: tuple[str, ...], unique: list[tuple[str, ...]]) -> str | None:
    if name == "work_orders" and key != ("_id",):
        return "mes_tasks finds and fences a work order by _id alone, and _id is unique only per shard"
    for fields in unique:
        if key != fields[: len(key)]:
            return f"the unique index on {', '.join(fields)} is impossible (it must start with the shard key)"
    return None


def _key_fix(name: str, unique: dict[str, list[tuple[str, ...]]]) -> str:
    first = "_id" if name == "work_orders" else next((f[0] for f in unique.get(name, []) if f), "_id")
    return f"keep {name} unsharded, or reshard it on {{{first}: 1}} (docs/sharding.md)"


def _transaction_check(layout: dict[str, dict[str, Any]], zoned: set[str]) -> Check:
    """Whether a work order and its log, written in one transaction, share a shard."""
    orders, logs = (layout.get(name) for name in TRANSACTION_COLLECTIONS)
    if orders is None and logs is None:
        return Check(OK, "sharded transactions", "work orders and logs unsharded, on one shard: single-shard")
    if _unsplit(orders) or _unsplit(logs):
        return Check(
            INFO,
            "sharded transactions",
            "work_orders or quantity_logs moved by moveCollection: single-shard while both share a shard",
            "compare their shards in sh.status()",
        )
    by_order = orders is not None and logs is not None and tuple(logs["key"])[:1] == ("work_order_id",)
    if by_order and zoned >= set(TRANSACTION_COLLECTIONS):
        return Check(OK, "sharded transactions", "both keyed by work order and zoned: single-shard per zone")
    why = "keyed alike but not zoned" if by_order else "keyed apart"
    return Check(
        WARN,
        "sharded transactions",
        f"work orders and logs {why}: most updates commit across two shards (two-phase commit: "
        "about three more majority writes per update, and killSessions cannot end a prepared one)",
        "keep both unsharded, or key both by work order and zone them alike (docs/sharding.md)",
    )


def _unsplit(doc: dict[str, Any] | None) -> bool:
    """A collection ``config.collections`` tracks without sharding it (moved by ``moveCollection``)."""
    return doc is not None and bool(doc.get("unsplittable"))


def _placement(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "unsharded"
    if _unsplit(doc):
        return "unsharded (moved)"
    return _shown(doc["key"]) + (" unique" if doc.get("unique") else "")


def _shown(key: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{field}: {kind!r}" for field, kind in key.items()) + "}"


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
    """Exactly one solo consumer of each workorder queue (of each partition), unless paused."""
    if ctx.redis is None:
        return [Check(FAIL, "workorder consumer", "not checked: Redis unreachable")]
    by_queue = consumers(ctx.app)
    queues = queue_names(ctx.settings.partitions)
    paused_all = pause_state(ctx.redis, ctx.settings)
    checks = [
        _one_consumer(ctx, q, by_queue.get(q, []), paused_all or pause_state(ctx.redis, ctx.settings, q))
        for q in queues
    ]
    if len(queues) == 1:
        return checks
    bad = [c for c in checks if c.status != OK]
    if bad:
        return bad
    holders = ", ".join(f"{q} {by_queue[q][0]}" for q in queues)
    return [Check(OK, "workorder consumer", f"each of {len(queues)} partitions has exactly one: {holders}")]


def _one_consumer(ctx: Context, queue: str, workers: list[str], paused: dict[str, Any] | None) -> Check:
    name = "workorder consumer" if queue == WORKORDER_QUEUE else f"{queue} consumer"
    if paused is not None:
        if workers:
            return Check(FAIL, name, f"consumed while paused by {workers}")
        return Check(WARN, name, f"paused since {paused.get('at')}", "celery -A mes_tasks queue resume")
    if not workers:
        return Check(WARN, name, "no worker answered", "start one solo worker on -Q workorder")
    if len(workers) > 1:
        return Check(
            FAIL, name, f"{len(workers)} workers: {', '.join(workers)}", f"run exactly one worker on {queue}"
        )
    stats = ctx.app.control.inspect(destination=workers, timeout=1.0).stats() or {}
    pool = (stats.get(workers[0]) or {}).get("pool", {}).get("implementation", "?")
    if pool != SOLO_POOL:
        return Check(FAIL, name, f"{workers[0]} runs pool {pool}", "start it with -P solo")
    return Check(OK, name, f"exactly one, {workers[0]}, solo pool")


def check_unconsumed(ctx: Context) -> list[Check]:
    """No workorder queue (current, or a leftover of another N) keeps updates waiting with no holder.

    A queue seen so is looked at again ``UNCONSUMED_GRACE_S`` later: a hand-over or a take-over
    in progress leaves it free for a moment.
    """
    if ctx.redis is None:
        return []
    first = _unconsumed(ctx.redis, ctx.settings)
    if first:
        time.sleep(UNCONSUMED_GRACE_S)
    still = {q: n for q, n in _unconsumed(ctx.redis, ctx.settings).items() if q in first}
    if not still:
        return [Check(OK, "every queue consumed", "no workorder queue waits without a holder")]
    waiting = ", ".join(f"{q} ({n} waiting)" for q, n in still.items())
    fix = (
        f"start a workorder worker (on any MES_PARTITIONS, it takes them), or pin one: -Q {next(iter(still))}"
    )
    return [
        Check(FAIL, "every queue consumed", f"no worker holds {waiting} for {UNCONSUMED_GRACE_S:g}s", fix)
    ]


def _unconsumed(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Workorder queues in use with messages waiting, no lease holder and no pause; their lengths."""
    queues = in_use(client, settings.partitions)
    pipe = client.pipeline(transaction=False)
    asked = ask_waiting(pipe, queues)
    for queue in queues:
        pipe.exists(lease_key(settings.key_prefix, queue))
        pipe.exists(pause_key(settings.key_prefix), pause_key(settings.key_prefix, queue))
    replies = pipe.execute()
    waiting, rest = waiting_from(queues, replies[:asked]), replies[asked:]
    rows = [rest[i : i + 2] for i in range(0, len(rest), 2)]
    return {
        q: waiting[q]
        for q, (held, paused) in zip(queues, rows, strict=True)
        if waiting[q] and not held and not paused
    }


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
    started = deployment_started(ctx.redis, ctx.settings.key_prefix)
    if last is None and started is not None and now - started <= AUDIT_MAX_AGE:
        minutes = (now - started).total_seconds() / 60
        age = f"{minutes:.0f} min" if minutes < 60 else f"{minutes / 60:.1f} h"
        first = f"; {_next_run(schedule, ctx.app)}" if schedule is not None else ""
        return Check(INFO, "last audit", f"none yet: the deployment is {age} old{first}")
    if last is None and started is None:
        return Check(INFO, "last audit", "none yet: no worker has started here yet")
    when = "none ever" if last is None else f"the last one was at {last.started_at:%Y-%m-%d %H:%M} UTC"
    return Check(WARN, "last audit", f"none in the last 26 hours ({when})", "is celery beat running?")


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
    check_sharding,
    check_indexes,
    check_timing,
    check_consumers,
    check_unconsumed,
    check_audit,
    check_flower_auth,
    check_serializer,
]


def summary(results: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == FAIL for c in results), "checks": [c.to_dict() for c in results]}
