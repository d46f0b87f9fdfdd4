"""Audits of the counters against their logs: run one, list and show reports (``audit ...``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.checks import Progress
from mes_tasks.audit.reports import audit_and_report, get_report, report_dict
from mes_tasks.db import mongo_errors
from mes_tasks.models import AuditReport
from mes_tasks.ops.actions.limits import DEFAULT_AUDITS, MAX_AUDITS, check_range
from mes_tasks.ops.stores import Stores
from mes_tasks.validation import check_work_order_id


def run_audit(
    stores: Stores,
    work_order_ids: Sequence[str] = (),
    repair: bool = False,
    html_file: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Audit now (these work orders, or all), store the report and return it.

    ``repair`` sets mismatched counters to their log sums, under the ledger's fence.
    A report with findings is still a return: the caller decides what a finding means.
    """
    ids = [check_work_order_id(i) for i in work_order_ids] or None
    fencer = Ledger(stores.mongo, stores.redis, stores.settings)
    report = audit_and_report(fencer, ids, do_repair=repair, html_file=html_file, progress=progress)
    return report_dict(report)


def list_audits(limit: int = DEFAULT_AUDITS) -> list[dict[str, Any]]:
    """The most recent audit reports, newest first."""
    check_range("limit", limit, 1, MAX_AUDITS)
    with mongo_errors():
        return [report_dict(r) for r in AuditReport.objects.order_by("-started_at").limit(limit)]


def show_audit(report_id: str) -> dict[str, Any]:
    """One report in full.

    Raises:
        ValidationError: ``INVALID_REPORT_ID``. MesError: ``REPORT_NOT_FOUND``.
    """
    return report_dict(get_report(report_id))
