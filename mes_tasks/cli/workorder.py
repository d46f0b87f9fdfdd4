"""``celery -A mes_tasks workorder show ID`` and ``workorder create ID``."""

from __future__ import annotations

import click

from mes_tasks.cli.common import ConsoleGroup, echo_json, echo_table, json_option, stores
from mes_tasks.ops import actions
from mes_tasks.ops.actions.limits import DEFAULT_LOGS, MAX_LOGS
from mes_tasks.validation import check_work_order_id


@click.group(cls=ConsoleGroup)
def workorder() -> None:
    """Work-order counters and logs."""


@workorder.command("create")
@click.argument("work_order_id")
@json_option
def create(work_order_id: str, as_json: bool) -> None:
    """Create a work order at zero, to try mes_tasks (in production the main app creates them)."""
    wo = check_work_order_id(work_order_id)
    stores()
    data = actions.create_work_order(wo)
    if as_json:
        echo_json(data)
        return
    click.echo(f"created work order {wo} (input 0, output 0)")


@workorder.command("show")
@click.argument("work_order_id")
@click.option("--logs", "n_logs", default=DEFAULT_LOGS, show_default=True, type=click.IntRange(0, MAX_LOGS))
@json_option
def show(work_order_id: str, n_logs: int, as_json: bool) -> None:
    """Counters, fencing epoch, version and the most recent logs."""
    wo = check_work_order_id(work_order_id)  # before connecting: a typo is told as such
    data = actions.show_work_order(stores().settings, wo, n_logs)
    if as_json:
        echo_json(data)
        return
    for key in ("id", "input_qty", "output_qty", "epoch", "version", "updated_at", "queue"):
        click.echo(f"{key}: {data[key]}")
    rows = [(x["created_at"], x["kind"], x["quantity"], x["value_after"], x["request_id"], x.get("barcode"))
            for x in data["logs"]]  # fmt: skip
    echo_table(("created (UTC)", "kind", "qty", "after", "request id", "barcode"), rows)
