"""The producer helper: validates, enqueues, and answers with a dict, never an exception."""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

import pytest
import redis

from cases import BAD_INPUTS, GOOD
from devtools.devserver import Service
from mes_tasks.keys import apply_ms_key, sent_key
from mes_tasks.models import QuantityLog
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.send.producer import SENT_MARK_S, Producer, submit_quantity_update, submit_quantity_updates

# An error in a result handle's __del__ (a talk to a Redis that is down) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_a_queued_update_reports_its_job_queue_length_and_estimated_delay(redis_client: redis.Redis) -> None:
    redis_client.set(apply_ms_key("mes:"), "20")
    first = submit_quantity_update("WO-1", "output", 1, request_id="r1")
    second = submit_quantity_update("WO-1", "output", 1)
    assert first["success"] and first["code"] == "QUEUED" and first["request_id"] == "r1"
    assert (first["queue_length"], first["estimated_delay_ms"]) == (1, 40)
    assert (second["queue_length"], second["estimated_delay_ms"]) == (2, 60)
    assert second["request_id"] == second["job_id"]  # no request id given: the task id stands in
    assert redis_client.llen(WORKORDER_QUEUE) == 2


def test_request_ids_sent_lately_are_told_from_the_others_and_old_marks_are_trimmed(
    redis_client: redis.Redis,
) -> None:
    sent = sent_key("mes:")
    redis_client.zadd(
        sent, {"long-ago": time.time() - SENT_MARK_S - 5, "lingering": time.time() - SENT_MARK_S - 1}
    )
    submit_quantity_update("WO-1", "input", 1, request_id="one")
    submit_quantity_updates([{"work_order_id": "WO-1", "kind": "input", "quantity": 1, "request_id": f"b{i}"}
                             for i in range(3)])  # fmt: skip
    assert Producer().sent_before(["one", "b0", "b2", "never", "long-ago"]) == {"one", "b0", "b2"}
    assert redis_client.zscore(sent, "long-ago") is None  # trimmed as new marks came in
    assert 0 < redis_client.ttl(sent) <= SENT_MARK_S  # an idle deployment drops the set
    redis_client.zadd(sent, {"lingering": time.time() - SENT_MARK_S - 1})
    assert Producer().sent_before(["lingering"]) == set()  # not yet trimmed, but too old all the same


@pytest.mark.parametrize(("override", "code"), BAD_INPUTS)
def test_bad_input_is_refused_by_the_producer_and_nothing_is_queued_or_written(
    redis_client: redis.Redis, override: dict[str, Any], code: str
) -> None:
    result = submit_quantity_update(**{**GOOD, **override})
    assert result == {"success": False, "job_id": None, "code": code, "error": result["error"]}
    assert redis_client.llen(WORKORDER_QUEUE) == 0
    assert QuantityLog.objects.count() == 0


def test_a_broker_that_is_down_never_raises_to_the_caller(
    redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    servers["redis"].stop()
    try:
        result = Producer().submit("WO-1", "input", 1, request_id="down-1")
    finally:
        servers["redis"].start()
    assert (result["success"], result["code"]) == (True, "SPOOLED")  # see test_outbox
    assert result["error"]  # the broker's reason
    assert submit_quantity_update("WO-1", "input", 1, request_id="up-again")["code"] == "QUEUED"


def test_a_delay_with_redis_down_returns_in_about_a_second_and_spools(
    redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    import time

    from mes_tasks.models import OutboxMessage
    from mes_tasks.tasks import update_quantity

    servers["redis"].stop()
    try:
        started = time.monotonic()
        update_quantity.delay("WO-1", "input", 1, request_id="d-down")
        took = time.monotonic() - started
    finally:
        servers["redis"].start()
    assert took < 5  # was about 20 s: the result store's reconnect, and no publish retry policy
    assert OutboxMessage.objects.get(request_id="d-down").state == "spooled"


def test_a_spooled_delay_handle_dropped_while_redis_is_down_raises_nothing_later(
    redis_client: redis.Redis, servers: dict[str, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mes_tasks.tasks import update_quantity

    waited = update_quantity.delay("WO-1", "input", 1, request_id="d-up")  # the app's result channel
    del waited
    gc.collect()  # its subscription ends while Redis is up
    unraisable: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    )
    servers["redis"].stop()
    try:
        update_quantity.delay("WO-1", "input", 1, request_id="d-dropped")  # its handle dropped at once
        gc.collect()
    finally:
        servers["redis"].start()
    assert unraisable == []


def test_with_mongodb_down_an_update_is_queued_and_says_it_was_not_recorded(
    redis_client: redis.Redis,
) -> None:
    from dataclasses import replace

    from mes_tasks.keys import unrecorded_key
    from mes_tasks.settings import get_settings

    settings = replace(get_settings(), mongodb_uri="mongodb://127.0.0.1:1/mes", connect_timeout_s=0.3)
    producer = Producer(settings)
    first = producer.submit("WO-1", "input", 1, request_id="nomongo-1")
    second = producer.submit("WO-1", "input", 1, request_id="nomongo-2")  # skips the outbox a moment
    for result in (first, second):
        assert (result["success"], result["code"], result["recorded"]) == (True, "QUEUED", False)
    assert producer.unrecorded == 2 and redis_client.get(unrecorded_key("mes:")) == "2"
    assert redis_client.llen(WORKORDER_QUEUE) == 2
