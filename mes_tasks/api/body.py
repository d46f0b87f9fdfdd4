"""A request's JSON body, read within a size limit and parsed strictly, before anything else runs.

Refusals, each one line with a code and nothing written: ``UNSUPPORTED_MEDIA_TYPE`` (415)
for a body that is not ``application/json``, ``BODY_TOO_LARGE`` (413) past
``MAX_BODY_BYTES`` (counted as it arrives, so a client cannot make the gateway hold more),
``INVALID_JSON`` for bytes that are not UTF-8 JSON (``NaN`` and ``Infinity`` included, and a
nesting too deep to parse), ``INVALID_BODY`` for JSON that is not an object or carries a key
the route does not take.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from mes_tasks.api.errors import ApiError
from mes_tasks.validation import named, unknown_keys

# A batch of MAX_BATCH_ITEMS updates with their context fits; a body past it is refused unread.
MAX_BODY_BYTES = 4 * 1024 * 1024


async def json_object(
    request: Request, allowed: Iterable[str], limit: int = MAX_BODY_BYTES
) -> dict[str, Any]:
    """The body as a JSON object whose keys are all ``allowed``.

    Raises:
        ApiError: with the codes of the module docstring.
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            f"send the body as application/json, not {media or 'nothing'}", code="UNSUPPORTED_MEDIA_TYPE"
        )
    raw = await _read(request, limit)
    value = _parsed(raw)
    if not isinstance(value, dict):
        raise ApiError(f"the body must be a JSON object, not {type(value).__name__}", code="INVALID_BODY")
    keys = tuple(allowed)
    unknown = unknown_keys(value, keys)
    if unknown:
        raise ApiError(
            f"unknown keys {named(unknown)}; this route takes {', '.join(keys)}", code="INVALID_BODY"
        )
    return value


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(_too_large(limit), code="BODY_TOO_LARGE")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(_too_large(limit), code="BODY_TOO_LARGE")
        chunks.append(chunk)
    return b"".join(chunks)


def _parsed(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("the body is not UTF-8", code="INVALID_JSON") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError("the body nests too deeply to be an update", code="INVALID_JSON") from None
    except ValueError as exc:
        raise ApiError(f"the body is not JSON: {exc}", code="INVALID_JSON") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _too_large(limit: int) -> str:
    return f"the body is larger than {limit:,} bytes; send fewer updates per call"
