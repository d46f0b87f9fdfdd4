"""``celery -A mes_tasks workorder show ID``."""

from __future__ import annotations

from typing import Any

import click

from mes_tasks.cli.common import ConsoleGroup, echo_json, echo_table, json_option, stores
from mes_tasks.db import mongo_errors
from mes_tasks.errors import UnknownWorkOrder
from mes_tasks.models import CONTEXT_FIELDS, QuantityLog, WorkOrder
from mes_tasks.partitions import queue_for
from mes_tasks.validation import check_work_order_id


@click.group(cls=ConsoleGroup)
def workorder() -> None:
    """Work-order counters and logs."""


@workorder.command("show")
@click.argument("work_order_id")
@click.option("--logs", "n_logs", default=10, show_default=True, type=click.IntRange(0, 10_000))
@json_option
def show(work_order_id: str, n_logs: int, as_json: bool) -> None:
    """Counters, fencing epoch, version and the most recent logs."""
    wo = check_work_order_id(work_order_id)
    settings = stores().settings
    with mongo_errors():
        doc = WorkOrder._get_collection().find_one({"_id": wo})
        logs = (
            list(QuantityLog.objects(work_order_id=wo).order_by("-created_at").limit(n_logs))
            if n_logs
            else []
        )
    if doc is None:
        raise UnknownWorkOrder(f"work order {wo!r} does not exist")
    data = {
        "id": wo,
        **{k: doc.get(k, 0) for k in ("input_qty", "output_qty", "epoch", "version")},
        "updated_at": doc.get("updated_at"),
        "queue": queue_for(wo, settings.partitions),  # where its updates go (MES_PARTITIONS)
        "logs": [_log_dict(log) for log in logs],
    }
    if as_json:
        echo_json(data)
        return
    for key in ("id", "input_qty", "output_qty", "epoch", "version", "updated_at", "queue"):
        click.echo(f"{key}: {data[key]}")
    rows = [(x["created_at"], x["kind"], x["quantity"], x["value_after"], x["request_id"], x.get("barcode"))
            for x in data["logs"]]  # fmt: skip
    echo_table(("created (UTC)", "kind", "qty", "after", "request id", "barcode"), rows)


def _log_dict(log: QuantityLog) -> dict[str, Any]:
    data = {k: getattr(log, k) for k in ("request_id", "kind", "quantity", "value_after", "epoch", "task_id")}
    data["created_at"] = log.created_at.isoformat() if log.created_at else None
    data.update({k: getattr(log, k) for k in CONTEXT_FIELDS if getattr(log, k)})
    return data
