"""The bounds of the operations' arguments: the CLI's options and the gateway's checks share them."""

from __future__ import annotations

from mes_tasks.errors import ValidationError

DEFAULT_AUDITS = 20  # reports ``audit list`` shows
MAX_AUDITS = 1000
DEFAULT_LOGS = 10  # most recent logs ``workorder show`` shows
MAX_LOGS = 10_000


def check_range(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is a whole number from ``low`` to ``high``.

    Raises:
        ValidationError: ``INVALID_<NAME>`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(
            f"{name} must be a whole number from {low} to {high}, not {value!r}",
            code=f"INVALID_{name.upper()}",
        )
    return value
