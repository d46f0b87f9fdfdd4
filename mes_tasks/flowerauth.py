"""Flower's basic-auth credentials, checked before Flower misreads them.

Flower (through tornado's options) splits ``FLOWER_BASIC_AUTH`` and ``--basic-auth`` at
every ``,`` into ``user:password`` entries and compares each whole entry with what the
browser sends, nothing stripped. A password with a ``,`` is cut in two: the full
password is refused and a fragment is let in.
"""

from __future__ import annotations

from mes_tasks.errors import ConfigurationError

MIN_PASSWORD_LEN = 8
SEPARATOR = ","
COMMA_IN_PASSWORD = (
    "Flower splits its user:password entries at every ',', so a password containing ',' "
    "is never accepted whole; choose a password without ','"
)


def check_basic_auth(value: str, name: str = "FLOWER_BASIC_AUTH") -> None:
    """Refuse a basic-auth value that Flower would not read as meant; never shows a password.

    Every ``,``-separated entry must be ``user:password``, with a user and a password of
    at least ``MIN_PASSWORD_LEN`` characters.

    Raises:
        ConfigurationError: naming ``name``, the entry or its user, and what to do.
    """
    entries = value.split(SEPARATOR)
    for n, entry in enumerate(entries, 1):
        if ":" not in entry:
            raise ConfigurationError(f"{name}: {_no_colon(entries, n)}")
    for entry in entries:
        user, _, password = entry.partition(":")
        problem = _user_problem(user) or _password_problem(user, password)
        if problem:
            raise ConfigurationError(f"{name}: {problem}")


def basic_auth(user: str, password: str, user_name: str, password_name: str) -> str:
    """The ``user:password`` value of one user, refusing what Flower would split or misread.

    Args:
        user_name, password_name: where the two come from, for the error messages.

    Raises:
        ConfigurationError: the user or the password cannot be one entry.
    """
    problem = _user_problem(user) or (f"user {user!r} contains ':'; choose another" if ":" in user else "")
    if problem:
        raise ConfigurationError(f"{user_name}: {problem}")
    problem = COMMA_IN_PASSWORD if SEPARATOR in password else _password_problem(user, password)
    if problem:
        raise ConfigurationError(f"{password_name}: {problem}")
    return f"{user}:{password}"


def _user_problem(user: str) -> str:
    if not user:
        return "an entry has no user before ':'; write user:password"
    if SEPARATOR in user:
        return f"user {user!r} contains ','; choose another"
    if user != user.strip():
        return f"user {user!r} starts or ends with a space, which Flower keeps; remove it"
    return ""


def _password_problem(user: str, password: str) -> str:
    if len(password) < MIN_PASSWORD_LEN:
        return (
            f"the password of user {user!r} has fewer than {MIN_PASSWORD_LEN} characters; choose a longer one"
        )
    return ""


def _no_colon(entries: list[str], n: int) -> str:
    """Why entry ``n`` (from 1), which has no ':', is there: most often a password cut at a ','."""
    where = f"entry {n} of {len(entries)} (split at ',')"
    if not entries[n - 1]:
        return f"{where} is empty; remove the extra ','"
    if n == 1:
        return f"{where} has no ':'; write user:password"
    user = entries[n - 2].partition(":")[0]
    return f"{where} has no ':': the password of user {user!r} contains ','. {COMMA_IN_PASSWORD}"
