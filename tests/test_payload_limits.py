"""Oversized updates are refused once and recorded in bounded dead letters, never looped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import bson
import pytest

from conftest import Worker, make_work_orders, wait_until
from mes_tasks.app import app
from mes_tasks.apply.deadletter import MAX_HISTORY, Failure, record_failure
from mes_tasks.db import Mongo
from mes_tasks.errors import MesError, ValidationError
from mes_tasks.models import CONTEXT_FIELDS, FailedUpdate, QuantityLog, WorkOrder
from mes_tasks.tasks import UPDATE_QUANTITY
from mes_tasks.validation import (
    MAX_ABS_QUANTITY,
    MAX_CONTEXT_VALUE_LEN,
    MAX_REQUEST_ID_LEN,
    MAX_WORK_ORDER_ID_LEN,
    check_update_size,
    validate_update,
)

SIX_MB = 6_000_000
RECORD_MAX_BYTES = 100_000


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def circular() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


HUGE_CONTEXTS: dict[str, Callable[[], Any]] = {
    "a 6 MB key": lambda: {"k" * SIX_MB: "v"},
    "a 6 MB value": lambda: {"reason": "v" * SIX_MB},
    "a million keys": lambda: {f"k{i}": "v" for i in range(1_000_000)},
    "a list nested 100,000 deep": lambda: {"reason": nested(100_000)},
    "a list that contains itself": lambda: {"reason": circular()},
}


@pytest.mark.parametrize("make", HUGE_CONTEXTS.values(), ids=HUGE_CONTEXTS.keys())
def test_a_huge_update_is_refused_first_as_update_too_large_with_a_short_message(
    make: Callable[[], Any],
) -> None:
    context = make()
    started = time.monotonic()
    with pytest.raises(ValidationError) as err:
        validate_update("WO-1", "input", 5, "x", context)
    assert time.monotonic() - started < 0.5
    assert err.value.code == "UPDATE_TOO_LARGE"
    assert len(err.value.message) < 300


def test_the_send_path_check_refuses_huge_raw_arguments_and_passes_normal_ones() -> None:
    with pytest.raises(ValidationError) as err:
        check_update_size(["WO-1", "input", 5], {"request_id": "x", "context": {"k" * SIX_MB: "v"}})
    assert err.value.code == "UPDATE_TOO_LARGE" and len(err.value.message) < 300
    check_update_size(["WO-1", "input", 5], {"request_id": "x", "context": {"barcode": "BC1"}})
    check_update_size(["WO-1", "input", 5, "x"], None)


def test_the_largest_update_the_field_checks_accept_is_within_the_size_limit() -> None:
    worst = "\x01"  # every character escaped as \u0001, six bytes of JSON
    context = {key: worst * MAX_CONTEXT_VALUE_LEN for key in CONTEXT_FIELDS}
    wo, rid = worst * MAX_WORK_ORDER_ID_LEN, worst * MAX_REQUEST_ID_LEN
    req = validate_update(wo, "output", -MAX_ABS_QUANTITY, rid, context)
    assert req.context == context
    check_update_size([wo, "output", -MAX_ABS_QUANTITY], {"request_id": rid, "context": context})


# -- dead letters ---------------------------------------------------------------------------


def fail(
    request_id: str = "x", context: Any = None, error: MesError | None = None, task_id: str = "t1"
) -> None:
    record_failure(Failure(UPDATE_QUANTITY, task_id, request_id, "WO-1", ["WO-1", "input", 5],
                           {"request_id": request_id, "context": context},
                           error or ValidationError("bad", code="INVALID_CONTEXT"), 1))  # fmt: skip


def stored(request_id: str = "x") -> dict[str, Any]:
    doc = FailedUpdate._get_collection().find_one({"request_id": request_id})
    assert doc is not None, f"no dead letter for {request_id[:40]!r}"
    return doc  # type: ignore[no-any-return]


def test_a_6_mb_payload_and_message_make_a_bounded_dead_letter(mongo: Mongo) -> None:
    fail(context={"k" * SIX_MB: "v"}, error=ValidationError("m" * SIX_MB, code="UPDATE_TOO_LARGE"))
    doc = stored()
    assert len(bson.encode(doc)) < RECORD_MAX_BYTES
    assert doc["payload_truncated"] is True
    assert doc["payload"].startswith('{"args": ["WO-1", "input", 5], "kwargs": {"request_id": "x"')
    assert doc["error_code"] == "UPDATE_TOO_LARGE"
    assert len(doc["error_message"]) < 1100 and doc["error_message"].endswith(f"…({SIX_MB} chars)")
    assert doc["history"][0]["message"] == doc["error_message"]
    assert FailedUpdate.objects.get(request_id="x").attempts == 1  # the model still reads it


def test_a_normal_payload_is_kept_whole_as_json(mongo: Mongo) -> None:
    fail(context={"barcode": "BC1"})
    doc = stored()
    assert doc["payload_truncated"] is False
    assert json.loads(doc["payload"])["kwargs"]["context"] == {"barcode": "BC1"}


def test_a_request_that_keeps_failing_keeps_only_its_last_events(mongo: Mongo) -> None:
    for n in range(MAX_HISTORY + 10):
        fail(context={"reason": "r" * 400}, task_id=f"t{n}")
    doc = stored()
    assert doc["attempts"] == MAX_HISTORY + 10
    assert [e["task_id"] for e in doc["history"]] == [f"t{n}" for n in range(10, MAX_HISTORY + 10)]


def test_a_record_the_server_cannot_encode_is_kept_without_its_payload(mongo: Mongo) -> None:
    fail(error=ValidationError("context['reason'] is '\ud800'", code="INVALID_CONTEXT"))
    doc = stored()
    assert doc["payload"] is None and doc["payload_truncated"] is True
    assert doc["error_code"] == "INVALID_CONTEXT" and doc["error_message"] == "context['reason'] is '?'"
    assert "payload not kept" in doc["history"][0]["note"]


def test_a_request_id_too_long_to_index_is_filed_under_its_digest(mongo: Mongo) -> None:
    fail(request_id="r" * SIX_MB)
    (doc,) = FailedUpdate._get_collection().find({})
    assert "sha256" in doc["request_id"] and len(doc["request_id"]) < 200
    assert len(bson.encode(doc)) < RECORD_MAX_BYTES


@pytest.mark.slow
def test_a_worker_dead_letters_a_6_mb_update_once_logs_little_and_goes_on(
    start_worker: Callable[..., Worker],
) -> None:
    make_work_orders(["WO-1"])
    worker = start_worker()
    # Sent past the producer's own checks, as an older client would.
    huge = {"request_id": "huge", "context": {"k" * SIX_MB: "v"}}
    app.send_task(UPDATE_QUANTITY, ["WO-1", "input", 5], huge, ignore_result=True)
    app.send_task(UPDATE_QUANTITY, ["WO-1", "input", 2], {"request_id": "after"}, ignore_result=True)
    wait_until(lambda: QuantityLog.objects(request_id="after").count() == 1, 60, "the normal update")
    record = FailedUpdate.objects.get(request_id="huge")
    assert (record.error_code, record.attempts, len(record.history)) == ("UPDATE_TOO_LARGE", 1, 1)
    assert WorkOrder.objects.get(id="WO-1").input_qty == 2
    assert len(worker.log()) < RECORD_MAX_BYTES, worker.log()[-2000:]
