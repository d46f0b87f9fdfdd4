"""Every answer that is not a success: one JSON object with a code, an HTTP status that fits it.

The shape is a refused submission's: ``{"success": false, "code": ..., "error": ...}``
(plus ``job_id: null`` where a submission was refused), so a main app reads one shape
whatever went wrong. No traceback ever goes out; an unexpected error is logged with its
traceback and answered ``500 INTERNAL_ERROR``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from mes_tasks.errors import MesError, TransientError, ValidationError, one_line
from mes_tasks.settings import mask_secrets

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # told to a caller whose update was not recorded: the broker and the outbox were down
# The HTTP status of a refusal, by its code; any other ValidationError is 400, a transient error 503.
STATUS_BY_CODE = {
    "UNKNOWN_WORK_ORDER": 404,
    "NOT_FOUND": 404,
    "NOT_LOCKED": 404,
    "REQUEST_ID_CONFLICT": 409,
    "IDEMPOTENCY_KEY_MISMATCH": 400,
    "BODY_TOO_LARGE": 413,
    "BATCH_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "METHOD_NOT_ALLOWED": 405,
    "QUEUE_ERROR": 503,
    "CONFIRMATION_REQUIRED": 400,
}


class ApiError(MesError):
    """A refusal of the gateway itself (bad body, no token, ...), with its code."""

    code = "BAD_REQUEST"


def status_of(code: str, exc: BaseException | None = None) -> int:
    """The HTTP status for a refusal ``code``."""
    if code in STATUS_BY_CODE:
        return STATUS_BY_CODE[code]
    if isinstance(exc, TransientError):
        return 503
    if isinstance(exc, ValidationError | ApiError) or exc is None:
        return 400
    return 400 if isinstance(exc, MesError) and not exc.transient else 500


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The one shape of every error answer."""
    return {"success": False, "code": code, **extra, "error": one_line(mask_secrets(message))}


def respond(body: Any, status: int = 200) -> JSONResponse:
    """``body`` as JSON; a 503 says when to try again, a 401 which scheme to use."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(code: str, message: str, status: int | None = None, **extra: Any) -> JSONResponse:
    """``error_body`` as a response, with the status its code calls for unless given."""
    return respond(error_body(code, message, **extra), status or status_of(code))


def for_result(result: dict[str, Any], ok_status: int) -> JSONResponse:
    """A submission's result dict as a response: ``ok_status`` when it succeeded."""
    return respond(result, ok_status if result.get("success") else status_of(str(result.get("code"))))


async def on_mes_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MesError)
    status = status_of(exc.code, exc)
    if status >= 500:
        log.warning("%s %s: %s [%s]", request.method, request.url.path, exc.message, exc.code)
    return error_response(exc.code, exc.message, status)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response("INTERNAL_ERROR", f"unexpected {type(exc).__name__}; the gateway logged it", 500)
