"""The classic design mes_tasks replaces, built here for the benchmark only.

Same Celery settings, queue shape and solo worker; a plain Redis lock (SET NX PX, DEL)
and a bare ``$inc`` plus a log insert: no transaction, no fence, no idempotency, no
watchdog. Run as ``celery -A classic worker -P solo -Q classic`` with ``bench/`` on the path.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Any

import redis
from celery import Celery
from pymongo import MongoClient
from pymongo.collection import Collection

from mes_tasks.config import configuration
from mes_tasks.settings import get_settings

QUEUE = "classic"
LOCK_TTL_MS = 30_000
LOCK_POLL_S = 0.005

app = Celery("classic")
app.config_from_object(configuration())
app.conf.task_routes = {"classic.update": {"queue": QUEUE}}


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


@cache
def _collections() -> tuple[Collection[dict[str, Any]], Collection[dict[str, Any]]]:
    settings = get_settings()
    database = MongoClient(settings.mongodb_uri)[settings.mongodb_db]
    return database.classic_work_orders, database.classic_logs


@app.task(name="classic.update", acks_late=True)
def update(
    work_order_id: str,
    kind: str,
    quantity: int,
    request_id: str | None = None,
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    work_orders, logs = _collections()
    key = f"classic:lock:{work_order_id}"
    while not _redis().set(key, "1", nx=True, px=LOCK_TTL_MS):
        time.sleep(LOCK_POLL_S)
    try:
        field = f"{kind}_qty"
        work_orders.update_one({"_id": work_order_id}, {"$inc": {field: quantity}})
        logs.insert_one(
            {
                "request_id": request_id,
                "work_order_id": work_order_id,
                "kind": kind,
                "quantity": quantity,
                "created_at": datetime.now(UTC),
                **(context or {}),
            }
        )
    finally:
        _redis().delete(key)
    return {"status": "applied"}
