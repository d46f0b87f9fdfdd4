"""``celery -A mes_tasks doctor``: a pre-flight of the deployment."""

from __future__ import annotations

import sys

import click

from mes_tasks.cli.common import ConsoleCommand, echo_json, json_option
from mes_tasks.ops import actions
from mes_tasks.settings import get_settings

COLOURS = {"OK": "green", "INFO": "cyan", "WARN": "yellow", "FAIL": "red"}


@click.command(cls=ConsoleCommand)
@json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check Redis, MongoDB, timing, consumers, audit and Flower; exit 1 on any FAIL."""
    data = actions.doctor_report(ctx.obj.app, get_settings())
    if as_json:
        echo_json(data)
    else:
        for check in data["checks"]:
            status = click.style(f"{check['status']:<4}", fg=COLOURS[check["status"]])
            fix = f"  -> {check['fix']}" if check["fix"] else ""
            click.echo(f"{status} {check['name']}: {check['detail']}{fix}")
    sys.exit(0 if data["ok"] else 1)
