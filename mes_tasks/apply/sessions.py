"""The MongoDB sessions a ``workorder`` worker runs its transactions in, so that a successor can end them.

A worker killed inside a transaction leaves it open on the server, with its work order's
document locked, until ``transactionLifetimeLimitSeconds`` (60 s by default): every
update of that work order would wait for it. So the worker records each session id
(lsid) before its first transaction in that session (pymongo reuses a few pooled
sessions, so this is a write or two per worker lifetime), in the Redis hash
``{prefix}sessions`` under its owner id. A worker that takes the ``workorder`` lease
over ends every other owner's sessions with ``killSessions``, which aborts their open
transactions at once, and forgets them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from bson.binary import Binary, UuidRepresentation
from pymongo.client_session import ClientSession

from mes_tasks.apply.owners import owner_id
from mes_tasks.db import Mongo, mongo_errors, redis_errors
from mes_tasks.keys import sessions_key

log = logging.getLogger(__name__)

FIELD_SEP = "|"  # a field is "<owner_id>|<lsid hex>"
# Session ids this process has recorded since it last took the lease: a successor that
# took over meanwhile ended and forgot them, so taking the lease back starts afresh.
_RECORDED: set[str] = set()


def forget_recorded() -> None:
    """Record every session again from now on (this process has just taken the lease)."""
    _RECORDED.clear()


class SessionLog:
    """Records the sessions this process transacts in (one per worker process)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.key = sessions_key(prefix)

    def note(self, session: ClientSession) -> None:
        """Record ``session`` unless already recorded; before its transaction starts.

        Raises:
            RedisUnavailable: not recorded; the caller must not start the transaction.
        """
        lsid = _lsid_hex(session.session_id)
        if lsid in _RECORDED:
            return
        with redis_errors():
            self.client.hset(self.key, f"{owner_id()}{FIELD_SEP}{lsid}", f"{time.time():.0f}")
        _RECORDED.add(lsid)


def end_others(mongo: Mongo, client: redis.Redis, prefix: str, owner: str | None = None) -> int:
    """End (``killSessions``) every recorded session of another process; how many were ended.

    Only the new active ``workorder`` consumer calls this: any other owner's transactions
    are a dead or fenced-out predecessor's. With partitions other workers are alive and
    active: then only ``owner``'s sessions (the partition's dead holder) are ended.
    """
    key = sessions_key(prefix)
    mine = f"{owner_id()}{FIELD_SEP}"
    with redis_errors():
        fields = [f for f in client.hkeys(key) if not str(f).startswith(mine)]
    if owner is not None:
        fields = [f for f in fields if str(f).startswith(f"{owner}{FIELD_SEP}")]
    if not fields:
        return 0
    ids = [{"id": Binary(bytes.fromhex(str(f).rpartition(FIELD_SEP)[2]), 4)} for f in fields]
    with mongo_errors():
        mongo.admin.command("killSessions", ids)
    with redis_errors():
        client.hdel(key, *fields)
    log.warning("ended %d MongoDB session(s) of a previous workorder worker", len(ids))
    return len(ids)


def _lsid_hex(session_id: Any) -> str:
    raw = session_id["id"]
    if isinstance(raw, Binary):
        return bytes(raw).hex()
    return Binary.from_uuid(raw, UuidRepresentation.STANDARD).hex()
