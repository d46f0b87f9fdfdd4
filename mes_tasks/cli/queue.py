"""``celery -A mes_tasks queue status|pause|resume|purge``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from mes_tasks.cli.common import ConsoleGroup, confirm, echo_json, json_option, stores, yes_option
from mes_tasks.errors import ValidationError
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.ops import actions
from mes_tasks.partitions import index_of


@click.group(cls=ConsoleGroup)
def queue() -> None:
    """The workorder queue: how long, who consumes it, pause, resume and purge."""


@queue.command("status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Waiting and in-flight messages, consumers, failed updates, locks, last audit."""
    data = actions.queue_status(ctx.obj.app, stores())
    if as_json:
        echo_json(data)
        return
    for name, q in data["queues"].items():
        who = ", ".join(q["consumers"]) or "NO CONSUMER"
        click.echo(f"queue {name}: {q['waiting']} waiting; consumed by {who}")
    if len(data["partitions"]) > 1:
        for p in data["partitions"]:
            age = "" if p["oldest_age_s"] is None else f", oldest {p['oldest_age_s']:g}s"
            paused = ", PAUSED" if p["paused"] else ""
            click.echo(f"  {p['queue']}: {p['waiting']} waiting, {p['in_flight']} in flight{age}; "
                       f"holder {p['holder'] or 'NONE'}{paused}")  # fmt: skip
    click.echo(f"in flight (unacknowledged): {data['unacked']}")
    for name, record in data["pauses"].items():
        click.echo(f"PAUSED {_pause_scope(name)} since {record['at']} ({_resume_command(name)} ends it)")
    if data["unrecorded"]:
        click.echo(f"submissions queued without an outbox record (MongoDB was down): {data['unrecorded']}")
    click.echo(f"failed updates open: {data['failed_open']}")
    pending = data["outbox"]
    click.echo(
        f"outbox: {pending['spooled']} spooled (broker was down), {pending['sent']} sent awaiting an outcome"
    )
    click.echo(f"locks held: {data['locks_held']}")
    click.echo(f"last audit: {_audit_line(data['last_audit'])}")


partition_option = click.option(
    "--partition", "partition", type=int, default=None, metavar="I",
    help="Only partition I (workorder.I) when MES_PARTITIONS > 1; default: every workorder queue.",
)  # fmt: skip


@queue.command("pause")
@partition_option
@json_option
@click.pass_context
def pause_cmd(ctx: click.Context, partition: int | None, as_json: bool) -> None:
    """Stop consuming workorder until resumed; messages wait in the queue, nothing is lost.

    The pause holds across worker restarts and take-overs.
    """
    with _partition_usage():
        data = actions.pause_queue(ctx.obj.app, stores(), partition)
    if as_json:
        echo_json(data)
        return
    workers = data["stopped_on"]
    where = f"stopped the consumer on {', '.join(workers)}" if workers else "no worker was consuming it"
    click.echo(f"paused {data['queue']} ({where}); the in-flight update, if any, completes")


@queue.command("resume")
@partition_option
@json_option
@click.pass_context
def resume_cmd(ctx: click.Context, partition: int | None, as_json: bool) -> None:
    """End the pauses: without --partition every one (of all queues and of each), else that queue's own.

    Names the pauses it ended; the active workorder workers consume again.
    """
    with _partition_usage():
        data = actions.resume_queue(ctx.obj.app, stores(), partition)
    if as_json:
        echo_json(data)
        return
    workers = data["consumed_by"]
    scope = "; ".join(f"the pause of {_pause_scope(name)}" for name in data["ended"])
    who = (
        f"consumed by {', '.join(workers)}"
        if workers
        else "no worker consumes it yet (is a workorder worker running?)"
    )
    click.echo(f"resumed {data['queue']}: ended {scope}; {who}")


@queue.command("purge")
@partition_option
@yes_option
@json_option
@click.pass_context
def purge_cmd(ctx: click.Context, partition: int | None, yes: bool, as_json: bool) -> None:
    """Drop every waiting workorder update for good, with its outbox record so it is not re-sent.

    Unlike `celery purge -Q workorder`, whose purged updates the outbox relay would send
    again. Delivered and in-flight messages are not touched; pause the queue first to
    keep the worker from taking more.
    """
    conn = stores()  # connects MongoDB for the outbox
    with _partition_usage():
        target = actions.queue_target(conn, partition)
    confirm(f"Drop every waiting update of {target}? They will never be applied", yes)
    data = actions.purge_queue(ctx.obj.app, conn, partition)
    if as_json:
        echo_json(data)
        return
    purged, removed = data["purged"], data["outbox_removed"]
    click.echo(f"purged {purged} waiting update(s) from {target}; {removed} outbox record(s) removed")


@contextmanager
def _partition_usage() -> Iterator[None]:
    """An ``--partition`` out of range is a usage error here, as click's own are (``USAGE``)."""
    try:
        yield
    except ValidationError as exc:
        if exc.code != "INVALID_PARTITION":
            raise
        raise click.UsageError(exc.message) from None


def _pause_scope(queue: str) -> str:
    return "every workorder queue" if queue == WORKORDER_QUEUE else queue


def _resume_command(queue: str) -> str:
    index = index_of(queue)
    return "queue resume" if index is None else f"queue resume --partition {index}"


def _audit_line(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "never"
    repaired = ", repaired" if audit["repaired"] else ""
    return f"{audit['started_at']} ({audit['finding_count']} findings{repaired}) id {audit['id']}"
