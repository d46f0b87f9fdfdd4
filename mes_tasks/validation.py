"""Input validation, run before anything reaches MongoDB (producer side and in the task)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mes_tasks.errors import ValidationError
from mes_tasks.models import CONTEXT_FIELDS, KINDS

MAX_WORK_ORDER_ID_LEN = 128
MAX_REQUEST_ID_LEN = 256
MAX_CONTEXT_VALUE_LEN = 512
MAX_ABS_QUANTITY = 1_000_000
WORK_ORDER_ID_FORBIDDEN = ("$", "\x00")
REQUEST_ID_FORBIDDEN = ("\x00",)  # barcodes (Code 39) may carry '$'; it is only ever a value


@dataclass(frozen=True)
class UpdateRequest:
    """A validated quantity update."""

    work_order_id: str
    kind: str
    quantity: int
    request_id: str | None = None
    context: dict[str, str] = field(default_factory=dict)


def validate_update(
    work_order_id: Any,
    kind: Any,
    quantity: Any,
    request_id: Any = None,
    context: Any = None,
) -> UpdateRequest:
    """Check every field of an update.

    Raises:
        ValidationError: with ``code`` naming what is wrong.
    """
    return UpdateRequest(
        work_order_id=check_work_order_id(work_order_id),
        kind=_kind(kind),
        quantity=_quantity(quantity),
        request_id=None if request_id is None else _request_id(request_id),
        context=_context(context),
    )


def check_work_order_id(value: Any) -> str:
    """A valid work order id, or ValidationError."""
    if value is None or value == "":
        raise ValidationError("work_order_id is required", code="MISSING_WORK_ORDER_ID")
    _check_id("work_order_id", value, MAX_WORK_ORDER_ID_LEN, WORK_ORDER_ID_FORBIDDEN)
    return str(value)


def _request_id(value: Any) -> str:
    _check_id("request_id", value, MAX_REQUEST_ID_LEN, REQUEST_ID_FORBIDDEN)
    return str(value)


def _check_id(name: str, value: Any, max_len: int, forbidden: tuple[str, ...]) -> None:
    code = f"INVALID_{name.upper()}"
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{name} must be a non-empty string", code=code)
    if len(value) > max_len:
        raise ValidationError(f"{name} is longer than {max_len} characters", code=code)
    if any(ch in value for ch in forbidden) or value != value.strip():
        shown = " or ".join(repr(ch) for ch in forbidden)
        raise ValidationError(f"{name} must not contain {shown} nor start or end with spaces", code=code)


def _kind(value: Any) -> str:
    if value not in KINDS or not isinstance(value, str):
        raise ValidationError(f"kind must be one of {', '.join(KINDS)}", code="INVALID_KIND")
    return str(value)


def _quantity(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("quantity must be an integer", code="INVALID_QUANTITY")
    if value == 0 or abs(value) > MAX_ABS_QUANTITY:
        raise ValidationError(
            f"quantity must be non-zero and at most {MAX_ABS_QUANTITY} in size",
            code="INVALID_QUANTITY",
        )
    return value


def _context(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("context must be an object", code="INVALID_CONTEXT")
    unknown = sorted(str(k) for k in value if k not in CONTEXT_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown context keys {unknown}; allowed: {', '.join(CONTEXT_FIELDS)}",
            code="INVALID_CONTEXT",
        )
    for key, item in value.items():
        if item is not None and (not isinstance(item, str) or len(item) > MAX_CONTEXT_VALUE_LEN):
            raise ValidationError(
                f"context[{key!r}] must be a string of at most {MAX_CONTEXT_VALUE_LEN} characters",
                code="INVALID_CONTEXT",
            )
    return {k: v for k, v in value.items() if v is not None}
