"""Owner ids (``host:pid:tag``) in lock and lease tokens, and whether their process still runs."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any

TOKEN_SEP = "/"  # a token is "<owner_id>/<random>"
_OWNER: dict[int, str] = {}


def owner_id() -> str:
    """This process in lock tokens: host, pid and a random tag (a new one after a fork)."""
    pid = os.getpid()
    if pid not in _OWNER:
        _OWNER[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(3)}"
    return _OWNER[pid]


def holder_is_dead(token: str) -> bool:
    """Whether a token's owner (``host:pid:tag``) is a process of this host that has ended.

    The same pid with another tag is a previous incarnation (a container restarted with
    the same pid); a pid that was reused by an unrelated process only costs the wait for
    the lease to expire.
    """
    owner = owner_of(token)
    host, _, pid = owner.rpartition(":")[0].rpartition(":")  # "host:pid:tag"
    if not host or not pid.isdigit() or host != socket.gethostname() or owner == owner_id():
        return False
    return int(pid) == os.getpid() or not _running(int(pid))


def owner_of(token: Any) -> str:
    """The owner id of a lock or lease token (``<owner id>/<random>``), or of an owner id."""
    return str(token).split(TOKEN_SEP, 1)[0]


def text(value: Any) -> str:
    """An owner id, token or delivery tag read from Redis, as str: bytes from a non-decoding client."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # a zombie has ended
