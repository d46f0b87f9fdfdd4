"""``celery -A mes_tasks locks list|release``."""

from __future__ import annotations

import click

from mes_tasks.cli.common import echo_json, echo_table, handle_errors, json_option, ledger
from mes_tasks.db import redis_errors
from mes_tasks.errors import MesError, ValidationError
from mes_tasks.keys import lock_key
from mes_tasks.status import held_locks
from mes_tasks.validation import check_work_order_id


@click.group()
def locks() -> None:
    """Per-work-order Redis locks."""


@locks.command("list")
@json_option
@handle_errors
def list_locks(as_json: bool) -> None:
    """Locks held now, with owner token and remaining TTL."""
    the_ledger = ledger()
    held = held_locks(the_ledger.redis, the_ledger.settings.key_prefix)
    if as_json:
        echo_json(held)
        return
    echo_table(
        ("work order", "owner token", "ttl ms"), [(h["work_order_id"], h["token"], h["ttl_ms"]) for h in held]
    )


@locks.command("release")
@click.argument("work_order_id")
@click.option("--force", is_flag=True, help="Required: you are taking a lock from its holder.")
@handle_errors
def release(work_order_id: str, force: bool) -> None:
    """Delete a work order's lock (a stuck holder's). Safe: the fence stops the old holder."""
    wo = check_work_order_id(work_order_id)
    if not force:
        raise ValidationError(
            f"refusing to release the lock of {wo} without --force; its holder, if alive, will "
            "notice and retry (the fence keeps the count exact)",
            code="FORCE_REQUIRED",
        )
    the_ledger = ledger()
    key = lock_key(the_ledger.settings.key_prefix, wo)
    with redis_errors():
        token = the_ledger.redis.get(key)  # decoded: the client uses decode_responses
        deleted = the_ledger.redis.delete(key) if token is not None else 0
    if not deleted:
        raise MesError(f"no lock is held on {wo}", code="NOT_LOCKED")
    click.echo(f"released the lock of {wo} (owner token {token!s}); a live holder will retry")
