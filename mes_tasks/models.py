"""MongoDB documents: work-order counters, the quantity log (idempotency), dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from mongoengine import (
    BooleanField,
    DateTimeField,
    DictField,
    Document,
    IntField,
    ListField,
    StringField,
)

KINDS = ("input", "output")
COUNTER_FIELDS = {"input": "input_qty", "output": "output_qty"}
VERSION = "version"  # a work order's, bumped by every committed counter change; its logs carry theirs
CONTEXT_FIELDS = (
    "barcode",
    "operation",
    "operator_id",
    "process_step_id",
    "process_name",
    "reason",
    "source",
)
FAILED_STATUSES = ("open", "retried", "discarded", "resolved")
VERIFY_TRIGGER = "verify"  # an AuditReport stored by a continuous-verification pass
OUTBOX_SETTLED = "settled"  # an outbox entry whose update has its outcome, until a pass prunes it


def utcnow() -> datetime:
    return datetime.now(UTC)


class WorkOrder(Document):
    """A production work order's counters; created by the main app, changed only here."""

    id = StringField(primary_key=True)
    input_qty = IntField(default=0)
    output_qty = IntField(default=0)
    # Fencing epoch, bumped by every lock holder right after it acquires.
    epoch = IntField(default=0)
    # Bumped by every committed counter change; the audit uses it to spot concurrent changes.
    version = IntField(default=0)
    updated_at = DateTimeField()

    meta = {"collection": "work_orders", "strict": False}


class QuantityLog(Document):
    """One applied update; the unique ``request_id`` makes every request count once."""

    request_id = StringField(required=True, unique=True)
    work_order_id = StringField(required=True)
    kind = StringField(required=True, choices=KINDS)
    quantity = IntField(required=True)
    value_after = IntField(required=True)
    version = IntField()  # the work order's version right after this update (none: logged before it was kept)
    epoch = IntField(required=True)
    task_id = StringField()
    created_at = DateTimeField(default=utcnow)
    barcode = StringField()
    operation = StringField()
    operator_id = StringField()
    process_step_id = StringField()
    process_name = StringField()
    reason = StringField()
    source = StringField()

    meta = {
        "collection": "quantity_logs",
        "strict": False,
        "indexes": [
            # Covers the audit's per-work-order, per-kind sums and "recent logs of a work order".
            {"fields": ["work_order_id", "kind", "quantity"], "name": "wo_kind_qty"},
            {"fields": ["work_order_id", "-created_at"], "name": "wo_recent"},
            # The continuous verifier's "logs of a work order since its checkpoint".
            {"fields": ["work_order_id", "version"], "name": "wo_version"},
        ],
    }


class FailedUpdate(Document):
    """The dead-letter record of an update that could not be applied."""

    request_id = StringField(required=True, unique=True)
    task_name = StringField(required=True)
    task_id = StringField()
    payload = StringField()  # JSON {"args": [...], "kwargs": {...}}, exactly as sent
    payload_truncated = BooleanField(default=False)  # cut at its size limit: it cannot be retried
    work_order_id = StringField()
    error_code = StringField(required=True)
    error_message = StringField()
    attempts = IntField(default=1)
    first_failed_at = DateTimeField(default=utcnow)
    last_failed_at = DateTimeField(default=utcnow)
    status = StringField(default="open", choices=FAILED_STATUSES)
    history = ListField(DictField())

    meta = {
        "collection": "failed_updates",
        "strict": False,
        "indexes": [
            {"fields": ["status", "error_code"], "name": "status_code"},
            {"fields": ["work_order_id"], "name": "work_order"},
        ],
    }


class AuditReport(Document):
    """One run of the consistency audit."""

    started_at = DateTimeField(required=True)
    finished_at = DateTimeField()
    trigger = StringField(default="manual")  # manual | schedule | verify
    scope = ListField(StringField(), default=None)
    work_orders_scanned = IntField(default=0)
    logs_scanned = IntField(default=0)
    rechecked = IntField(default=0)
    checkpoints_reset = IntField(default=0)  # continuous verification's, found wrong by this audit
    finding_count = IntField(default=0)
    findings = ListField(DictField())
    repaired = BooleanField(default=False)
    repairs = ListField(DictField())
    repair_errors = ListField(DictField())
    files = DictField()

    meta = {
        "collection": "audit_reports",
        "strict": False,
        "indexes": [{"fields": ["-started_at"], "name": "recent"}],
        "ordering": ["-started_at"],
    }


class OutboxMessage(Document):
    """A submitted update: sent, or spooled while the broker was down, until its outcome;
    then settled, until a continuous-verification pass accounted for it."""

    job_id = StringField(required=True, unique=True)
    request_id = StringField(required=True)
    payload = StringField(required=True)  # JSON {"args": [...], "kwargs": {...}}
    state = StringField(default="spooled")  # "sent" | "spooled" (not yet taken by the broker) | "settled"
    reason = StringField()
    created_at = DateTimeField(default=utcnow)
    sent_at = DateTimeField()
    attempts = IntField(default=0)
    republished = IntField(default=0)
    last_error = StringField()
    last_attempt_at = DateTimeField()
    settled_at = DateTimeField()

    meta = {
        "collection": "outbox",
        "strict": False,
        "indexes": [
            {"fields": ["created_at"], "name": "oldest"},
            {"fields": ["state", "sent_at"], "name": "state_sent"},
            {"fields": ["request_id"], "name": "request"},  # "where is my update?" (the gateway)
        ],
    }


def outbox_work_order(payload: Any) -> str | None:
    """The work order an outbox entry's ``payload`` is for; None when it cannot be read."""
    try:
        args = json.loads(payload).get("args") or []
    except (TypeError, ValueError, AttributeError):
        return None
    return args[0] if isinstance(args, list) and args and isinstance(args[0], str) else None


class VerifyCheckpoint(Document):
    """A work order's counters as proved equal to its logs up to its ``version`` (``audit.verify``)."""

    id = StringField(primary_key=True)  # the work order's
    version = IntField(required=True)
    input_qty = IntField(required=True)
    output_qty = IntField(required=True)
    proved_at = DateTimeField(default=utcnow)
    swept_at = DateTimeField()  # its whole log last summed again (the sweep)

    meta = {
        "collection": "verify_checkpoints",
        "strict": False,
        "indexes": [{"fields": ["swept_at"], "name": "swept"}],
    }


class VerifyState(Document):
    """What the last continuous-verification pass found (one document, ``_id`` "last")."""

    id = StringField(primary_key=True, default="last")
    started_at = DateTimeField()
    finished_at = DateTimeField()
    verified_up_to = DateTimeField()  # every change committed before this was verified
    work_orders = IntField(default=0)
    changed = IntField(default=0)
    logs_read = IntField(default=0)
    drift = ListField(StringField())  # work orders whose counters do not equal their logs
    unexplained = ListField(DictField())  # outbox entries with no outcome, waiting nowhere
    completeness_checked = BooleanField(default=False)  # False: the broker could not be read
    outbox_pruned = IntField(default=0)  # settled outbox entries the pass accounted for and deleted
    logs_without_entry = IntField(default=0)  # logs the pass read whose request id has no outbox entry
    logs_without_entry_total = IntField(default=0)  # the same, over every pass

    meta = {"collection": "verify_state", "strict": False}


ALL_MODELS: tuple[type[Document], ...] = (
    WorkOrder,
    QuantityLog,
    FailedUpdate,
    AuditReport,
    OutboxMessage,
    VerifyCheckpoint,
    VerifyState,
)
