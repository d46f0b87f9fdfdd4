"""Audit alerts: a one-line summary in the log, and a JSON webhook when findings appear."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from mes_tasks.settings import Settings, mask_webhook

if TYPE_CHECKING:
    from mes_tasks.models import AuditReport

log = logging.getLogger(__name__)

WEBHOOK_BACKOFF_S = 0.5  # doubled per retry
WEBHOOK_MAX_FINDINGS = 50  # findings listed in the webhook body; the report has them all


def summary(report: AuditReport) -> str:
    """One line: what was scanned, what was found, what was repaired."""
    wos = len({f["work_order_id"] for f in report.findings})
    text = (
        f"audit {report.id}: {report.finding_count} finding(s) in {wos} work order(s); scanned "
        f"{report.work_orders_scanned} work orders and {report.logs_scanned} logs, re-checked "
        f"{report.rechecked} changed while scanning"
    )
    if report.checkpoints_reset:
        text += f"; {report.checkpoints_reset} verification checkpoint(s) were wrong and are proved again"
    if report.repaired:
        text += f"; repaired {len(report.repairs)} work order(s)"
        if report.repair_errors:
            text += f", {len(report.repair_errors)} repair(s) failed"
    return text


def announce(report: AuditReport, settings: Settings) -> bool:
    """Log the summary (ERROR when there are findings) and post the webhook if set.

    Returns True when a webhook was delivered. Never raises: alerting must not fail the audit.
    """
    line = summary(report)
    if not report.finding_count:
        log.info(line)
        return False
    log.error(line)
    if not settings.audit_webhook_url:
        return False
    return post_webhook(settings, _payload(report, line))


def post_webhook(settings: Settings, payload: dict[str, Any]) -> bool:
    """POST JSON with a timeout, retrying with backoff; False after the last failure."""
    body = json.dumps(payload, default=str).encode()
    shown = mask_webhook(settings.audit_webhook_url)
    for attempt in range(settings.webhook_retries + 1):
        request = urllib.request.Request(
            settings.audit_webhook_url, body, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.webhook_timeout_s) as response:
                if 200 <= response.status < 300:
                    return True
        except Exception as exc:  # any failure: retry, then give up quietly
            log.warning("audit webhook %s attempt %d failed: %s", shown, attempt + 1, type(exc).__name__)
        if attempt < settings.webhook_retries:
            time.sleep(WEBHOOK_BACKOFF_S * 2**attempt)
    log.error("audit webhook %s not delivered after %d attempts", shown, settings.webhook_retries + 1)
    return False


def _payload(report: AuditReport, line: str) -> dict[str, Any]:
    return {
        "event": "mes_tasks.audit.findings",
        "report_id": str(report.id),
        "summary": line,
        "finding_count": report.finding_count,
        "findings": report.findings[:WEBHOOK_MAX_FINDINGS],
        "repaired": report.repaired,
        "started_at": report.started_at,
        "finished_at": report.finished_at,
    }
