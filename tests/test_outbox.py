"""Broker down at the producer: spooled to the MongoDB outbox, relayed once it is back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from conftest import Worker, make_work_orders, wait_until
from mes_tasks import outbox
from mes_tasks.db import Mongo
from mes_tasks.devserver import Service
from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder
from mes_tasks.producer import Producer, publish
from mes_tasks.settings import Settings


def with_redis_down(servers: dict[str, Service], call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    servers["redis"].stop()
    try:
        return call()
    finally:
        servers["redis"].start()


def test_a_broker_that_is_down_spools_and_the_relay_applies_each_update_once(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service], start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    producer = Producer()
    results = with_redis_down(
        servers,
        lambda: {"a": producer.submit("WO-1", "input", 2, "sp-1"), "b": producer.submit("WO-1", "input", 3)},
    )
    for result in results.values():
        assert (result["success"], result["code"], result["recorded"]) == (True, "SPOOLED", True)
        assert result["error"]  # the broker's reason, kept for the operator
    assert OutboxMessage.objects.count() == 2
    assert redis_client.llen("workorder") == 0

    start_worker()
    assert outbox.relay(publish) == 2
    assert outbox.relay(publish) == 0  # nothing left
    wait_until(lambda: QuantityLog.objects.count() == 2, 30, "the relayed updates")
    spooled = OutboxMessage(job_id="x", request_id="sp-1", payload='{"args": ["WO-1", "input", 2], '
                            '"kwargs": {"request_id": "sp-1", "context": null}}')  # fmt: skip
    spooled.save()  # a relay that crashed after publishing, before deleting: it comes again
    assert outbox.relay(publish) == 1
    wait_until(lambda: redis_client.llen("workorder") == 0, 30, "the re-published duplicate")
    assert WorkOrder.objects.get(id="WO-1").input_qty == 5
    assert QuantityLog.objects(request_id="sp-1").count() == 1


def test_the_relay_keeps_everything_while_the_broker_is_still_down(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    producer = Producer()
    with_redis_down(servers, lambda: producer.submit("WO-1", "input", 2, "sp-2"))
    relayed = with_redis_down(servers, lambda: {"n": outbox.relay(publish)})
    assert relayed["n"] == 0
    message = OutboxMessage.objects.get(request_id="sp-2")
    assert message.attempts == 1 and message.last_error


def test_both_stores_down_is_a_clear_error_that_nothing_was_recorded(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service], settings: Settings
) -> None:
    dead_mongo = Settings(
        **{**settings.__dict__, "mongodb_uri": "mongodb://127.0.0.1:1/mes", "connect_timeout_s": 0.5}
    )
    producer = Producer(settings=dead_mongo)
    result = with_redis_down(servers, lambda: producer.submit("WO-1", "input", 2, "lost-1"))
    assert (result["success"], result["code"], result["recorded"], result["job_id"]) == (
        False, "QUEUE_ERROR", False, None)  # fmt: skip
    assert result["error"].startswith("nothing was recorded")
    assert OutboxMessage.objects.count() == 0
