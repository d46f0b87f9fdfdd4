"""``celery -A mes_tasks doctor``: a pre-flight of the deployment."""

from __future__ import annotations

import sys

import click

from mes_tasks.cli.common import ConsoleCommand, echo_json, json_option
from mes_tasks.ops.doctor import FAIL, Context, run_checks, summary
from mes_tasks.settings import get_settings

COLOURS = {"OK": "green", "INFO": "cyan", "WARN": "yellow", "FAIL": "red"}


@click.command(cls=ConsoleCommand)
@json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check Redis, MongoDB, timing, consumers, audit and Flower; exit 1 on any FAIL."""
    results = run_checks(Context(get_settings(), ctx.obj.app))
    if as_json:
        echo_json(summary(results))
    else:
        for check in results:
            status = click.style(f"{check.status:<4}", fg=COLOURS[check.status])
            fix = f"  -> {check.fix}" if check.fix else ""
            click.echo(f"{status} {check.name}: {check.detail}{fix}")
    sys.exit(1 if any(c.status == FAIL for c in results) else 0)
