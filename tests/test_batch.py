"""Batch submission: one outbox write and one pipelined publish for a scanner burst, an answer
per item in order, each item refused on its own, and every update counted exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from pymongo import MongoClient, monitoring

from conftest import Worker, make_work_orders, outbox_waiting, wait_until, with_redis_down
from devtools.devserver import Service
from mes_tasks.db import Mongo
from mes_tasks.keys import apply_ms_key, unrecorded_key
from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder, utcnow
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.send.producer import Producer, submit_quantity_update, submit_quantity_updates
from mes_tasks.settings import Settings
from mes_tasks.tasks import relay_outbox
from mes_tasks.validation import MAX_UPDATE_BYTES


def item(wo: str, kind: str, quantity: int, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    given = {"work_order_id": wo, "kind": kind, "quantity": quantity, "request_id": request_id, **extra}
    return {k: v for k, v in given.items() if v is not None}


class Inserts(monitoring.CommandListener):
    """Counts the insert commands a real client sends to the outbox."""

    def __init__(self) -> None:
        self.outbox = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert" and event.command.get("insert") == "outbox":
            self.outbox += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def counted_producer(settings: Settings) -> tuple[Producer, Inserts]:
    inserts = Inserts()
    producer = Producer(settings)
    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_uri, event_listeners=[inserts])
    producer._outbox = client[settings.mongodb_db]["outbox"]
    return producer, inserts


BAD_ITEMS: list[tuple[Any, str]] = [
    ("WO-1 input 3", "INVALID_ITEM"),
    ({"work_order_id": "WO-1", "kind": "input", "quantity": 1, "countdown": 5}, "INVALID_ITEM"),
    (item("WO-1", "input", 0), "INVALID_QUANTITY"),
    ({"kind": "input", "quantity": 1}, "MISSING_WORK_ORDER_ID"),
    (item("WO-1", "scrap", 1), "INVALID_KIND"),
    (item("WO-1", "input", 1, context={"reason": "x" * MAX_UPDATE_BYTES}), "UPDATE_TOO_LARGE"),
]


def test_a_batch_answers_every_item_in_order_and_records_the_good_ones_in_one_insert(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    redis_client.set(apply_ms_key("mes:"), "10")
    producer, inserts = counted_producer(settings)
    good = [item("WO-1", "input", 2, "b-1"), item("WO-2", "output", 1, "b-2"), item("WO-1", "input", 1)]
    batch = [good[0], *(bad for bad, _ in BAD_ITEMS), good[1], item("WO-1", "input", 2, "b-1"), good[2]]
    batch.append(item("WO-1", "input", 5, "b-2"))  # b-2's request id, for a different update
    results = producer.submit_many(batch)

    codes = ["QUEUED", *(code for _, code in BAD_ITEMS), "QUEUED", "QUEUED", "QUEUED", "REQUEST_ID_CONFLICT"]
    assert [r["code"] for r in results] == codes
    first, second, repeat, third = results[0], results[7], results[8], results[9]
    assert repeat == {**first, "duplicate_of": 0}  # the same update again: the first one's answer
    assert "item 7" in results[10]["error"] and results[10]["job_id"] is None
    assert all(r["error"] and r["job_id"] is None and not r["success"] for r in results[1:7])
    assert third["request_id"] == third["job_id"]  # no request id given: the job id stands in
    assert [r["queue_length"] for r in (first, second, third)] == [3, 3, 3]
    assert [r["estimated_delay_ms"] for r in (first, second, third)] == [20, 30, 40]  # by place in the queue

    assert inserts.outbox == 1  # one outbox write for the batch
    assert sorted(e.request_id for e in OutboxMessage.objects(state="sent")) == sorted(
        [first["request_id"], second["request_id"], third["request_id"]]
    )
    assert redis_client.llen(WORKORDER_QUEUE) == 3  # one message per distinct update


def test_an_empty_batch_writes_nothing_and_a_string_is_a_mistake_at_the_call_site(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    assert submit_quantity_updates([]) == []
    assert outbox_waiting() == 0 and redis_client.llen(WORKORDER_QUEUE) == 0
    with pytest.raises(TypeError, match="list of items"):
        submit_quantity_updates("WO-1")  # type: ignore[arg-type]


def test_a_worker_applies_a_batch_exactly_once_even_with_request_ids_sent_before(
    mongo: Mongo, redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1", "WO-2"])
    assert submit_quantity_update("WO-1", "input", 4, request_id="early-1")["code"] == "QUEUED"
    batch = [item("WO-1", "input", 4, "early-1")]  # sent before the batch: the worker's log decides
    batch += [item(f"WO-{1 + i % 2}", ("input", "output")[i % 2], 1 + i % 3, f"burst-{i}") for i in range(30)]
    batch += [item("WO-2", "output", 2, "burst-1"), {"work_order_id": "WO-1"}]  # a repeat, a bad item
    results = submit_quantity_updates(batch)
    assert [r["code"] for r in results[-2:]] == ["QUEUED", "INVALID_KIND"]
    assert results[-2]["duplicate_of"] == 2
    assert all(r["code"] == "QUEUED" for r in results[:-1])

    worker = start_worker()
    wait_until(lambda: QuantityLog.objects.count() == 31, 60, "the batch applied")
    wait_until(lambda: redis_client.llen(WORKORDER_QUEUE) == 0, 30, "the queue drained")
    wait_until(lambda: "duplicate" in worker.log(), 30, "the early request id's second message")
    wo1, wo2 = WorkOrder.objects.get(id="WO-1"), WorkOrder.objects.get(id="WO-2")
    inputs = sum(1 + i % 3 for i in range(0, 30, 2))
    outputs = sum(1 + i % 3 for i in range(1, 30, 2))
    assert (wo1.input_qty, wo1.output_qty, wo2.input_qty, wo2.output_qty) == (4 + inputs, 0, 0, outputs)
    assert QuantityLog.objects(request_id="early-1").count() == 1


def test_a_batch_sent_while_redis_is_down_is_spooled_and_applied_once_after_it_returns(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service], start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    batch = [item("WO-1", "input", 1 + i, f"down-{i}") for i in range(10)] + [item("WO-1", "input", 0)]
    started = time.monotonic()
    results = with_redis_down(servers, lambda: submit_quantity_updates(batch))
    assert time.monotonic() - started < 5  # the publish retry policy's wait, not a timeout per item
    assert [r["code"] for r in results] == ["SPOOLED"] * 10 + ["INVALID_QUANTITY"]
    assert all(r["success"] and r["recorded"] and r["error"] for r in results[:10])
    assert OutboxMessage.objects(state="spooled").count() == 10
    assert redis_client.llen(WORKORDER_QUEUE) == 0

    after = submit_quantity_updates([item("WO-1", "output", 3, "back-1")])  # a pooled connection gone stale
    assert after[0]["code"] == "QUEUED"
    start_worker()
    assert relay_outbox(grace_s=60)["published"] == 10
    wait_until(lambda: QuantityLog.objects.count() == 11, 60, "the spooled batch applied")
    past = utcnow() - timedelta(minutes=1)  # every entry's turn passed: the relay looks at each
    OutboxMessage._get_collection().update_many({"state": "sent"}, {"$set": {"sent_at": past}})
    assert relay_outbox(grace_s=0)["settled"] == 11  # each entry settled: it has its outcome
    assert outbox_waiting() == 0
    assert relay_outbox(grace_s=0) == {"published": 0, "settled": 0, "republished": 0, "set_aside": 0}
    wo = WorkOrder.objects.get(id="WO-1")
    assert (wo.input_qty, wo.output_qty) == (sum(range(1, 11)), 3)


def test_a_batch_with_both_stores_down_tells_each_item_that_nothing_was_recorded(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service], settings: Settings
) -> None:
    producer = Producer(replace(settings, mongodb_uri="mongodb://127.0.0.1:1/mes", connect_timeout_s=0.5))
    batch = [item("WO-1", "input", 2, "lost-1"), item("WO-1", "input", 2, "lost-2"), item("WO-1", "kind", 2)]
    results = with_redis_down(servers, lambda: producer.submit_many(batch))
    lost, bad = (False, "QUEUE_ERROR", False), (False, "INVALID_KIND", None)
    assert [(r["success"], r["code"], r.get("recorded")) for r in results] == [lost, lost, bad]
    assert results[0]["error"].startswith("nothing was recorded")
    assert outbox_waiting() == 0


def test_with_mongodb_down_a_batch_is_queued_and_counted_as_unrecorded(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    producer = Producer(replace(settings, mongodb_uri="mongodb://127.0.0.1:1/mes", connect_timeout_s=0.3))
    results = producer.submit_many([item("WO-1", "input", 1, f"nomongo-{i}") for i in range(5)])
    assert {(r["code"], r["recorded"]) for r in results} == {("QUEUED", False)}
    assert producer.unrecorded == 5 and redis_client.get(unrecorded_key("mes:")) == "5"
    assert redis_client.llen(WORKORDER_QUEUE) == 5


def test_a_batch_larger_than_the_limit_is_refused_whole_with_the_limit_and_nothing_is_sent(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    from mes_tasks.send.producer import MAX_BATCH_ITEMS

    results = submit_quantity_updates(
        [item("WO-1", "input", 1, f"big-{i}") for i in range(MAX_BATCH_ITEMS + 1)]
    )
    assert len(results) == MAX_BATCH_ITEMS + 1
    assert {(r["success"], r["code"], r["job_id"]) for r in results} == {(False, "BATCH_TOO_LARGE", None)}
    assert f"at most {MAX_BATCH_ITEMS:,}" in results[0]["error"]
    assert outbox_waiting() == 0 and redis_client.llen(WORKORDER_QUEUE) == 0


def test_the_relay_never_takes_an_update_of_a_batch_still_being_written_for_lost(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    import threading

    stop, resent = threading.Event(), []

    def relay_all_along() -> None:  # as beat would, with no grace at all
        while not stop.is_set():
            resent.append(relay_outbox(grace_s=0)["republished"])

    relaying = threading.Thread(target=relay_all_along)
    relaying.start()
    try:
        results = submit_quantity_updates([item("WO-1", "input", 1, f"w-{i}") for i in range(3000)])
    finally:
        stop.set()
        relaying.join()
    assert {r["code"] for r in results} == {"QUEUED"}
    assert (
        len(resent) > 1 and sum(resent) == 0
    )  # the relay ran while the batch was written, and re-sent nothing
    assert redis_client.llen(WORKORDER_QUEUE) == 3000
