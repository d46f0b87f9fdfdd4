"""``celery -A mes_tasks locks list|release``."""

from __future__ import annotations

import click

from mes_tasks.apply.locks import RELEASE_IF_HELD
from mes_tasks.cli.common import ConsoleGroup, confirm, echo_json, echo_table, json_option, stores
from mes_tasks.db import redis_errors
from mes_tasks.errors import MesError
from mes_tasks.keys import lock_key
from mes_tasks.ops.status import held_locks
from mes_tasks.validation import check_work_order_id


@click.group(cls=ConsoleGroup)
def locks() -> None:
    """Per-work-order Redis locks."""


@locks.command("list")
@json_option
def list_locks(as_json: bool) -> None:
    """Locks held now, with owner token and remaining TTL."""
    conn = stores()
    held = held_locks(conn.redis, conn.settings.key_prefix)
    if as_json:
        echo_json(held)
        return
    echo_table(
        ("work order", "owner token", "ttl ms"), [(h["work_order_id"], h["token"], h["ttl_ms"]) for h in held]
    )


@locks.command("release")
@click.argument("work_order_id")
@click.option(
    "--yes", "-y", "--force", "yes", is_flag=True, help="Do not ask: you take the lock from its holder."
)
@json_option
def release(work_order_id: str, yes: bool, as_json: bool) -> None:
    """Delete a work order's lock (a stuck holder's). Safe: the fence stops the old holder."""
    wo = check_work_order_id(work_order_id)
    conn = stores()
    key = lock_key(conn.settings.key_prefix, wo)
    with redis_errors():
        token = conn.redis.get(key)  # decoded: the client uses decode_responses
    if token is None:
        raise MesError(f"no lock is held on {wo}", code="NOT_LOCKED")
    confirm(f"Take the lock of {wo} from {token!s}? A live holder will notice and retry", yes)
    with redis_errors():  # only the token asked about: a new holder's lock is not taken
        deleted = conn.redis.eval(RELEASE_IF_HELD, 1, key, token)
    if not deleted:
        raise MesError(f"the lock of {wo} changed hands meanwhile; nothing released", code="NOT_LOCKED")
    if as_json:
        echo_json({"work_order_id": wo, "released": True, "token": token})
        return
    click.echo(f"released the lock of {wo} (owner token {token!s}); a live holder will retry")
