"""Submissions during a broker outage answer within about a second, whatever the outage looks like
(Redis refusing connections, or a Redis that goes silent), and ``QUEUED`` always means the broker
took the message, in a producer that lived through outages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from conftest import with_redis_down
from devtools.devserver import Service
from devtools.faultproxy import FaultProxy
from mes_tasks import broker
from mes_tasks.api.submit import submit_one
from mes_tasks.app import app
from mes_tasks.models import OutboxMessage
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.send.producer import Producer
from mes_tasks.settings import Settings

ANSWER_BOUND_S = 3.0  # "about a second", with a generous margin for a loaded test machine
BURST = 300  # a scanner burst


def items(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"work_order_id": f"WO-{i % 7}", "kind": "input", "quantity": 1, "request_id": f"{prefix}-{i}"}
            for i in range(n)]  # fmt: skip


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def in_broker() -> dict[str, int]:
    with app.connection_for_read() as conn:
        return broker.held_task_ids(conn.default_channel, WORKORDER_QUEUE)


@pytest.fixture()
def proxy(servers: dict[str, Service]) -> Iterator[FaultProxy]:
    faulty = FaultProxy(servers["redis"].port).start()
    yield faulty
    faulty.close()


def test_a_batch_answers_within_about_a_second_while_redis_refuses_connections(
    services: redis.Redis, servers: dict[str, Service]
) -> None:
    producer = Producer()
    assert {r["code"] for r in producer.submit_many(items(3, "warm"))} == {"QUEUED"}  # a pooled connection
    answers, took = with_redis_down(
        servers, lambda: timed(lambda: producer.submit_many(items(BURST, "down")))
    )
    assert took < ANSWER_BOUND_S, f"a batch of {BURST} held its caller {took:.1f} s"
    assert {(a["code"], a["recorded"]) for a in answers} == {("SPOOLED", True)}
    assert OutboxMessage.objects(state="spooled").count() == BURST


def test_a_batch_and_a_single_update_answer_within_about_a_second_while_redis_is_silent(
    services: redis.Redis, settings: Settings, proxy: FaultProxy
) -> None:
    producer = Producer(replace(settings, redis_url=f"redis://127.0.0.1:{proxy.port}/3"))
    assert {r["code"] for r in producer.submit_many(items(3, "warm"))} == {"QUEUED"}
    proxy.stall(30)  # every connection, open or new, forwards nothing: a frozen or cut-off Redis
    answers, took = timed(lambda: producer.submit_many(items(BURST, "silent")))
    one, took_one = timed(lambda: producer.submit("WO-1", "input", 1, "silent-one"))
    gateway_item = {"work_order_id": "WO-1", "kind": "input", "quantity": 1, "request_id": "silent-http"}
    over_http, took_http = timed(lambda: submit_one(producer, gateway_item))  # the sent marks read first
    proxy.clear()
    assert took < ANSWER_BOUND_S, f"a batch of {BURST} held its caller {took:.1f} s"
    assert took_one < ANSWER_BOUND_S, f"a single update held its caller {took_one:.1f} s"
    assert took_http < ANSWER_BOUND_S, f"a gateway submission held its caller {took_http:.1f} s"
    assert {a["code"] for a in answers} == {"SPOOLED"} and one["code"] == over_http["code"] == "SPOOLED"
    assert OutboxMessage.objects(state="spooled").count() == BURST + 2


def test_every_update_answered_queued_is_in_the_broker_in_a_producer_that_lived_through_an_outage(
    services: redis.Redis, servers: dict[str, Service]
) -> None:
    producer = Producer()
    producer.submit_many(items(10, "before"))
    with_redis_down(servers, lambda: producer.submit_many(items(BURST, "during")))
    after = producer.submit_many(items(3000, "after"))
    queued = {a["job_id"] for a in after if a["code"] == "QUEUED"}
    assert len(queued) == 3000
    assert queued <= in_broker().keys()
