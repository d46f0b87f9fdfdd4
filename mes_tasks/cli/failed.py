"""``celery -A mes_tasks failed list|show|retry|discard``: the dead-letter store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from mes_tasks.cli.common import (
    ConsoleGroup,
    confirm,
    echo_json,
    echo_table,
    json_option,
    stores,
    yes_option,
)
from mes_tasks.models import FAILED_STATUSES, FailedUpdate
from mes_tasks.ops import actions

F = TypeVar("F", bound=Callable[..., Any])


def selection(func: F) -> F:
    """The record ids, or ``--all`` with an optional ``--code``."""
    func = click.option("--code", help="With --all: only this error code.")(func)
    func = click.option(
        "--all", "every", is_flag=True, help="Every open dead letter (with --code: of that code)."
    )(func)
    return click.argument("record_ids", nargs=-1)(func)


@click.group(cls=ConsoleGroup)
def failed() -> None:
    """Updates that could not be applied: list, inspect, retry, discard."""


@failed.command("list")
@click.option("--code", envvar="MES_FAILED_CODE", help="Only this error code.")
@click.option("--work-order", envvar="MES_FAILED_WORK_ORDER", metavar="ID", help="Only this work order.")
@click.option("--status", type=click.Choice([*FAILED_STATUSES, "all"]), default="open", show_default=True)
@json_option
def list_failed(code: str | None, work_order: str | None, status: str, as_json: bool) -> None:
    """Dead letters, newest failure first."""
    stores()
    data = actions.list_failed(code, work_order, status)
    if as_json:
        echo_json(data)
        return
    rows = [(r["id"], r["request_id"], r["work_order_id"], r["error_code"], r["attempts"], r["status"],
             f"{datetime.fromisoformat(r['last_failed_at']):%Y-%m-%d %H:%M:%S}") for r in data]  # fmt: skip
    echo_table(("id", "request id", "work order", "code", "attempts", "status", "last failure (UTC)"), rows)


@failed.command("show")
@click.argument("record_id")
@json_option
def show(record_id: str, as_json: bool) -> None:
    """One dead letter with its payload and history."""
    stores()
    data = actions.show_failed(record_id)
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        if key != "history":
            click.echo(f"{key}: {value}")
    for event in data["history"]:
        click.echo(
            f"  {event['at']}  {event['event']}  {event.get('code', '')} {event.get('message', '')}".rstrip()
        )


@failed.command("retry")
@selection
@json_option
def retry(record_ids: tuple[str, ...], every: bool, code: str | None, as_json: bool) -> None:
    """Re-send with the original request id: a retried update can never count twice.

    Not destructive, so it does not ask, with --all neither.
    """
    actions.check_selection(record_ids, every, code)  # before connecting: a usage error is told as such
    stores()
    data = actions.retry_failed_updates(record_ids, every, code, on_skip=_skipped)
    if as_json:
        echo_json(data)
        return
    done = data["re_sent"]
    for item in done:
        task = f"as task {item['task_id']}{_note(item)}"
        click.echo(f"re-sent {item['id']} (request {item['request_id']}) {task}")
    click.echo(f"{len(done)} re-sent")


@failed.command("discard")
@selection
@yes_option
@json_option
def discard(record_ids: tuple[str, ...], every: bool, code: str | None, yes: bool, as_json: bool) -> None:
    """Give up on dead letters; they stay listed with status discarded. Asks unless --yes."""
    actions.check_selection(record_ids, every, code)  # before connecting: a usage error is told as such
    stores()
    records = actions.select_failed(record_ids, every, code)
    if records:
        which = f"every open dead letter{f' of code {code}' if code else ''}" if every else "these"
        confirm(f"Discard {len(records)} dead letter(s), {which}? Their updates will not be applied", yes)
    data = actions.discard_records(records)  # those asked about, not a new selection
    if as_json:
        echo_json(data)
        return
    done, already = data["discarded"], data["already_discarded"]
    for item in done:
        click.echo(f"discarded {item['id']} (request {item['request_id']})")
    for item in already:
        click.echo(f"already discarded {item['id']} (request {item['request_id']}); unchanged")
    click.echo(f"{len(done)} discarded" + (f", {len(already)} already discarded" if already else ""))


def _skipped(record: FailedUpdate) -> None:
    click.echo(f"skipped {record.id} (request {record.request_id}): no full payload kept", err=True)


def _note(item: dict[str, Any]) -> str:
    """What the operator should know about a re-send of a record that was not simply open."""
    notes = [] if item["was"] == "open" else [f"it was {item['was']}"]
    if item["applied_before"]:
        notes.append("its update is applied already, so this re-send counts nothing")
    return f" ({'; '.join(notes)})" if notes else ""
