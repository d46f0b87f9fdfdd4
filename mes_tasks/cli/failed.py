"""``celery -A mes_tasks failed list|show|retry|discard``: the dead-letter store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from mes_tasks.apply.deadletter import discard_failed, find_failed, get_failed, retry_failed
from mes_tasks.cli.common import (
    ConsoleGroup,
    confirm,
    echo_json,
    echo_table,
    json_option,
    stores,
    yes_option,
)
from mes_tasks.errors import ValidationError
from mes_tasks.models import FAILED_STATUSES, FailedUpdate, QuantityLog
from mes_tasks.tasks import update_quantity

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
    records = find_failed(code=code, work_order_id=work_order, status=None if status == "all" else status)
    if as_json:
        echo_json([record_dict(r) for r in records])
        return
    rows = [(r.id, r.request_id, r.work_order_id, r.error_code, r.attempts, r.status,
             f"{r.last_failed_at:%Y-%m-%d %H:%M:%S}") for r in records]  # fmt: skip
    echo_table(("id", "request id", "work order", "code", "attempts", "status", "last failure (UTC)"), rows)


@failed.command("show")
@click.argument("record_id")
@json_option
def show(record_id: str, as_json: bool) -> None:
    """One dead letter with its payload and history."""
    stores()
    data = record_dict(get_failed(record_id), full=True)
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

    def send(args: list[Any], kwargs: dict[str, Any]) -> str:
        try:
            return str(update_quantity.apply_async(args, kwargs).id)
        except TypeError as exc:  # an UNPUBLISHABLE entry: its payload can never be sent
            raise ValidationError(f"cannot be retried: {exc}", code="UNRETRYABLE") from None

    records = _select(record_ids, every, code)
    if every:  # records that kept no full payload cannot be retried: --all passes over them
        unsendable = [r for r in records if r.payload_truncated or not r.payload]
        for r in unsendable:
            click.echo(f"skipped {r.id} (request {r.request_id}): no full payload kept", err=True)
        records = [r for r in records if r not in unsendable]
    done: list[dict[str, Any]] = []
    for r in records:
        was, applied = r.status, _applied(r)
        done.append({**_brief(r), "was": was, "applied_before": applied, "task_id": retry_failed(r, send)})
    if as_json:
        echo_json({"re_sent": done})
        return
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
    records = _select(record_ids, every, code)
    if records:
        which = f"every open dead letter{f' of code {code}' if code else ''}" if every else "these"
        confirm(f"Discard {len(records)} dead letter(s), {which}? Their updates will not be applied", yes)
    done: list[dict[str, Any]] = []
    already: list[dict[str, Any]] = []
    for record in records:
        (done if discard_failed(record) else already).append(_brief(record))
    if as_json:
        echo_json({"discarded": done, "already_discarded": already})
        return
    for item in done:
        click.echo(f"discarded {item['id']} (request {item['request_id']})")
    for item in already:
        click.echo(f"already discarded {item['id']} (request {item['request_id']}); unchanged")
    click.echo(f"{len(done)} discarded" + (f", {len(already)} already discarded" if already else ""))


def _select(record_ids: tuple[str, ...], every: bool, code: str | None) -> list[FailedUpdate]:
    if bool(record_ids) == every:
        raise ValidationError("give record ids or --all, not both and not neither", code="USAGE")
    if code and not every:
        raise ValidationError("--code only goes with --all", code="USAGE")
    stores()
    if every:
        return find_failed(code=code)
    return [get_failed(i) for i in record_ids]


def _brief(record: FailedUpdate) -> dict[str, Any]:
    return {"id": str(record.id), "request_id": record.request_id}


def _applied(record: FailedUpdate) -> bool:
    return bool(QuantityLog.objects(request_id=record.request_id).count() > 0)


def _note(item: dict[str, Any]) -> str:
    """What the operator should know about a re-send of a record that was not simply open."""
    notes = [] if item["was"] == "open" else [f"it was {item['was']}"]
    if item["applied_before"]:
        notes.append("its update is applied already, so this re-send counts nothing")
    return f" ({'; '.join(notes)})" if notes else ""


def record_dict(record: FailedUpdate, full: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(record.id),
        "request_id": record.request_id,
        "work_order_id": record.work_order_id,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "attempts": record.attempts,
        "status": record.status,
        "first_failed_at": record.first_failed_at.isoformat(),
        "last_failed_at": record.last_failed_at.isoformat(),
    }
    if full:
        data["task_name"] = record.task_name
        data["task_id"] = record.task_id
        data["payload"] = record.payload
        data["applied_since"] = _applied(record)
        data["history"] = [{**e, "at": e["at"].isoformat()} for e in record.history]
    return data
