"""The worker's consumer: back on the broker within about a second after Redis comes back.

Celery's consumer retries a lost broker connection after 2, 4, 6 ... seconds, then
spends a second on mingle (asking other workers for revoked tasks, which mes_tasks
never uses); after a two-second Redis restart the worker was idle for seven. This
consumer retries every ``RECONNECT_MAX_S`` at most, forever (a service waits for its
broker), and runs without mingle and gossip.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

RECONNECT_FIRST_S = 0.2
RECONNECT_STEP_S = 0.3
RECONNECT_MAX_S = 1.0


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """``worker_consumer``: Celery's consumer with a quick reconnect and no mingle or gossip."""

    def __init__(self, *args: Any, worker_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = {**(worker_options or {}), "without_mingle": True, "without_gossip": True}
        super().__init__(*args, worker_options=options, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_FIRST_S,
            interval_step=RECONNECT_STEP_S,
            interval_max=RECONNECT_MAX_S,
        )
        return super().ensure_connected(conn)
