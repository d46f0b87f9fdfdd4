"""The producer side: validate, enqueue, and answer with a result dict, never an exception."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis

from mes_tasks import db
from mes_tasks.errors import ValidationError
from mes_tasks.keys import apply_ms_key
from mes_tasks.settings import Settings, get_settings, mask_secrets
from mes_tasks.validation import validate_update

log = logging.getLogger(__name__)

WORKORDER_QUEUE = "workorder"
DEFAULT_APPLY_MS = 10.0  # estimate per queued update until the worker has measured one
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class Producer:
    """Submits quantity updates; holds its Redis client for queue statistics."""

    def __init__(self, settings: Settings | None = None, redis_client: redis.Redis | None = None):
        self.settings = settings or get_settings()
        self.redis = redis_client or db.redis_client(self.settings)

    def submit(
        self,
        work_order_id: Any,
        kind: Any,
        quantity: Any,
        request_id: Any = None,
        context: Any = None,
    ) -> dict[str, Any]:
        """Validate and enqueue one update; see ``submit_quantity_update``."""
        try:
            req = validate_update(work_order_id, kind, quantity, request_id, context)
        except ValidationError as exc:
            return {"success": False, "job_id": None, "code": exc.code, "error": exc.message}
        job_id = str(uuid.uuid4())
        rid = req.request_id or job_id
        try:
            _publish(job_id, req.work_order_id, req.kind, req.quantity, rid, req.context)
        except Exception as exc:  # every broker failure becomes a result, never a raise
            reason = mask_secrets(f"{type(exc).__name__}: {exc}")
            log.error("could not enqueue %s: %s", rid, reason)
            return {"success": False, "job_id": None, "code": "QUEUE_ERROR", "error": reason}
        length, delay_ms = self.queue_stats()
        return {
            "success": True,
            "job_id": job_id,
            "request_id": rid,
            "code": "QUEUED",
            "queue_length": length,
            "estimated_delay_ms": delay_ms,
        }

    def queue_stats(self) -> tuple[int | None, int | None]:
        """Messages waiting in ``workorder`` and the estimated wait for a new one (ms)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.llen(WORKORDER_QUEUE)
            pipe.get(apply_ms_key(self.settings.key_prefix))
            length, apply_ms = pipe.execute()
        except redis.RedisError:
            return None, None
        per_update = float(apply_ms) if apply_ms else DEFAULT_APPLY_MS
        return int(length), round((int(length) + 1) * per_update)


def _publish(
    job_id: str, work_order_id: str, kind: str, quantity: int, request_id: str, context: dict[str, str]
) -> None:
    from mes_tasks.tasks import update_quantity

    update_quantity.apply_async(
        args=(work_order_id, kind, quantity),
        kwargs={"request_id": request_id, "context": context or None},
        task_id=job_id,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


_default: Producer | None = None


def submit_quantity_update(
    work_order_id: Any,
    kind: Any,
    quantity: Any,
    request_id: Any = None,
    context: Any = None,
) -> dict[str, Any]:
    """Validate and enqueue an update for the ``workorder`` worker.

    Returns:
        On success ``{"success": True, "job_id", "request_id", "code": "QUEUED",
        "queue_length", "estimated_delay_ms"}``; otherwise ``{"success": False,
        "code": <MISSING_WORK_ORDER_ID | INVALID_... | QUEUE_ERROR>, "error": reason}``.
    """
    global _default
    if _default is None:
        _default = Producer()
    return _default.submit(work_order_id, kind, quantity, request_id, context)
