"""``celery -A mes_tasks audit run|list|show|verify``."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click

from mes_tasks.audit.alerts import summary
from mes_tasks.audit.checks import total_work_orders
from mes_tasks.cli.common import ConsoleGroup, echo_json, echo_table, json_option, stores
from mes_tasks.models import AuditReport
from mes_tasks.ops import actions
from mes_tasks.ops.actions.limits import DEFAULT_AUDITS, MAX_AUDITS
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
    ids = [check_work_order_id(i) for i in work_orders]  # before connecting: a typo is told as such
    conn = stores()
    with click.progressbar(
        length=total_work_orders(ids or None), label="auditing work orders", file=sys.stderr
    ) as bar:
        data = actions.run_audit(conn, ids, repair=repair, html_file=html_file, progress=bar.update)
    if as_json:
        echo_json(data)
    else:
        _show(data)
    sys.exit(1 if data["finding_count"] else 0)


@audit.command("list")
@click.option("--limit", default=DEFAULT_AUDITS, show_default=True, type=click.IntRange(1, MAX_AUDITS))
@json_option
def list_reports(limit: int, as_json: bool) -> None:
    """The most recent audit reports."""
    stores()
    data = actions.list_audits(limit)
    if as_json:
        echo_json(data)
        return
    rows = [
        (r["id"], f"{_time(r['started_at']):%Y-%m-%d %H:%M:%S}", _seconds(r), r["trigger"],
         r["work_orders_scanned"], r["logs_scanned"], r["finding_count"], "yes" if r["repaired"] else "no")
        for r in data
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
    data = actions.show_audit(report_id)
    if as_json:
        echo_json(data)
    else:
        _show(data)


@audit.command("verify")
@click.option("--resend", is_flag=True, help="Send each unexplained update again from its outbox entry.")
@json_option
def verify(resend: bool, as_json: bool) -> None:
    """One continuous-verification pass now: the counters changed since the last pass, the
    sweep, and every old outbox entry's outcome. Exits 1 when it found drift or an
    unexplained update."""
    from mes_tasks.send.relay import resend as resend_entries
    from mes_tasks.tasks import verify_once, verify_summary

    conn = stores()
    outcome, report = verify_once(conn.mongo, conn.settings)
    data = verify_summary(outcome, report)
    if resend and outcome.unexplained:
        data["resent"] = resend_entries([u["job_id"] for u in outcome.unexplained])
    if as_json:
        echo_json(data)
    else:
        _show_pass(data)
    sys.exit(1 if data["drift"] or data["unexplained"] else 0)


def _show_pass(data: dict[str, Any]) -> None:
    click.echo(
        f"verified {data['work_orders']} work orders: {data['changed']} changed since the last pass, "
        f"{data['proved']} proved in full, {data['logs_read']} logs read; {len(data['drift'])} drifted, "
        f"{len(data['unexplained'])} unexplained update(s)"
    )
    click.echo(
        f"{data['log_changes']} log(s) deleted or edited since the last pass; outbox: "
        f"{data['outbox_pruned']} settled entries accounted for and pruned, "
        f"{data['logs_without_entry']} new log(s) without an entry"
    )
    if data["findings"]:
        echo_table(FINDING_HEADERS, [tuple(f.get(k) for k in _FINDING_KEYS) for f in data["findings"]])
    if data["unexplained"]:
        rows = [(u["request_id"], u["job_id"], u["work_order_id"], u["age_s"], u["republished"])
                for u in data["unexplained"]]  # fmt: skip
        echo_table(("request id", "job id", "work order", "age s", "re-sent"), rows)
        if "resent" in data:
            click.echo(f"re-sent {data['resent']} with their own request ids")
        else:
            click.echo("--resend sends them again with their own request ids (safe: counted once)")
    if not data["completeness_checked"]:
        click.echo("the broker could not be read: completeness was not checked this time")
    if data["report_id"]:
        click.echo(f"new findings stored as report {data['report_id']} (audit show {data['report_id']})")


def _show(data: dict[str, Any]) -> None:
    click.echo(summary(_summarised(data)))
    if data["findings"]:
        rows = [tuple(f.get(k) for k in _FINDING_KEYS) for f in data["findings"]]
        echo_table(FINDING_HEADERS, rows)
    for rep in data["repairs"]:
        click.echo(f"repaired {rep['work_order_id']}: {rep['before']} -> {rep['after']}")
    for err in data["repair_errors"]:
        click.echo(f"repair of {err['work_order_id']} failed [{err['code']}]: {err['message']}")
    for kind, path in sorted((data.get("files") or {}).items()):
        click.echo(f"{kind}: {path}")


_FINDING_KEYS = ("work_order_id", "check", "field", "counter", "log_sum", "delta", "log_count")
_SUMMARISED = ("id", "finding_count", "findings", "work_orders_scanned", "logs_scanned", "rechecked",
               "checkpoints_reset", "repaired", "repairs", "repair_errors")  # fmt: skip


def _summarised(data: dict[str, Any]) -> AuditReport:
    """The report's fields ``summary`` reads, so that the console says what the alert says."""
    return AuditReport(**{k: data.get(k) for k in _SUMMARISED})


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _seconds(data: dict[str, Any]) -> str:
    if data["finished_at"] is None:
        return ""
    return f"{(_time(data['finished_at']) - _time(data['started_at'])).total_seconds():.1f}"
