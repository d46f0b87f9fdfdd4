"""``celery -A mes_tasks audit run|list|show``."""

from __future__ import annotations

import sys

import click

from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit.alerts import summary
from mes_tasks.audit.checks import total_work_orders
from mes_tasks.audit.reports import audit_and_report, get_report, report_dict
from mes_tasks.cli.common import ConsoleGroup, echo_json, echo_table, json_option, stores
from mes_tasks.models import AuditReport
from mes_tasks.validation import check_work_order_id

FINDING_HEADERS = ("work order", "check", "field", "counter", "log sum", "delta", "logs")


@click.group(cls=ConsoleGroup)
def audit() -> None:
    """Compare work-order counters with the sum of their logs; report and repair."""


@audit.command("run")
@click.option("--work-order", "work_orders", multiple=True, metavar="ID", help="Audit only these.")
@click.option("--repair", is_flag=True, envvar="MES_AUDIT_REPAIR", help="Set counters to the log sums.")
@click.option("--html", "html_file", is_flag=True, help="Also write an HTML report.")
@json_option
def run(work_orders: tuple[str, ...], repair: bool, html_file: bool, as_json: bool) -> None:
    """Audit now. Exits 1 when it found mismatches (even if it repaired them)."""
    ids = [check_work_order_id(i) for i in work_orders] or None
    conn = stores()
    fencer = Ledger(conn.mongo, conn.redis, conn.settings)  # a repair writes under the ledger's fence
    with click.progressbar(
        length=total_work_orders(ids), label="auditing work orders", file=sys.stderr
    ) as bar:
        report = audit_and_report(fencer, ids, do_repair=repair, html_file=html_file, progress=bar.update)
    if as_json:
        echo_json(report_dict(report))
    else:
        _show(report)
    sys.exit(1 if report.finding_count else 0)


@audit.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@json_option
def list_reports(limit: int, as_json: bool) -> None:
    """The most recent audit reports."""
    stores()
    reports = list(AuditReport.objects.order_by("-started_at").limit(limit))
    if as_json:
        echo_json([report_dict(r) for r in reports])
        return
    rows = [
        (r.id, f"{r.started_at:%Y-%m-%d %H:%M:%S}", _seconds(r), r.trigger, r.work_orders_scanned,
         r.logs_scanned, r.finding_count, "yes" if r.repaired else "no")
        for r in reports
    ]  # fmt: skip
    echo_table(
        ("id", "started (UTC)", "took s", "trigger", "work orders", "logs", "findings", "repaired"), rows
    )


@audit.command("show")
@click.argument("report_id")
@json_option
def show(report_id: str, as_json: bool) -> None:
    """One report in full."""
    stores()
    report = get_report(report_id)
    if as_json:
        echo_json(report_dict(report))
    else:
        _show(report)


def _show(report: AuditReport) -> None:
    click.echo(summary(report))
    if report.findings:
        rows = [tuple(f.get(k) for k in _FINDING_KEYS) for f in report.findings]
        echo_table(FINDING_HEADERS, rows)
    for rep in report.repairs:
        click.echo(f"repaired {rep['work_order_id']}: {rep['before']} -> {rep['after']}")
    for err in report.repair_errors:
        click.echo(f"repair of {err['work_order_id']} failed [{err['code']}]: {err['message']}")
    for kind, path in sorted((report.files or {}).items()):
        click.echo(f"{kind}: {path}")


_FINDING_KEYS = ("work_order_id", "check", "field", "counter", "log_sum", "delta", "log_count")


def _seconds(report: AuditReport) -> str:
    if report.finished_at is None:
        return ""
    return f"{(report.finished_at - report.started_at).total_seconds():.1f}"
