"""``celery -A mes_tasks locks list|release``."""

from __future__ import annotations

import click

from mes_tasks.cli.common import ConsoleGroup, confirm, echo_json, echo_table, json_option, stores
from mes_tasks.ops import actions
from mes_tasks.validation import check_work_order_id


@click.group(cls=ConsoleGroup)
def locks() -> None:
    """Per-work-order Redis locks."""


@locks.command("list")
@json_option
def list_locks(as_json: bool) -> None:
    """Locks held now, with owner token and remaining TTL."""
    data = actions.list_locks(stores())
    if as_json:
        echo_json(data)
        return
    echo_table(
        ("work order", "owner token", "ttl ms"), [(h["work_order_id"], h["token"], h["ttl_ms"]) for h in data]
    )


@locks.command("release")
@click.argument("work_order_id")
@click.option(
    "--yes", "-y", "--force", "yes", is_flag=True, help="Do not ask: you take the lock from its holder."
)
@json_option
def release(work_order_id: str, yes: bool, as_json: bool) -> None:
    """Delete a work order's lock (a stuck holder's). Safe: the fence stops the old holder."""
    wo = check_work_order_id(work_order_id)  # before connecting: a typo is told as such
    conn = stores()
    token = actions.lock_holder(conn, wo)
    confirm(f"Take the lock of {wo} from {token!s}? A live holder will notice and retry", yes)
    # only the token asked about: a lock that changed hands meanwhile is not taken
    data = actions.release_lock(conn, wo, token)
    if as_json:
        echo_json(data)
        return
    click.echo(f"released the lock of {wo} (owner token {token!s}); a live holder will retry")
