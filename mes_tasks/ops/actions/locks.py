"""Per-work-order Redis locks: the held ones, and taking one from a stuck holder (``locks ...``)."""

from __future__ import annotations

from typing import Any

from mes_tasks.apply.locks import RELEASE_IF_HELD
from mes_tasks.db import redis_errors
from mes_tasks.errors import MesError
from mes_tasks.keys import lock_key
from mes_tasks.ops.status import held_locks
from mes_tasks.ops.stores import Stores
from mes_tasks.validation import check_work_order_id


def list_locks(stores: Stores) -> list[dict[str, Any]]:
    """Locks held now: work order, key, owner token and remaining TTL (ms)."""
    return held_locks(stores.redis, stores.settings.key_prefix)


def lock_holder(stores: Stores, work_order_id: str) -> str:
    """The owner token of the work order's lock.

    Raises:
        MesError: ``NOT_LOCKED``; ValidationError for a malformed id.
    """
    wo = check_work_order_id(work_order_id)
    with redis_errors():
        token = stores.redis.get(lock_key(stores.settings.key_prefix, wo))  # decoded: decode_responses
    if token is None:
        raise MesError(f"no lock is held on {wo}", code="NOT_LOCKED")
    return str(token)


def release_lock(stores: Stores, work_order_id: str, token: str | None = None) -> dict[str, Any]:
    """Delete the work order's lock if ``token`` (default: the current holder's) still holds it.

    Safe: the fence stops the old holder. A token given is the one the caller asked about:
    a lock that changed hands since is not taken.

    Raises:
        MesError: ``NOT_LOCKED``, no lock, or it changed hands meanwhile.
    """
    wo = check_work_order_id(work_order_id)
    token = lock_holder(stores, wo) if token is None else token
    with redis_errors():
        deleted = stores.redis.eval(RELEASE_IF_HELD, 1, lock_key(stores.settings.key_prefix, wo), token)
    if not deleted:
        raise MesError(f"the lock of {wo} changed hands meanwhile; nothing released", code="NOT_LOCKED")
    return {"work_order_id": wo, "released": True, "token": token}
