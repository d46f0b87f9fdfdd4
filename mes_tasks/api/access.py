"""Who may call the gateway: bearer tokens with a role, read from the environment or a file.

``MES_API_TOKENS`` holds whitespace-separated ``role:token`` pairs; ``MES_API_TOKENS_FILE``
names a file with one pair a line (``#`` starts a comment). A token is never taken from a
command line, never logged, and compared in constant time. ``producer`` may submit and read
work orders and updates; ``operator`` may do everything. ``MES_API_AUTH=proxy`` says that an
authenticating proxy stands in front: then the gateway starts without tokens and lets every
request through as ``operator``. Without tokens and without that, it refuses to start.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mes_tasks.errors import ConfigurationError

PRODUCER, OPERATOR = "producer", "operator"
ROLES = (PRODUCER, OPERATOR)
MIN_TOKEN_LEN = 16
TOKENS_ENV, TOKENS_FILE_ENV, AUTH_ENV = "MES_API_TOKENS", "MES_API_TOKENS_FILE", "MES_API_AUTH"
PROXY = "proxy"  # MES_API_AUTH=proxy: an authenticating proxy in front; no tokens needed


@dataclass(frozen=True)
class Access:
    """The tokens the gateway accepts, each with its role; ``open`` behind an authenticating proxy."""

    tokens: tuple[tuple[str, str], ...]  # (role, token)
    open: bool = False

    def role_of(self, token: str | None) -> str | None:
        """The role of a presented token, or None; every known token is compared (constant time)."""
        if self.open:
            return OPERATOR
        found = None
        given = (token or "").encode()
        for role, known in self.tokens:
            if hmac.compare_digest(given, known.encode()) and token:
                found = role
        return found

    def __repr__(self) -> str:  # never the tokens
        return f"Access(roles={sorted({r for r, _ in self.tokens})}, open={self.open})"


def may(role: str | None, needed: str) -> bool:
    """Whether ``role`` may call a route that needs ``needed``."""
    return role == OPERATOR or (role == PRODUCER and needed == PRODUCER)


def access_from_env(environ: Mapping[str, str] | None = None) -> Access:
    """The gateway's access, from the environment.

    Raises:
        ConfigurationError: a malformed pair, an unknown role, a short token, an unreadable
            file, or no token at all without ``MES_API_AUTH=proxy``. The message names the
            pair by its place and role, never the token.
    """
    env = os.environ if environ is None else environ
    auth = env.get(AUTH_ENV, "").strip().lower()
    if auth not in ("", "token", PROXY):
        raise ConfigurationError(f"{AUTH_ENV} must be 'token' (the default) or '{PROXY}', not {auth!r}")
    pairs = parse_pairs(env.get(TOKENS_ENV, ""), TOKENS_ENV)
    path = env.get(TOKENS_FILE_ENV, "").strip()
    if path:
        pairs += parse_pairs(_read(path), f"{TOKENS_FILE_ENV} ({path})")
    if not pairs and auth != PROXY:
        raise ConfigurationError(
            f"the HTTP gateway needs at least one token: set {TOKENS_ENV}='producer:<token> "
            f"operator:<token>' or {TOKENS_FILE_ENV}=<file>, or {AUTH_ENV}={PROXY} behind an "
            "authenticating proxy"
        )
    return Access(tuple(pairs), open=auth == PROXY)


def parse_pairs(text: str, where: str) -> list[tuple[str, str]]:
    """``role:token`` pairs separated by whitespace (a ``#`` comment runs to the end of its line)."""
    words = [w for line in text.splitlines() for w in line.split("#", 1)[0].split()]
    pairs = []
    for n, word in enumerate(words, 1):
        role, sep, token = word.partition(":")
        if not sep or role not in ROLES:
            raise ConfigurationError(
                f"{where}: pair {n} must be role:token with a role of {', '.join(ROLES)}"
            )
        if len(token) < MIN_TOKEN_LEN:
            raise ConfigurationError(
                f"{where}: the {role} token of pair {n} has fewer than {MIN_TOKEN_LEN} characters; "
                "use a long random one (python -c 'import secrets; print(secrets.token_hex(24))')"
            )
        pairs.append((role, token))
    return pairs


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{TOKENS_FILE_ENV}: cannot read {path}: {type(exc).__name__}") from None
