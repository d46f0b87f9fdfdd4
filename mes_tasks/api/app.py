"""The HTTP gateway's ASGI application: the reference services' routes, over the producer and the console.

``create_app()`` reads the settings every other command reads, and the gateway's access
(``api.access``); it refuses to start without a token. Nothing connects at start: a store
that is down makes ``/health`` answer 503 and a submission answer as the producer does
(``SPOOLED``, or ``QUEUE_ERROR`` with ``Retry-After`` when nothing was recorded).

Routes (``/openapi.json`` describes each; no interactive page, which would load its
scripts from the internet, and factory networks are often offline):

- producer role: ``POST /api/workorder/update-quantity``, ``POST
  /api/workorder/batch-update-quantity``, ``GET /api/workorder/{id}``, ``GET
  /api/workorder/{id}/logs``, ``GET /api/updates/{request_id}``;
- operator role: the console's commands (``api.operator``);
- open: ``GET /health``, ``GET /openapi.json``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pymongo
import redis
from fastapi import Depends, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from pymongo.errors import PyMongoError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from mes_tasks import db
from mes_tasks.api import reads, submit
from mes_tasks.api.access import OPERATOR, PRODUCER, Access, access_from_env, may
from mes_tasks.api.body import json_object
from mes_tasks.api.counting import CountRequests, RequestCounts
from mes_tasks.api.errors import error_response, for_result, on_mes_error, on_unexpected, respond
from mes_tasks.api.operator import operator_routes
from mes_tasks.errors import MesError
from mes_tasks.ops.stores import Stores
from mes_tasks.send.producer import Producer
from mes_tasks.settings import Settings, get_settings
from mes_tasks.validation import UPDATE_FIELDS

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0  # each store's ping in /health: a load balancer asks often
UPDATE_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["work_order_id", "kind", "quantity"],
    "properties": {
        "work_order_id": {"type": "string"},
        "kind": {"type": "string", "enum": ["input", "output"]},
        "quantity": {"type": "integer", "description": "non-zero; negative for a correction"},
        "request_id": {"type": "string", "description": "the business key; or the Idempotency-Key header"},
        "context": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@dataclass
class Gateway:
    """What every request works with: the settings, the access, one producer, a client for /health."""

    settings: Settings
    access: Access
    producer: Producer  # its Redis client waits at most the publish timeout
    health_mongo: pymongo.MongoClient[dict[str, Any]]
    stores: Stores  # what the console's commands work on


def create_app(settings: Settings | None = None, access: Access | None = None) -> FastAPI:
    """The gateway, with ``settings`` (default: the environment's) and ``access`` (default: ``MES_API_*``).

    Raises:
        ConfigurationError: no token and no ``MES_API_AUTH=proxy``, or a malformed token.
    """
    settings = settings or get_settings()
    timeout_ms = int(HEALTH_TIMEOUT_S * 1000)
    health: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        settings.mongodb_uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
    )
    mongo = db.connect(settings)  # lazy: nothing is reached until a request needs it
    stores = Stores(settings, mongo, db.redis_client(settings))
    gateway = Gateway(settings, access or access_from_env(), Producer(settings), health, stores)
    counts = RequestCounts(gateway.producer.redis, settings.key_prefix)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        counts.start()
        yield
        counts.stop()

    app = FastAPI(title="mes_tasks", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)  # fmt: skip
    app.add_middleware(CountRequests, counts=counts)
    app.state.gateway = gateway
    app.add_exception_handler(MesError, on_mes_error)
    app.add_exception_handler(RequestValidationError, _on_bad_parameter)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    _producer_routes(app)
    operator_routes(app, _needs(OPERATOR), lambda: gateway.stores)
    app.get("/health", tags=["health"])(_health)
    return app


def _needs(role: str) -> Any:
    """A dependency that admits a bearer token of ``role`` (or ``operator``): 401 without, 403 below."""

    async def check(request: Request) -> str:  # no thread of its own: a header and a compare
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = _gateway(request).access.role_of(token.strip() if scheme.lower() == "bearer" else None)
        if found is None:
            raise MesError(
                "send Authorization: Bearer <token> with a token of MES_API_TOKENS", code="UNAUTHORIZED"
            )
        if not may(found, role):
            raise MesError(
                f"this route needs the {role} role; the token given is a {found}'s", code="FORBIDDEN"
            )
        return found

    return Depends(check)


def _producer_routes(app: FastAPI) -> None:
    producer = _needs(PRODUCER)
    body = {"requestBody": {"required": True, "content": {"application/json": {"schema": UPDATE_BODY}}}}
    batch = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "required": ["updates"],
        "properties": {"updates": {"type": "array", "items": UPDATE_BODY}}}}}}}  # fmt: skip
    app.post("/api/workorder/update-quantity", tags=["producer"], dependencies=[producer], openapi_extra=body,
             status_code=202)(update_quantity)  # fmt: skip
    app.post("/api/workorder/batch-update-quantity", tags=["producer"], dependencies=[producer],
             openapi_extra=batch)(batch_update_quantity)  # fmt: skip
    app.get("/api/workorder/{work_order_id}", tags=["producer"], dependencies=[producer])(work_order)
    app.get("/api/workorder/{work_order_id}/logs", tags=["producer"], dependencies=[producer])(
        work_order_logs
    )
    app.get("/api/updates/{request_id}", tags=["producer"], dependencies=[producer])(update_status)


async def update_quantity(request: Request) -> JSONResponse:
    """Submit one update: 202 ``QUEUED`` or ``SPOOLED``, 200 ``DUPLICATE`` for a request id already
    applied, 4xx with the code for bad input, 503 ``QUEUE_ERROR`` (with ``Retry-After``) when
    nothing was recorded. The request id may come as the ``Idempotency-Key`` header."""
    item = await json_object(request, UPDATE_FIELDS)
    item = submit.with_key(item, request.headers.get(submit.IDEMPOTENCY_HEADER))
    result = await run_in_threadpool(submit.submit_one, _gateway(request).producer, item)
    return for_result(result, 200 if result.get("code") == submit.DUPLICATE else 202)


async def batch_update_quantity(request: Request) -> JSONResponse:
    """Submit a batch ``{"updates": [...]}``: one result per item, in order, each judged on its own."""
    body = await json_object(request, ("updates",))
    items = body.get("updates")
    if not isinstance(items, list):
        return error_response("INVALID_BODY", "updates must be a list of updates")
    results = await run_in_threadpool(submit.submit_batch, _gateway(request).producer, items)
    answer = {"success": all(r.get("success") for r in results), "results": results}
    if submit.nothing_recorded(results):
        return respond(answer, 503)
    return JSONResponse(answer)


def work_order(request: Request, work_order_id: str) -> dict[str, Any]:
    """A work order's counters, fencing epoch, version and partition."""
    return reads.work_order(work_order_id, _gateway(request).settings.partitions)


def work_order_logs(
    request: Request,
    work_order_id: str,
    limit: int = Query(50, ge=1, le=reads.MAX_LOGS_PAGE),
    before: str | None = Query(None, description="next_before of the previous page"),
) -> dict[str, Any]:
    """A work order's logs, newest first, a page at a time."""
    return reads.logs(work_order_id, limit, before)


def update_status(request: Request, request_id: str, job_id: str | None = None) -> dict[str, Any]:
    """Where one update is now: ``pending``, ``applied``, ``duplicate``, ``dead_lettered`` or ``unknown``."""
    return reads.update_status(request_id, _gateway(request).settings.partitions, job_id)


def _health(request: Request) -> JSONResponse:
    """200 while both stores answer, 503 naming the one that does not; no token needed."""
    gateway, stores = _gateway(request), {}
    try:
        gateway.producer.redis.ping()
        stores["redis"] = "ok"
    except redis.RedisError as exc:
        stores["redis"] = f"down: {type(exc).__name__}"
    try:
        gateway.health_mongo.admin.command("ping")
        stores["mongodb"] = "ok"
    except PyMongoError as exc:
        stores["mongodb"] = f"down: {type(exc).__name__}"
    healthy = all(v == "ok" for v in stores.values())
    return JSONResponse(
        {"status": "ok" if healthy else "down", **stores}, status_code=200 if healthy else 503
    )


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _on_bad_parameter(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
    return error_response("INVALID_PARAMETER", f"{where}: {first.get('msg', 'invalid')}")


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return error_response(code, f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)
