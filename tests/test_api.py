"""The HTTP gateway against real servers: a real ``celery -A mes_tasks api`` process, a real worker.

Every refusal is checked with nothing written: no outbox entry, no message in the queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from api_client import OPERATOR_TOKEN, PRODUCER_TOKEN, Gateway, start_gateway

from conftest import TEST_ENV, Worker, make_work_orders, wait_until, with_redis_down
from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder
from mes_tasks.names import UPDATE_QUANTITY

UPDATE = "/api/workorder/update-quantity"
BATCH = "/api/workorder/batch-update-quantity"


@pytest.fixture(scope="module")
def gateway(servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = start_gateway(tmp_path_factory.mktemp("api") / "api.log", TEST_ENV)
    yield running
    running.stop()


@pytest.fixture()
def api(gateway: Gateway, services: redis.Redis) -> Gateway:
    """The gateway, with both stores clean."""
    return gateway


def _nothing_written(client: redis.Redis) -> None:
    assert OutboxMessage.objects.count() == 0
    assert client.llen("workorder") == 0


def _counters(wo: str) -> tuple[int, int]:
    doc = WorkOrder._get_collection().find_one({"_id": wo}) or {}
    return doc.get("input_qty", 0), doc.get("output_qty", 0)


def test_health_and_the_openapi_document_need_no_token(api: Gateway) -> None:
    health = api.call("GET", "/health", token=None)
    assert (health.status, health.body) == (200, {"status": "ok", "redis": "ok", "mongodb": "ok"})
    doc = api.call("GET", "/openapi.json", token=None)
    assert doc.status == 200 and UPDATE in doc.body["paths"] and BATCH in doc.body["paths"]
    assert "/api/updates/{request_id}" in doc.body["paths"]
    assert api.call("GET", "/docs", token=None).status == 404  # no page that loads scripts from the internet


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", UPDATE), ("POST", BATCH), ("GET", "/api/workorder/WO-1"), ("GET", "/api/workorder/WO-1/logs"),
     ("GET", "/api/updates/r-1")],
)  # fmt: skip
def test_every_producer_route_needs_a_token(api: Gateway, method: str, path: str) -> None:
    body = {} if method == "POST" else None
    for token in (None, "not-a-token-of-this-gateway", PRODUCER_TOKEN[:-1]):
        answer = api.call(method, path, body=body, token=token)
        assert answer.status == 401 and answer.body["code"] == "UNAUTHORIZED", (token, answer)
        assert answer.headers["www-authenticate"] == "Bearer"
    assert api.call(method, path, body=body, token=OPERATOR_TOKEN).status != 401  # operators may too


def test_an_update_is_queued_applied_and_a_retried_call_counts_once(
    api: Gateway, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    item = {"work_order_id": "WO-1", "kind": "output", "quantity": 3, "request_id": "scan:1",
            "context": {"barcode": "BC1"}}  # fmt: skip
    first = api.call("POST", UPDATE, item)
    assert first.status == 202 and first.body["code"] == "QUEUED" and first.body["request_id"] == "scan:1"
    again = api.call("POST", UPDATE, item)  # a retry before it was applied: sent again, counted once
    assert again.status == 202 and again.body["job_id"] != first.body["job_id"]
    start_worker()
    wait_until(lambda: QuantityLog.objects(request_id="scan:1").count() == 1, 30, "the update applied")
    status = api.call("GET", "/api/updates/scan:1").body
    assert status["state"] == "applied" and status["log"]["value_after"] == 3
    late = api.call("POST", UPDATE, item)  # a retry after it was applied: answered from the log
    assert late.status == 200 and late.body["code"] == "DUPLICATE" and late.body["value_after"] == 3
    wait_until(lambda: api.call("GET", f"/api/updates/scan:1?job_id={again.body['job_id']}").body["state"]
               == "duplicate", 30, "the second submission seen as a duplicate")  # fmt: skip
    time.sleep(0.5)
    assert _counters("WO-1") == (0, 3)
    conflict = api.call("POST", UPDATE, {**item, "quantity": 4})
    assert conflict.status == 409 and conflict.body["code"] == "REQUEST_ID_CONFLICT"


def test_a_repeat_is_answered_from_the_log_only_for_a_request_id_a_submission_marked_as_sent(
    api: Gateway, services: redis.Redis, settings: Any, start_worker: Callable[..., Worker]
) -> None:
    from mes_tasks.app import app
    from mes_tasks.keys import sent_key
    from mes_tasks.send.producer import SENT_MARK_S, submit_quantity_update

    make_work_orders(["WO-1"])
    item = {"work_order_id": "WO-1", "kind": "input", "quantity": 2}
    assert submit_quantity_update(**item, request_id="py-1")["code"] == "QUEUED"  # a Python main app
    sent_at = services.zscore(sent_key(settings.key_prefix), "py-1") or 0
    assert time.time() - SENT_MARK_S < sent_at <= time.time()
    app.send_task(UPDATE_QUANTITY, ["WO-1", "input", 5], {"request_id": "raw-1"})  # marks nothing
    unnamed = api.call("POST", UPDATE, {**item, "quantity": 1})  # no request id given: nothing to mark
    assert services.zscore(sent_key(settings.key_prefix), unnamed.body["job_id"]) is None
    start_worker()
    wait_until(lambda: _counters("WO-1") == (8, 0), 30, "the three updates applied")
    marked = api.call("POST", UPDATE, {**item, "request_id": "py-1"})
    assert marked.status == 200 and marked.body["code"] == "DUPLICATE"
    unmarked = api.call("POST", UPDATE, {**item, "quantity": 5, "request_id": "raw-1"})  # not looked up:
    assert unmarked.status == 202 and unmarked.body["code"] == "QUEUED"  # sent again, counted once
    wait_until(lambda: api.call("GET", f"/api/updates/raw-1?job_id={unmarked.body['job_id']}").body["state"]
               == "duplicate", 30, "the repeat seen as a duplicate")  # fmt: skip
    assert _counters("WO-1") == (8, 0)


def test_the_idempotency_key_header_is_the_request_id_and_must_agree_with_the_body(api: Gateway) -> None:
    make_work_orders(["WO-1"])
    item = {"work_order_id": "WO-1", "kind": "input", "quantity": 1}
    keyed = api.call("POST", UPDATE, item, headers={"Idempotency-Key": "key-1"})
    assert keyed.status == 202 and keyed.body["request_id"] == "key-1"
    both = api.call("POST", UPDATE, {**item, "request_id": "key-1"}, headers={"Idempotency-Key": "key-1"})
    assert both.status == 202 and both.body["request_id"] == "key-1"
    mismatch = api.call("POST", UPDATE, {**item, "request_id": "other"}, headers={"Idempotency-Key": "key-1"})
    assert mismatch.status == 400 and mismatch.body["code"] == "IDEMPOTENCY_KEY_MISMATCH"
    assert OutboxMessage.objects.count() == 2  # the two accepted calls only
    pending = api.call("GET", "/api/updates/key-1").body
    assert pending["state"] == "pending" and pending["outbox"]["state"] == "sent"
    assert pending["outbox"]["queue"] == "workorder"
    assert api.call("GET", "/api/updates/never-sent").body == {"request_id": "never-sent", "state": "unknown"}


def _raw(api: Gateway, raw: bytes, content_type: str = "application/json") -> Any:
    return api.call("POST", UPDATE, raw=raw, headers={"Content-Type": content_type})


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        (lambda api: _raw(api, b"{not json"), 400, "INVALID_JSON"),
        (lambda api: _raw(api, b"\xff\xfe{}"), 400, "INVALID_JSON"),
        (lambda api: _raw(api, b'{"quantity": NaN}'), 400, "INVALID_JSON"),
        (lambda api: _raw(api, b"[" * 100_000 + b"]" * 100_000), 400, "INVALID_JSON"),
        (lambda api: _raw(api, b"[1, 2]"), 400, "INVALID_BODY"),
        (lambda api: _raw(api, b"work_order_id=WO-1", "application/x-www-form-urlencoded"), 415,
         "UNSUPPORTED_MEDIA_TYPE"),
        (lambda api: _raw(api, b'{"a": "' + b"x" * (5 * 1024 * 1024) + b'"}'), 413, "BODY_TOO_LARGE"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 1,
                                               "colour": "red"}), 400, "INVALID_BODY"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": "1"}),
         400, "INVALID_QUANTITY"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": {"$gt": ""}, "kind": "input", "quantity": 1}),
         400, "INVALID_WORK_ORDER_ID"),
        (lambda api: api.call("POST", UPDATE, {"kind": "input", "quantity": 1}), 400,
         "MISSING_WORK_ORDER_ID"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "scrap", "quantity": 1}), 400,
         "INVALID_KIND"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 1,
                                               "context": {"barcode": {"a": [1] * 10}}}), 400,
         "INVALID_CONTEXT"),
        (lambda api: api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 1,
                                               "context": {"barcode": "x" * 40_000}}), 400,
         "UPDATE_TOO_LARGE"),
        (lambda api: api.call("POST", BATCH, {"updates": {"a": 1}}), 400, "INVALID_BODY"),
        (lambda api: api.call("POST", BATCH, {"updates": [{"work_order_id": "WO-1", "kind": "input",
                                                           "quantity": 1}] * 10_001}), 413,
         "BATCH_TOO_LARGE"),
        (lambda api: api.call("GET", "/api/workorder/WO$1"), 400, "INVALID_WORK_ORDER_ID"),
        (lambda api: api.call("GET", "/api/workorder/WO-1/logs?limit=0"), 400, "INVALID_PARAMETER"),
        (lambda api: api.call("GET", "/api/workorder/WO-1/logs?before=zz"), 400, "INVALID_PARAMETER"),
        (lambda api: api.call("GET", "/api/workorder/NOPE"), 404, "UNKNOWN_WORK_ORDER"),
        (lambda api: api.call("GET", "/api/nothing-here"), 404, "NOT_FOUND"),
        (lambda api: api.call("DELETE", UPDATE), 405, "METHOD_NOT_ALLOWED"),
    ],
)  # fmt: skip
def test_bad_input_is_one_json_line_with_a_code_and_nothing_is_written(
    api: Gateway, services: redis.Redis, send: Callable[[Gateway], Any], status: int, code: str
) -> None:
    answer = send(api)
    assert (answer.status, answer.body["code"]) == (status, code), answer.raw[:500]
    assert answer.body["success"] is False and "\n" not in answer.body["error"]
    assert "Traceback" not in answer.raw.decode("utf-8", "replace")
    _nothing_written(services)


def test_a_batch_answers_each_item_in_order_and_already_applied_ones_from_the_log(
    api: Gateway, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1", "WO-2"])
    item = {"work_order_id": "WO-1", "kind": "input", "quantity": 2}
    first = api.call("POST", BATCH, {"updates": [{**item, "request_id": "b-1"}]})
    assert first.status == 200 and first.body["results"][0]["code"] == "QUEUED"
    start_worker()
    wait_until(lambda: QuantityLog.objects(request_id="b-1").count() == 1, 30, "b-1 applied")
    updates = [
        {**item, "request_id": "b-1"},  # applied already: answered from the log, not sent
        {"work_order_id": "WO-2", "kind": "output", "quantity": 5, "request_id": "b-2"},
        {"work_order_id": "WO-2", "kind": "scrap", "quantity": 5},  # refused on its own
        {"work_order_id": "WO-2", "kind": "output", "quantity": 5, "request_id": "b-2"},  # same as item 1
        "not an object",
    ]
    answer = api.call("POST", BATCH, {"updates": updates})
    codes = [r["code"] for r in answer.body["results"]]
    assert answer.status == 200 and codes == ["DUPLICATE", "QUEUED", "INVALID_KIND", "QUEUED", "INVALID_ITEM"]
    assert answer.body["results"][3]["duplicate_of"] == 1 and answer.body["success"] is False
    wait_until(lambda: _counters("WO-2") == (0, 5), 30, "b-2 applied once")
    assert _counters("WO-1") == (2, 0)


def test_a_work_order_and_its_logs_a_page_at_a_time(
    api: Gateway, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-7"])
    start_worker()
    for i in range(5):
        assert api.call("POST", UPDATE, {"work_order_id": "WO-7", "kind": "input", "quantity": 1,
                                         "request_id": f"p-{i}"}).status == 202  # fmt: skip
    wait_until(lambda: _counters("WO-7") == (5, 0), 30, "five updates applied")
    detail = api.call("GET", "/api/workorder/WO-7").body
    assert (detail["input_qty"], detail["queue"], detail["partition"]) == (5, "workorder", None)
    page = api.call("GET", "/api/workorder/WO-7/logs?limit=3").body
    assert [x["request_id"] for x in page["logs"]] == ["p-4", "p-3", "p-2"] and page["next_before"]
    rest = api.call("GET", f"/api/workorder/WO-7/logs?limit=3&before={page['next_before']}").body
    assert [x["request_id"] for x in rest["logs"]] == ["p-1", "p-0"] and rest["next_before"] is None


def test_an_update_refused_for_good_is_found_dead_lettered(
    api: Gateway, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    answer = api.call("POST", UPDATE, {"work_order_id": "WO-NONE", "kind": "input", "quantity": 1,
                                       "request_id": "dl-1"})  # fmt: skip
    assert answer.status == 202  # the worker decides: the work order may be created meanwhile
    wait_until(
        lambda: api.call("GET", "/api/updates/dl-1").body["state"] == "dead_lettered", 30, "dead letter"
    )
    assert api.call("GET", "/api/updates/dl-1").body["dead_letter"]["code"] == "UNKNOWN_WORK_ORDER"


def test_with_redis_down_an_update_is_spooled_and_with_both_stores_down_nothing_is_recorded_503(
    api: Gateway, servers: dict[str, Any]
) -> None:
    make_work_orders(["WO-1"])
    item = {"work_order_id": "WO-1", "kind": "input", "quantity": 1, "request_id": "down-1"}
    spooled = with_redis_down(servers, lambda: api.call("POST", UPDATE, item))
    assert spooled.status == 202 and spooled.body["code"] == "SPOOLED"
    down = with_redis_down(servers, lambda: api.call("GET", "/health", token=None))
    assert down.status == 503 and down.body["redis"].startswith("down") and down.body["mongodb"] == "ok"
    servers["mongo"].stop()
    try:
        nothing = with_redis_down(servers, lambda: api.call("POST", UPDATE, {**item, "request_id": "down-2"}))
    finally:
        servers["mongo"].start()
    assert nothing.status == 503 and nothing.body["code"] == "QUEUE_ERROR" and nothing.headers["retry-after"]
    assert json.loads(nothing.raw)["recorded"] is False


def test_the_gateway_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    from api_client import start_gateway as start

    with pytest.raises(AssertionError, match="MES_API_TOKENS"):
        start(tmp_path / "api.log", {**TEST_ENV, "MES_API_TOKENS": ""}, timeout_s=20)
    with pytest.raises(AssertionError, match="fewer than 16 characters"):
        start(tmp_path / "api2.log", {**TEST_ENV, "MES_API_TOKENS": "producer:short"}, timeout_s=20)
    assert "short" not in (tmp_path / "api2.log").read_text()


def test_requests_are_counted_by_method_route_and_status_for_the_metrics_endpoint(
    api: Gateway, services: redis.Redis, settings: Any
) -> None:
    from mes_tasks.ops.metrics import registry_for

    make_work_orders(["WO-1"])
    assert api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 1}).status == 202
    assert api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 0}).status == 400
    assert api.call("GET", "/api/workorder/NOPE").status == 404
    registry = registry_for(services, settings.key_prefix)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    route = "/api/workorder/{work_order_id}"
    wait_until(lambda: value("mes_http_requests_total", method="GET", route=route, status="404") == 1, 10,
               "the gateway's counts flushed")  # fmt: skip
    assert value("mes_http_requests_total", method="POST", route=UPDATE, status="202") == 1
    assert value("mes_http_requests_total", method="POST", route=UPDATE, status="400") == 1
    assert value("mes_http_request_seconds_count", method="POST", route=UPDATE) == 2
    assert value("mes_http_request_seconds_bucket", method="POST", route=UPDATE, le="+Inf") == 2


OPERATOR_ROUTES = [
    ("GET", "/api/workorder/queue/stats"), ("GET", "/api/queue/status"),
    ("POST", "/api/workorder/queue/pause"), ("POST", "/api/queue/resume"),
    ("POST", "/api/workorder/queue/clean"), ("GET", "/api/workorder/queue/locks"),
    ("POST", "/api/workorder/queue/clean-locks"), ("GET", "/api/failed"), ("GET", "/api/failed/x"),
    ("POST", "/api/failed/retry"), ("POST", "/api/failed/discard"), ("POST", "/api/audit/run"),
    ("GET", "/api/audit"), ("GET", "/api/audit/x"), ("GET", "/api/doctor"), ("GET", "/api/queue/health"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_every_operator_route_needs_an_operator_token(api: Gateway, method: str, path: str) -> None:
    body = {} if method == "POST" else None
    assert api.call(method, path, body=body, token=None).status == 401
    refused = api.call(method, path, body=body, token=PRODUCER_TOKEN)
    assert refused.status == 403 and refused.body["code"] == "FORBIDDEN"
    assert "operator" in refused.body["error"]


def _operator(api: Gateway, method: str, path: str, body: Any = None) -> Any:
    return api.call(method, path, body=body, token=OPERATOR_TOKEN)


def test_the_queue_commands_answer_the_consoles_json_and_destructive_ones_want_a_confirmation(
    api: Gateway, services: redis.Redis
) -> None:
    from mes_tasks.app import app as celery_app
    from mes_tasks.ops import actions

    make_work_orders(["WO-1"])
    assert api.call("POST", UPDATE, {"work_order_id": "WO-1", "kind": "input", "quantity": 1}).status == 202
    stats = _operator(api, "GET", "/api/workorder/queue/stats")
    assert stats.status == 200 and stats.body["queues"]["workorder"]["waiting"] == 1
    same = json.loads(json.dumps(actions.queue_status(celery_app, actions.stores()), default=str))
    assert stats.body.keys() == same.keys() and stats.body["outbox"] == same["outbox"]
    paused = _operator(api, "POST", "/api/workorder/queue/pause")
    assert paused.status == 200 and paused.body["paused"] is True and paused.body["queue"] == "workorder"
    resumed = _operator(api, "POST", "/api/queue/resume")
    assert resumed.status == 200 and resumed.body["paused"] is False and resumed.body["ended"]
    assert _operator(api, "POST", "/api/queue/resume").body["code"] == "NOT_PAUSED"
    bad = _operator(api, "POST", "/api/queue/pause", {"partition": 7})
    assert bad.status == 400 and bad.body["code"] == "INVALID_PARTITION"
    unconfirmed = _operator(api, "POST", "/api/workorder/queue/clean", {})
    assert unconfirmed.status == 400 and unconfirmed.body["code"] == "CONFIRMATION_REQUIRED"
    assert services.llen("workorder") == 1  # nothing dropped
    purged = _operator(api, "POST", "/api/workorder/queue/clean", {"confirm": True})
    assert purged.status == 200 and purged.body["purged"] == 1 and services.llen("workorder") == 0


def test_locks_failed_updates_audits_and_doctor_over_http(api: Gateway, services: redis.Redis) -> None:
    from mes_tasks.apply.deadletter import Failure, record_failure
    from mes_tasks.errors import UnknownWorkOrder
    from mes_tasks.keys import lock_key

    services.set(lock_key("mes:", "WO-L"), "host:1:abc/tok", px=30_000)
    assert [x["work_order_id"] for x in _operator(api, "GET", "/api/locks").body] == ["WO-L"]
    release = {"work_order_id": "WO-L"}
    assert _operator(api, "POST", "/api/locks/release", release).body["code"] == "CONFIRMATION_REQUIRED"
    assert _operator(api, "POST", "/api/locks/release", {**release, "confirm": True}).body["released"] is True
    kwargs = {"request_id": "f-1", "context": None}
    error = UnknownWorkOrder("no WO-F")
    record_failure(Failure(UPDATE_QUANTITY, "t-1", "f-1", "WO-F", ["WO-F", "input", 1], kwargs, error, 1))
    listed = _operator(api, "GET", "/api/failed").body
    assert [(x["request_id"], x["error_code"]) for x in listed] == [("f-1", "UNKNOWN_WORK_ORDER")]
    assert _operator(api, "GET", f"/api/failed/{listed[0]['id']}").body["request_id"] == "f-1"
    assert _operator(api, "POST", "/api/failed/discard", {"ids": [listed[0]["id"]]}).status == 400
    both = _operator(api, "POST", "/api/failed/retry", {"ids": [listed[0]["id"]], "all": True})
    assert both.status == 400 and both.body["code"] == "USAGE"
    retried = _operator(api, "POST", "/api/failed/retry", {"ids": [listed[0]["id"]]})
    assert retried.status == 200 and retried.body["re_sent"][0]["request_id"] == "f-1"
    assert OutboxMessage.objects(request_id="f-1").count() == 1  # sent the producer's way
    make_work_orders(["WO-A"], input_qty=0)
    report = _operator(api, "POST", "/api/audit/run", {"work_order_ids": ["WO-A"]})
    assert report.status == 200 and report.body["finding_count"] == 0
    assert _operator(api, "GET", f"/api/audit/{report.body['id']}").body["id"] == report.body["id"]
    assert [r["id"] for r in _operator(api, "GET", "/api/audit?limit=5").body] == [report.body["id"]]
    missing = _operator(api, "GET", "/api/audit/not-an-id")
    assert missing.status in (400, 404) and missing.body["code"] in ("INVALID_REPORT_ID", "REPORT_NOT_FOUND")
    doctor = _operator(api, "GET", "/api/doctor")
    assert doctor.status == 200 and doctor.body
