"""The deployment's pre-flight (``doctor``)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from mes_tasks.ops.doctor import Context, run_checks, summary
from mes_tasks.settings import Settings


def doctor_report(app: Celery, settings: Settings) -> dict[str, Any]:
    """Every check, in order: ``{"ok": no FAIL, "checks": [{status, name, detail, fix}, ...]}``.

    A check that crashes is a FAIL, never an exception; the checks make their own connections.
    """
    return summary(run_checks(Context(settings, app)))
