"""The stores an operation works on: the environment's settings and a connection to each store."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from mes_tasks import db
from mes_tasks.settings import Settings, get_settings


@dataclass(frozen=True)
class Stores:
    """The environment's settings and a connection to each store: what a command works on."""

    settings: Settings
    mongo: db.Mongo
    redis: redis.Redis


def stores() -> Stores:
    """Connect to both stores with the environment's settings (MongoDB checked and indexed)."""
    settings = get_settings()
    return Stores(settings, db.prepare(settings), db.redis_client(settings))
