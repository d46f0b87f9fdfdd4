"""Celery tasks. ``update_quantity`` is the only way counters change."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from celery.exceptions import Reject
from celery.result import AsyncResult

from mes_tasks.app import app
from mes_tasks.audit.alerts import summary
from mes_tasks.audit.reports import audit_and_report
from mes_tasks.audit.verify import VerifyOutcome, record, verify_pass
from mes_tasks.db import Mongo
from mes_tasks.errors import MesError, NegativeCounter, PermanentError, TransientError
from mes_tasks.models import AuditReport
from mes_tasks.names import AUDIT_WORK_ORDERS, RELAY_OUTBOX, UPDATE_QUANTITY, VERIFY_COUNTERS
from mes_tasks.send.delay import send_delayed
from mes_tasks.send.outbox import settled_request_ids
from mes_tasks.send.relay import broker_holds, relay_now
from mes_tasks.settings import Settings
from mes_tasks.validation import check_work_order_id, readable, validate_update
from mes_tasks.worker.active import may_apply
from mes_tasks.worker.grouping import apply_with_waiting
from mes_tasks.worker.retries import (
    MAX_ERROR_CHARS,
    InternalError,
    count,
    dead_letter,
    queue_of,
    retry_or_dead_letter,
    wait_for_count_or_dead_letter,
)
from mes_tasks.worker.state import STATE, LedgerTask

log = logging.getLogger(__name__)


class UpdateTask(LedgerTask):
    """``update_quantity``'s class: a ``.delay()`` from the main app goes the producer's way (``send.delay``).

    The task's own retries (``Task.retry`` passes ``retries``) are sent as Celery sends
    them: their update is in the outbox already. The relay sends by name
    (``send.producer.publish``) and never comes here.
    """

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> AsyncResult:
        if "retries" in options:
            return super().apply_async(args, kwargs, task_id=task_id, **{**readable(args, kwargs), **options})
        return send_delayed(self, args, kwargs, task_id, options)


# max_retries=None: the retry budget is ours (MES_RETRY_MAX), not Celery's default of 3.
# throws: our own coded errors are dead-lettered and logged by us in one line; Celery logs
# them without a traceback ("raised expected"). An unexpected error keeps its traceback.
@app.task(
    bind=True,
    base=UpdateTask,
    name=UPDATE_QUANTITY,
    acks_late=True,
    max_retries=None,
    throws=(MesError,),
)
def update_quantity(
    self: LedgerTask,
    work_order_id: str,
    kind: str,
    quantity: int,
    request_id: str | None = None,
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Add ``quantity`` to the ``kind`` counter of a work order, exactly once per request id.

    Returns:
        ``{"status": "applied" | "duplicate", "value": counter after, "request_id": ..., ...}``
    """
    started = time.monotonic()
    if not may_apply(queue_of(self.request)):  # resumed after a stop, or handed over
        log.warning("not the active workorder consumer any more: handing %s back", self.request.id)
        raise Reject("not the active workorder consumer", requeue=True)
    try:
        req = validate_update(work_order_id, kind, quantity, request_id, context)
        grouped = apply_with_waiting(self, req, queue_of(self.request))  # MES_GROUP_MAX > 1
        if grouped is not None:
            return grouped.to_dict()
        result = self.ledger.apply(req, req.request_id or self.request.id, self.request.id)
    except NegativeCounter as exc:
        wait_for_count_or_dead_letter(self, exc, req.request_id or self.request.id)
    except PermanentError as exc:
        dead_letter(self, exc)
    except TransientError as exc:
        retry_or_dead_letter(self, exc)
    except Exception as exc:
        log.exception("unexpected error in %s", self.request.id)
        retry_or_dead_letter(self, InternalError(f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}"))
    STATE.record_duration(started)
    count(result.status, apply_ms=(time.monotonic() - started) * 1000)
    return result.to_dict()


@app.task(bind=True, base=LedgerTask, name=AUDIT_WORK_ORDERS, acks_late=False)
def audit_work_orders(
    self: LedgerTask, work_order_ids: list[str] | None = None, repair: bool | None = None
) -> dict[str, Any]:
    """Audit counters against logs (all work orders, or the given ones); store and alert.

    Acknowledged on receipt: an audit that dies is not re-run twice; the next one covers it.
    ``repair`` defaults to ``MES_AUDIT_REPAIR``.
    """
    ids = None if work_order_ids is None else [check_work_order_id(i) for i in work_order_ids]
    do_repair = self.ledger.settings.audit_repair if repair is None else bool(repair)
    report = audit_and_report(self.ledger, ids, do_repair=do_repair, trigger="schedule")
    return {"report_id": str(report.id), "finding_count": report.finding_count, "summary": summary(report)}


@app.task(name=RELAY_OUTBOX, acks_late=False, ignore_result=True, send_events=False)
def relay_outbox(grace_s: float | None = None) -> dict[str, int]:
    """Publish spooled updates, drop settled ones, re-send what the broker lost (beat, every second).

    ``grace_s`` defaults to ``MES_OUTBOX_GRACE_S``.
    """
    result = relay_now(grace_s)  # MongoDB connected at start-up
    if result:
        log.info("outbox: %s", result)
    return asdict(result)


@app.task(
    bind=True, base=LedgerTask, name=VERIFY_COUNTERS, acks_late=False, ignore_result=True, send_events=False
)
def verify_counters(self: LedgerTask) -> dict[str, Any]:
    """One pass of continuous verification (beat, every ``MES_VERIFY_INTERVAL_S``): the
    counters changed since the last pass, the sweep, and completeness; stored and alerted."""
    outcome, report = verify_once(self.ledger.mongo, self.ledger.settings)
    return verify_summary(outcome, report)


def verify_once(mongo: Mongo, settings: Settings) -> tuple[VerifyOutcome, AuditReport | None]:
    """A verification pass against this process's stores and broker, kept and alerted
    (``audit.verify.record``): the beat task's body, and ``audit verify``'s."""
    outcome = verify_pass(
        mongo,
        sweep=settings.verify_sweep,
        complete_s=settings.verify_complete_s,
        settled=settled_request_ids,
        held=broker_holds,
    )
    return outcome, record(outcome, settings)


def verify_summary(outcome: VerifyOutcome, report: AuditReport | None) -> dict[str, Any]:
    """What a pass did and found, JSON-ready."""
    return {
        "started_at": outcome.started_at.isoformat(),
        "work_orders": outcome.work_orders,
        "changed": outcome.changed,
        "proved": outcome.proved,
        "logs_read": outcome.logs_read,
        "log_changes": outcome.log_changes,
        "findings": [asdict(f) for f in outcome.findings],
        "drift": outcome.drift,
        "unexplained": outcome.unexplained,
        "completeness_checked": outcome.completeness_checked,
        "outbox_pruned": outcome.outbox_pruned,
        "logs_without_entry": outcome.logs_without_entry,
        "report_id": None if report is None else str(report.id),
    }
