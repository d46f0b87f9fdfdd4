"""The console's commands over HTTP for the operator role, answering the JSON of their ``--json``.

Each route calls the console's own action (``ops.actions``), so the gateway and ``celery -A
mes_tasks ...`` can never disagree. What drops or gives up something (``queue/clean``,
``queue/clean-locks``, ``failed/discard``) needs ``"confirm": true`` in its body, as the
console asks first; without it: ``400 CONFIRMATION_REQUIRED`` and nothing done. The
reference services' paths (``/api/workorder/queue/...``, ``/api/queue/...``) and the
console's (``/api/failed``, ``/api/audit``, ``/api/locks``, ``/api/doctor``) both answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Query
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from mes_tasks.api.body import json_object
from mes_tasks.api.errors import ApiError
from mes_tasks.app import app as celery_app
from mes_tasks.ops import actions
from mes_tasks.ops.actions.limits import DEFAULT_AUDITS
from mes_tasks.ops.stores import Stores

PARTITION = ("partition",)


Route = Callable[[str], Callable[[Callable[..., Any]], Callable[..., Any]]]
Run = Callable[[Callable[[], Any]], Awaitable[JSONResponse]]


def operator_routes(app: FastAPI, operator: Any, stores: Callable[[], Stores]) -> None:
    """Add the operator routes to ``app``, each behind the ``operator`` dependency."""

    def get(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.get(path, tags=["operator"], dependencies=[operator])

    def post(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.post(path, tags=["operator"], dependencies=[operator])

    _queue_routes(get, post, stores)
    _failed_routes(get, post)
    _audit_routes(get, post, stores)


async def run(call: Callable[[], Any]) -> JSONResponse:
    """An action, in the thread pool (it blocks on the stores), answered as JSON."""
    return JSONResponse(await run_in_threadpool(call))


def _queue_routes(get: Route, post: Route, stores: Callable[[], Stores]) -> None:
    async def status() -> JSONResponse:
        return await run(lambda: actions.queue_status(celery_app, stores()))

    async def pause(request: Request) -> JSONResponse:
        body = await _optional_body(request, PARTITION)
        return await run(lambda: actions.pause_queue(celery_app, stores(), _partition(body)))

    async def resume(request: Request) -> JSONResponse:
        body = await _optional_body(request, PARTITION)
        return await run(lambda: actions.resume_queue(celery_app, stores(), _partition(body)))

    async def clean(request: Request) -> JSONResponse:
        body = _confirmed(await _optional_body(request, (*PARTITION, "confirm")), "drop every waiting update")
        return await run(lambda: actions.purge_queue(celery_app, stores(), _partition(body)))

    async def locks() -> JSONResponse:
        return await run(lambda: actions.list_locks(stores()))

    async def clean_lock(request: Request) -> JSONResponse:
        body = _confirmed(await json_object(request, ("work_order_id", "token", "confirm")), "take a lock")
        return await run(lambda: _release(stores(), body))

    async def doctor() -> JSONResponse:
        return await run(lambda: actions.doctor_report(celery_app, stores().settings))

    get("/api/workorder/queue/stats")(status)
    get("/api/queue/status")(status)
    for prefix in ("/api/workorder/queue", "/api/queue"):
        post(f"{prefix}/pause")(pause)
        post(f"{prefix}/resume")(resume)
        post(f"{prefix}/clean")(clean)
    get("/api/workorder/queue/locks")(locks)
    get("/api/locks")(locks)
    post("/api/workorder/queue/clean-locks")(clean_lock)
    post("/api/locks/release")(clean_lock)
    get("/api/doctor")(doctor)
    get("/api/queue/health")(doctor)


def _failed_routes(get: Route, post: Route) -> None:
    async def list_failed(
        code: str | None = None, work_order_id: str | None = None,
        status: str = Query("open", pattern="^(open|retried|discarded|all)$"),
    ) -> JSONResponse:  # fmt: skip
        return await run(lambda: actions.list_failed(code, work_order_id, status))

    async def show_failed(record_id: str) -> JSONResponse:
        return await run(lambda: actions.show_failed(record_id))

    async def retry(request: Request) -> JSONResponse:
        ids, every, code = _selection(await json_object(request, ("ids", "all", "code")))
        return await run(lambda: actions.retry_failed_updates(ids, every, code))

    async def discard(request: Request) -> JSONResponse:
        body = _confirmed(await json_object(request, ("ids", "all", "code", "confirm")), "give up updates")
        ids, every, code = _selection(body)
        return await run(lambda: actions.discard_failed_updates(ids, every, code))

    get("/api/failed")(list_failed)
    get("/api/failed/{record_id}")(show_failed)
    post("/api/failed/retry")(retry)
    post("/api/failed/discard")(discard)


def _audit_routes(get: Route, post: Route, stores: Callable[[], Stores]) -> None:
    async def run_audit(request: Request) -> JSONResponse:
        body = await _optional_body(request, ("work_order_ids", "repair"))
        ids = body.get("work_order_ids") or []
        if not isinstance(ids, list) or not isinstance(body.get("repair", False), bool):
            raise ApiError("work_order_ids must be a list of ids, repair true or false", code="INVALID_BODY")
        return await run(lambda: actions.run_audit(stores(), ids, repair=bool(body.get("repair"))))

    async def list_audits(limit: int = DEFAULT_AUDITS) -> JSONResponse:
        return await run(lambda: actions.list_audits(limit))

    async def show_audit(report_id: str) -> JSONResponse:
        return await run(lambda: actions.show_audit(report_id))

    post("/api/audit/run")(run_audit)
    get("/api/audit")(list_audits)
    get("/api/audit/{report_id}")(show_audit)


async def _optional_body(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON body, or nothing when none was sent (a POST with no options)."""
    chunked = "chunked" in request.headers.get("transfer-encoding", "")
    if request.headers.get("content-length", "0") == "0" and not chunked:
        return {}
    return await json_object(request, allowed)


def _confirmed(body: dict[str, Any], what: str) -> dict[str, Any]:
    if body.get("confirm") is not True:
        raise ApiError(f'this would {what}: send "confirm": true to do it', code="CONFIRMATION_REQUIRED")
    return body


def _partition(body: dict[str, Any]) -> int | None:
    value = body.get("partition")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError("partition must be an integer", code="INVALID_PARTITION")
    return value


def _selection(body: dict[str, Any]) -> tuple[list[str], bool, str | None]:
    ids, every, code = body.get("ids") or [], body.get("all", False), body.get("code")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not isinstance(every, bool):
        raise ApiError("ids must be a list of record ids and all true or false", code="INVALID_BODY")
    if code is not None and not isinstance(code, str):
        raise ApiError("code must be an error code", code="INVALID_BODY")
    actions.check_selection(ids, every, code)
    return ids, every, code


def _release(stores: Stores, body: dict[str, Any]) -> dict[str, Any]:
    wo, token = body.get("work_order_id"), body.get("token")
    if not isinstance(wo, str) or (token is not None and not isinstance(token, str)):
        raise ApiError("work_order_id (and token, if given) must be strings", code="INVALID_BODY")
    return actions.release_lock(stores, wo, token)
