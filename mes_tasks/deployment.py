"""The deployment's start: its first worker's start, or its first logged update if that was earlier.

doctor's ``last audit`` check and the metrics collector (whose
``mes_deployment_started_timestamp_seconds`` the ``MesAuditStale`` alert reads) both take
it from here, so that they agree on when a deployment is too old to have no audit.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from mes_tasks.keys import first_start_key
from mes_tasks.models import QuantityLog


def recorded_start(raw: str | bytes | None) -> datetime | None:
    """The first worker's start, as it wrote it under ``first_start_key`` (Unix seconds).

    None when it is unset, or unreadable (a statistic, never an error).
    """
    try:
        return None if raw is None else datetime.fromtimestamp(float(raw), UTC)
    except (ValueError, OverflowError):
        return None


def first_logged_at() -> datetime | None:
    """When the first update was logged: one read of MongoDB, on the ``_id`` index (in time order)."""
    first = QuantityLog.objects.order_by("id").only("created_at").first()
    return None if first is None else first.created_at


def earliest_start(recorded: datetime | None, first_log: datetime | None) -> datetime | None:
    """The deployment's start from what Redis and MongoDB say; None while neither knows one."""
    return min((t for t in (recorded, first_log) if t is not None), default=None)


def deployment_started(client: redis.Redis | None, prefix: str) -> datetime | None:
    """When the deployment started; without Redis (``client`` None), from MongoDB alone."""
    recorded = None if client is None else recorded_start(client.get(first_start_key(prefix)))
    return earliest_start(recorded, first_logged_at())
