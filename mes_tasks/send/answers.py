"""What a submission answers: one result dict per update, in the reference services' shape.

``success``, ``job_id``, ``request_id``, ``code`` (``QUEUED``, ``SPOOLED`` or an error code),
``recorded``, ``queue_length``, ``estimated_delay_ms``; and ``error`` for a refusal or a spool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery.result import AsyncResult

from mes_tasks.errors import MesError, QueueError
from mes_tasks.send.outbox import Job


@dataclass
class Sent:
    """What became of one update: taken by the broker (``result``), or ``spooled`` for this reason.

    ``recorded``: whether the outbox holds it (False when MongoDB was down at the producer).
    """

    result: AsyncResult | None = None
    spooled: str | None = None
    recorded: bool = True
    error: QueueError | None = None  # the broker refused it and the outbox could not record it

    @property
    def queued(self) -> bool:
        """Whether the broker took it."""
        return self.spooled is None and self.error is None


def estimated_delay_ms(length: int | None, per_update_ms: float | None, behind: int = 0) -> int | None:
    """The wait of an update with ``behind`` updates queued after it, of ``length`` waiting (ms).

    The update being applied counts too, and the update itself is always waiting.
    """
    if length is None or per_update_ms is None:
        return None
    return round((max(length - behind, 1) + 1) * per_update_ms)


def refused(exc: MesError) -> dict[str, Any]:
    """The result dict of an update that was not queued, nor kept."""
    extra = {"recorded": False} if isinstance(exc, QueueError) else {}
    return {"success": False, "job_id": None, "code": exc.code, **extra, "error": exc.message}


def answer(
    job: Job, sent: Sent, length: int | None, per_update_ms: float | None, behind: int
) -> dict[str, Any]:
    if sent.error is not None:
        return refused(sent.error)
    rid = job.kwargs["request_id"]
    if sent.spooled is not None:
        return {"success": True, "job_id": job.job_id, "request_id": rid, "code": "SPOOLED", "recorded": True,
                "queue_length": None, "estimated_delay_ms": None, "error": sent.spooled}  # fmt: skip
    return {
        "success": True,
        "job_id": job.job_id,
        "request_id": rid,
        "code": "QUEUED",
        "recorded": sent.recorded,
        "queue_length": length,
        "estimated_delay_ms": estimated_delay_ms(length, per_update_ms, behind),
    }
