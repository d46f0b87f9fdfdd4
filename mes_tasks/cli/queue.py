"""``celery -A mes_tasks queue status|pause|resume``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import redis
from celery import Celery

from mes_tasks.cli.common import echo_json, handle_errors, json_option, ledger
from mes_tasks.settings import Settings
from mes_tasks.status import pause, queue_status, resume


@click.group()
def queue() -> None:
    """The workorder queue: how long, who consumes it, pause and resume."""


@queue.command("status")
@json_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Waiting and in-flight messages, consumers, failed updates, locks, last audit."""
    the_ledger = ledger()
    data = queue_status(ctx.obj.app, the_ledger.redis, the_ledger.settings)
    if as_json:
        echo_json(data)
        return
    for name, q in data["queues"].items():
        who = ", ".join(q["consumers"]) or "NO CONSUMER"
        click.echo(f"queue {name}: {q['waiting']} waiting; consumed by {who}")
    click.echo(f"in flight (unacknowledged): {data['unacked']}")
    if data["paused_workers"]:
        click.echo(f"paused: {', '.join(data['paused_workers'])}")
    click.echo(f"failed updates open: {data['failed_open']}")
    click.echo(f"locks held: {data['locks_held']}")
    click.echo(f"last audit: {_audit_line(data['last_audit'])}")


@queue.command("pause")
@click.pass_context
@handle_errors
def pause_cmd(ctx: click.Context) -> None:
    """Stop consuming workorder; messages wait in the queue, nothing is lost."""
    workers = _on_workers(ctx, pause)
    click.echo(f"paused workorder on {', '.join(workers)}; the in-flight update, if any, completes")


@queue.command("resume")
@click.pass_context
@handle_errors
def resume_cmd(ctx: click.Context) -> None:
    """Consume workorder again, on the workers that were paused."""
    click.echo(f"resumed workorder on {', '.join(_on_workers(ctx, resume))}")


def _on_workers(
    ctx: click.Context, action: Callable[[Celery, redis.Redis, Settings], list[str]]
) -> list[str]:
    the_ledger = ledger()
    return action(ctx.obj.app, the_ledger.redis, the_ledger.settings)


def _audit_line(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "never"
    repaired = ", repaired" if audit["repaired"] else ""
    return f"{audit['started_at']} ({audit['finding_count']} findings{repaired}) id {audit['id']}"
