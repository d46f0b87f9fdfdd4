"""Input validation, run before anything reaches MongoDB (producer side and in the task)."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from json.encoder import encode_basestring
from typing import Any

from mes_tasks.errors import ValidationError
from mes_tasks.models import CONTEXT_FIELDS, KINDS

MAX_WORK_ORDER_ID_LEN = 128
MAX_REQUEST_ID_LEN = 256
MAX_CONTEXT_VALUE_LEN = 512
MAX_ABS_QUANTITY = 1_000_000
# An update's JSON, in bytes; the largest one the field checks accept is about 24 KiB
# (every character a control character, escaped as \uXXXX).
MAX_UPDATE_BYTES = 32 * 1024
SHOWN_CHARS = 40  # of a value quoted in an error message
SHOWN_KEYS = 3  # unknown context keys named in an error message
WORK_ORDER_ID_FORBIDDEN = ("$", "\x00")
REQUEST_ID_FORBIDDEN = ("\x00",)  # barcodes (Code 39) may carry '$'; it is only ever a value
UPDATE_FIELDS = ("work_order_id", "kind", "quantity", "request_id", "context")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHOWN_CHARS
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 3, 3, 3
_END = object()


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
    """Check every field of an update, its size first.

    Raises:
        ValidationError: with ``code`` naming what is wrong.
    """
    _check_size(dict(zip(UPDATE_FIELDS, (work_order_id, kind, quantity, request_id, context), strict=True)))
    return UpdateRequest(
        work_order_id=check_work_order_id(work_order_id),
        kind=_kind(kind),
        quantity=_quantity(quantity),
        request_id=None if request_id is None else _request_id(request_id),
        context=_context(context),
    )


def validate_item(item: Any) -> UpdateRequest:
    """One item of a batch: ``update_quantity``'s arguments by name, checked as ``validate_update``.

    Raises:
        ValidationError: ``INVALID_ITEM`` (not an object, or a key that is no argument), or
            the code ``validate_update`` gives; a missing argument counts as ``None``.
    """
    if not isinstance(item, Mapping):
        raise ValidationError(
            f"an item must be an object of {', '.join(UPDATE_FIELDS)}, not {shown(item)}", code="INVALID_ITEM"
        )
    unknown = unknown_keys(item, UPDATE_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown keys {named(unknown)}; an item takes {', '.join(UPDATE_FIELDS)}", code="INVALID_ITEM"
        )
    return validate_update(**{name: item.get(name) for name in UPDATE_FIELDS})


def unknown_keys(keys: Iterable[Any], allowed: tuple[str, ...]) -> list[Any]:
    """The keys that are not ``allowed``, in their order."""
    return [k for k in keys if k not in allowed]


def named(keys: list[Any]) -> str:
    """Keys as an error message names them: the first ``SHOWN_KEYS``, and how many more."""
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(shown(k) for k in keys[:SHOWN_KEYS]) + more


def check_update_size(args: Any = (), kwargs: Any = None) -> None:
    """Refuse task arguments larger than ``MAX_UPDATE_BYTES`` as JSON, reading no more than that.

    For the send path (``update_quantity.delay()`` / ``apply_async``), on its raw ``args``
    and ``kwargs``: the worker would only dead-letter a larger update.

    Raises:
        ValidationError: ``UPDATE_TOO_LARGE``.
    """
    _check_size({"args": args, "kwargs": kwargs})


def _check_size(value: Any) -> None:
    if json_size(value, MAX_UPDATE_BYTES) > MAX_UPDATE_BYTES:
        raise ValidationError(
            f"the update is larger than {MAX_UPDATE_BYTES} bytes as JSON", code="UPDATE_TOO_LARGE"
        )


def json_size(value: Any, limit: int) -> int:
    """About the UTF-8 size of ``value`` as JSON, counted only until it passes ``limit``.

    Containers are read one item at a time and a string longer than ``limit`` is not
    encoded, so refusing a huge, deep or circular value costs no more than ``limit``.
    """
    total = 0
    pending: list[Iterator[Any]] = [iter((value,))]
    while pending and total <= limit:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
        elif isinstance(item, dict):
            pending.append(chain.from_iterable(item.items()))
            total += 1 + 2 * len(item)  # braces, a ':' and a ',' per entry
        elif isinstance(item, list | tuple):
            pending.append(iter(item))
            total += 1 + len(item)  # brackets and commas
        else:
            total += _scalar_size(item, limit)
    return total


def _scalar_size(item: Any, limit: int) -> int:
    if isinstance(item, str):
        if len(item) > limit:
            return len(item)
        return len(encode_basestring(item).encode("utf-8", "surrogatepass"))
    if isinstance(item, int) and not isinstance(item, bool):
        return item.bit_length() // 3 + 2  # decimal digits, and a sign
    return len(repr(item)) if item is None or isinstance(item, bool | float) else len(type(item).__name__)


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: the repr of a short prefix, and its length if cut."""
    if isinstance(value, str):
        if len(value) <= SHOWN_CHARS:
            return repr(value)
        return f"{value[:SHOWN_CHARS]!r}…({len(value)} chars)"
    try:
        return _repr.repr(value)
    except Exception:  # a value whose repr fails (e.g. an int of 5000 digits) is named by its type
        return f"<{type(value).__name__}>"


