"""The operator console's operations as plain functions: the CLI's and the HTTP gateway's one source.

Each returns exactly the data ``celery -A mes_tasks <command> --json`` prints (JSON-ready:
strings, numbers, lists, dicts), never asks and never prints, and refuses with a coded
``MesError``. Asking for confirmation is the caller's: the CLI asks before it calls, the
gateway wants an explicit confirmation. Redis and the settings come in a ``Stores``;
MongoDB is reached through mongoengine's default connection, which ``stores()`` makes.
"""

from __future__ import annotations

from mes_tasks.ops.actions.audit import list_audits, run_audit, show_audit
from mes_tasks.ops.actions.doctor import doctor_report
from mes_tasks.ops.actions.failed import (
    check_selection,
    discard_failed_updates,
    discard_records,
    list_failed,
    record_dict,
    retry_failed_updates,
    select_failed,
    show_failed,
)
from mes_tasks.ops.actions.locks import list_locks, lock_holder, release_lock
from mes_tasks.ops.actions.queue import pause_queue, purge_queue, queue_status, queue_target, resume_queue
from mes_tasks.ops.actions.workorder import create_work_order, show_work_order
from mes_tasks.ops.stores import Stores, stores

__all__ = [
    "Stores",
    "check_selection",
    "create_work_order",
    "discard_failed_updates",
    "discard_records",
    "doctor_report",
    "list_audits",
    "list_failed",
    "list_locks",
    "lock_holder",
    "pause_queue",
    "purge_queue",
    "queue_status",
    "queue_target",
    "record_dict",
    "release_lock",
    "resume_queue",
    "retry_failed_updates",
    "run_audit",
    "select_failed",
    "show_audit",
    "show_failed",
    "show_work_order",
    "stores",
]
