"""``celery -A mes_tasks queue status|pause|resume|purge``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import redis
from celery import Celery

from mes_tasks import broker, outbox
from mes_tasks.cli.common import ConsoleGroup, confirm, echo_json, json_option, stores, yes_option
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.settings import Settings
from mes_tasks.status import pause, queue_status, resume


@click.group(cls=ConsoleGroup)
def queue() -> None:
    """The workorder queue: how long, who consumes it, pause, resume and purge."""


@queue.command("status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Waiting and in-flight messages, consumers, failed updates, locks, last audit."""
    conn = stores()
    data = queue_status(ctx.obj.app, conn.redis, conn.settings)
    if as_json:
        echo_json(data)
        return
    for name, q in data["queues"].items():
        who = ", ".join(q["consumers"]) or "NO CONSUMER"
        click.echo(f"queue {name}: {q['waiting']} waiting; consumed by {who}")
    click.echo(f"in flight (unacknowledged): {data['unacked']}")
    if data["paused"]:
        click.echo(f"PAUSED since {data['paused']['at']} (queue resume ends it)")
    if data["unrecorded"]:
        click.echo(f"submissions queued without an outbox record (MongoDB was down): {data['unrecorded']}")
    click.echo(f"failed updates open: {data['failed_open']}")
    pending = data["outbox"]
    click.echo(
        f"outbox: {pending['spooled']} spooled (broker was down), {pending['sent']} sent awaiting an outcome"
    )
    click.echo(f"locks held: {data['locks_held']}")
    click.echo(f"last audit: {_audit_line(data['last_audit'])}")


@queue.command("pause")
@json_option
@click.pass_context
def pause_cmd(ctx: click.Context, as_json: bool) -> None:
    """Stop consuming workorder until resumed; messages wait in the queue, nothing is lost.

    The pause holds across worker restarts and take-overs.
    """
    workers = _on_workers(ctx, pause)
    if as_json:
        echo_json({"paused": True, "stopped_on": workers})
        return
    where = f"stopped the consumer on {', '.join(workers)}" if workers else "no worker was consuming it"
    click.echo(f"paused workorder ({where}); the in-flight update, if any, completes")


@queue.command("resume")
@json_option
@click.pass_context
def resume_cmd(ctx: click.Context, as_json: bool) -> None:
    """End the pause: the active workorder worker consumes again."""
    workers = _on_workers(ctx, resume)
    if as_json:
        echo_json({"paused": False, "consumed_by": workers})
    elif workers:
        click.echo(f"resumed workorder; consumed by {', '.join(workers)}")
    else:
        click.echo("resumed workorder; no worker consumes it yet (is a workorder worker running?)")


@queue.command("purge")
@yes_option
@json_option
@click.pass_context
def purge_cmd(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Drop every waiting workorder update for good, with its outbox record so it is not re-sent.

    Unlike `celery purge -Q workorder`, whose purged updates the outbox relay would send
    again. Delivered and in-flight messages are not touched; pause the queue first to
    keep the worker from taking more.
    """
    confirm("Drop every waiting workorder update? They will never be applied", yes)
    stores()  # connects MongoDB for the outbox
    with ctx.obj.app.connection_for_write() as conn:
        job_ids = broker.take_waiting(conn.default_channel, WORKORDER_QUEUE)
    forgotten = outbox.forget(job_ids)
    if as_json:
        echo_json({"purged": len(job_ids), "outbox_removed": forgotten, "job_ids": job_ids})
        return
    click.echo(
        f"purged {len(job_ids)} waiting update(s) from workorder; {forgotten} outbox record(s) removed"
    )


def _on_workers(
    ctx: click.Context, action: Callable[[Celery, redis.Redis, Settings], list[str]]
) -> list[str]:
    conn = stores()
    return action(ctx.obj.app, conn.redis, conn.settings)


def _audit_line(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "never"
    repaired = ", repaired" if audit["repaired"] else ""
    return f"{audit['started_at']} ({audit['finding_count']} findings{repaired}) id {audit['id']}"