def readable(args: Any, kwargs: Any) -> dict[str, str]:
    """An update as Flower's task list and the worker's logs show it (``argsrepr``/``kwargsrepr``).

    ``'WO-1' 'output' +5`` and ``request_id='scan:BC1:PACK'``: short prefixes of each value
    (``shown``), never the context. Also cheaper than Celery's own ``saferepr``.
    """
    positional = list(args) if isinstance(args, (list, tuple)) else []
    named = dict(zip(UPDATE_FIELDS, positional, strict=False)) | (kwargs if isinstance(kwargs, dict) else {})
    quantity = named.get("quantity")
    plain = isinstance(quantity, int) and not isinstance(quantity, bool) and abs(quantity) < 10**12
    amount = f"{quantity:+d}" if plain else shown(quantity)
    return {
        "argsrepr": f"{shown(named.get('work_order_id'))} {shown(named.get('kind'))} {amount}",
        "kwargsrepr": f"request_id={shown(named.get('request_id'))}",
    }


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
        raise ValidationError(f"{name} must be a non-empty string, not {shown(value)}", code=code)
    if len(value) > max_len:
        raise ValidationError(f"{name} {shown(value)} is longer than {max_len} characters", code=code)
    if any(ch in value for ch in forbidden) or value != value.strip():
        chars = " or ".join(repr(ch) for ch in forbidden)
        raise ValidationError(
            f"{name} {shown(value)} must not contain {chars} nor start or end with spaces", code=code
        )


def _kind(value: Any) -> str:
    if value not in KINDS or not isinstance(value, str):
        raise ValidationError(
            f"kind must be one of {', '.join(KINDS)}, not {shown(value)}", code="INVALID_KIND"
        )
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
        raise ValidationError(f"context must be an object, not {shown(value)}", code="INVALID_CONTEXT")
    unknown = unknown_keys(value, CONTEXT_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown context keys {named(unknown)}; allowed: {', '.join(CONTEXT_FIELDS)}",
            code="INVALID_CONTEXT",
        )
    for key, item in value.items():
        if item is not None and (not isinstance(item, str) or len(item) > MAX_CONTEXT_VALUE_LEN):
            raise ValidationError(
                f"context[{key!r}] must be a string of at most {MAX_CONTEXT_VALUE_LEN} characters, "
                f"not {shown(item)}",
                code="INVALID_CONTEXT",
            )
    return {k: v for k, v in value.items() if v is not None}


REQUIRED_PARAMS = 3  # work_order_id, kind, quantity


def bind_update(args: Any, kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    """``update_quantity``'s arguments as (work order, kind, quantity) and named ones.

    Raises:
        TypeError: they do not fit ``update_quantity``'s signature (a stray keyword such as
            ``countdown=5`` given to ``.delay()``): a mistake at the call site, never spooled.
    """
    positional, named = list(args or ()), dict(kwargs or {})
    if len(positional) > len(UPDATE_FIELDS):
        raise TypeError(
            f"update_quantity takes at most {len(UPDATE_FIELDS)} arguments, got {len(positional)}"
        )
    unknown = sorted(str(k) for k in unknown_keys(named, UPDATE_FIELDS))
    if unknown:
        raise TypeError(
            f"update_quantity got unexpected keyword argument(s) {unknown}; its parameters are "
            f"{', '.join(UPDATE_FIELDS)} (apply_async options such as countdown go to apply_async)"
        )
    given = dict(zip(UPDATE_FIELDS, positional, strict=False))
    twice = sorted(set(given) & set(named))
    if twice:
        raise TypeError(f"update_quantity got multiple values for argument(s) {twice}")
    merged = {**given, **named}
    missing = [p for p in UPDATE_FIELDS[:REQUIRED_PARAMS] if p not in merged]
    if missing:
        raise TypeError(f"update_quantity is missing required argument(s) {missing}")
    return [merged[p] for p in UPDATE_FIELDS[:REQUIRED_PARAMS]], {
        p: merged[p] for p in UPDATE_FIELDS[REQUIRED_PARAMS:] if p in merged
    }
