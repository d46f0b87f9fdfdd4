"""Audit reports: run, repair when asked, store (MongoDB + JSON/CSV/HTML files), prune, alert."""

from __future__ import annotations

import csv
import html
import json
import logging
from dataclasses import asdict, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit import alerts
from mes_tasks.audit.checks import AuditOutcome, Finding, Progress, check_checkpoints, repair, run_audit
from mes_tasks.db import mongo_errors
from mes_tasks.errors import MesError, ValidationError
from mes_tasks.models import AuditReport, utcnow
from mes_tasks.settings import Settings

log = logging.getLogger(__name__)

FINDING_COLUMNS = [f.name for f in fields(Finding)]
FILE_GLOBS = ("audit-*.json", "audit-*.csv", "audit-*.html")


def audit_and_report(
    ledger: Ledger,
    work_order_ids: list[str] | None = None,
    *,
    do_repair: bool = False,
    html_file: bool = False,
    trigger: str = "manual",
    progress: Progress | None = None,
) -> AuditReport:
    """Audit, optionally repair, then store, write, prune and alert. Safe to run twice."""
    outcome = run_audit(ledger.mongo, work_order_ids, progress)
    outcome.checkpoints_reset = check_checkpoints(outcome)
    report = AuditReport(trigger=trigger)
    if do_repair:
        _repair_all(ledger, outcome, report)
    _fill(report, outcome)
    with mongo_errors():
        report.save()
    report.files = write_files(report, Path(ledger.settings.reports_dir), html_file=html_file)
    with mongo_errors():
        report.save()
        prune(ledger.settings)
    alerts.announce(report, ledger.settings)
    return report


def _repair_all(ledger: Ledger, outcome: AuditOutcome, report: AuditReport) -> None:
    targets = sorted({f.work_order_id for f in outcome.findings if f.counter is not None})
    for wo_id in targets:
        try:
            done = repair(ledger, wo_id)
        except MesError as exc:
            report.repair_errors.append({"work_order_id": wo_id, **exc.to_dict()})
            continue
        if done is not None:
            outcome.repairs.append(done)
    outcome.repaired = True


def _fill(report: AuditReport, outcome: AuditOutcome) -> None:
    names = ("started_at", "finished_at", "scope", "work_orders_scanned", "logs_scanned", "rechecked",
             "checkpoints_reset")  # fmt: skip
    for name in names:
        setattr(report, name, getattr(outcome, name))
    report.findings = [asdict(f) for f in outcome.findings]
    report.finding_count = len(outcome.findings)
    report.repaired = outcome.repaired
    report.repairs = [asdict(r) for r in outcome.repairs]


def report_dict(report: AuditReport) -> dict[str, Any]:
    """A report as plain JSON-ready data (ISO times)."""
    data: dict[str, Any] = report.to_mongo().to_dict()
    data.pop("_id", None)
    data = {"id": str(report.id), **data}
    for name in ("started_at", "finished_at"):
        value = getattr(report, name)
        data[name] = value.isoformat() if value else None
    return data


def write_files(report: AuditReport, directory: Path, *, html_file: bool = False) -> dict[str, str]:
    """Write the report as JSON and CSV (and HTML); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"audit-{report.started_at:%Y%m%dT%H%M%SZ}-{report.id}"
    paths = {"json": stem.with_suffix(".json"), "csv": stem.with_suffix(".csv")}
    paths["json"].write_text(json.dumps(report_dict(report), indent=2, ensure_ascii=False))
    with paths["csv"].open("w", newline="") as out:
        writer = csv.DictWriter(out, columns_of(report.findings))
        writer.writeheader()
        writer.writerows(report.findings)
    if html_file:
        paths["html"] = stem.with_suffix(".html")
        paths["html"].write_text(render_html(report))
    return {kind: str(path) for kind, path in paths.items()}


def render_html(report: AuditReport) -> str:
    """A small standalone HTML page: the summary and one table row per finding."""
    columns = columns_of(report.findings)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(f.get(c, '')))}</td>" for c in columns) + "</tr>"
        for f in report.findings
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>mes_tasks audit</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #999;padding:2px 6px}"
        "table{border-collapse:collapse}</style>"
        f"<h1>Audit {report.id}</h1><p>{html.escape(alerts.summary(report))}</p>"
        f"<table><tr>{head}</tr>{rows}</table>"
    )


def columns_of(findings: list[dict[str, Any]]) -> list[str]:
    """A finding's columns, then any other key a finding has (an unexplained update's request id)."""
    extra = [key for f in findings for key in f if key not in FINDING_COLUMNS]
    return [*FINDING_COLUMNS, *dict.fromkeys(extra)]


def prune(settings: Settings) -> int:
    """Delete reports (documents and files) older than the retention; returns how many documents."""
    cutoff = utcnow() - timedelta(days=settings.report_retention_days)
    deleted = int(AuditReport.objects(started_at__lt=cutoff).delete())
    directory = Path(settings.reports_dir)
    for pattern in FILE_GLOBS:
        for path in directory.glob(pattern):
            if path.stat().st_mtime < cutoff.timestamp():
                path.unlink(missing_ok=True)
    return deleted


def get_report(report_id: str) -> AuditReport:
    """Raises ValidationError for a malformed id, MesError(REPORT_NOT_FOUND) for an unknown one."""
    try:
        oid = ObjectId(report_id)
    except (InvalidId, TypeError):
        raise ValidationError(f"{report_id!r} is not a report id", code="INVALID_REPORT_ID") from None
    report: AuditReport | None = AuditReport.objects(id=oid).first()
    if report is None:
        raise MesError(f"no audit report {report_id}", code="REPORT_NOT_FOUND")
    return report
