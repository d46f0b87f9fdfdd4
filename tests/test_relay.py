"""The outbox relay costs what is overdue, not what the outbox holds: it reads only overdue entries,
looks again at an update the broker still holds only after a while, and keeps every run short."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import redis

from mes_tasks import broker
from mes_tasks.app import app
from mes_tasks.db import Mongo
from mes_tasks.models import OutboxMessage, QuantityLog, utcnow
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.send import relay
from mes_tasks.send.producer import Producer, publish
from mes_tasks.tasks import relay_outbox

RUN_BOUND_S = 3.0  # a run must end well before beat's next ones pile up; generous for a loaded machine


def entries(n: int, prefix: str, **fields: Any) -> list[dict[str, Any]]:
    return [{"job_id": f"{prefix}-{i}", "request_id": f"{prefix}-{i}", "attempts": 0,
             "payload": json.dumps({"args": ["WO-1", "input", 1], "kwargs": {"request_id": f"{prefix}-{i}"}}),
             **fields} for i in range(n)]  # fmt: skip


def applied(request_ids: list[str]) -> None:
    log = {"work_order_id": "WO-1", "kind": "input", "quantity": 1, "value_after": 1, "epoch": 1}
    QuantityLog._get_collection().insert_many([{"request_id": rid, **log} for rid in request_ids])


def test_a_relay_run_reads_only_overdue_entries(mongo: Mongo, redis_client: redis.Redis) -> None:
    fresh = entries(2000, "fresh", state="sent", sent_at=utcnow())
    old = entries(5, "old", state="sent", sent_at=utcnow() - timedelta(hours=1))
    OutboxMessage._get_collection().insert_many(fresh + old)
    applied([e["request_id"] for e in fresh + old])  # every one has its outcome
    assert relay_outbox(grace_s=60)["settled"] == 5  # the fresh ones are not even looked at yet
    assert OutboxMessage.objects(state="sent").count() == 2000


def test_an_update_the_broker_still_holds_is_looked_at_again_only_after_a_while(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    producer = Producer()
    assert {r["code"] for r in producer.submit_many([
        {"work_order_id": "WO-1", "kind": "input", "quantity": 1, "request_id": f"q-{i}"} for i in range(200)
    ])} == {"QUEUED"}  # fmt: skip
    reads = []

    def held() -> set[str]:
        reads.append(1)
        with app.connection_for_read() as conn:
            return broker.held_task_ids(conn.default_channel, WORKORDER_QUEUE)

    OutboxMessage._get_collection().update_many({}, {"$set": {"sent_at": utcnow() - timedelta(hours=1)}})
    for _ in range(3):
        assert relay.relay(publish, held, grace_s=3).republished == 0
    assert len(reads) == 1  # one broker read found them all waiting; the next runs leave them be
    assert OutboxMessage.objects(sent_at__lt=utcnow()).count() == 0


def test_an_update_near_the_head_of_a_long_queue_that_the_broker_loses_is_resent_within_seconds(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    """A BRPOP whose reply is never read (its connection dropped, or gone silent) pops the
    message at the head of its queue for nobody. The relay had postponed every held update by
    the length of the whole queue (1,000 held: 10 s; seen as a 12 s recovery in the chaos run);
    each now waits for what its queue delivers before it."""
    producer = Producer()
    assert {r["code"] for r in producer.submit_many([
        {"work_order_id": "WO-1", "kind": "input", "quantity": 1, "request_id": f"q-{i}"} for i in range(1000)
    ])} == {"QUEUED"}  # fmt: skip

    def held() -> dict[str, int]:
        with app.connection_for_read() as conn:
            return broker.held_task_ids(conn.default_channel, WORKORDER_QUEUE)

    assert sorted(held().values()) == list(range(1000))  # each with the messages ahead of it
    OutboxMessage._get_collection().update_many({}, {"$set": {"sent_at": utcnow() - timedelta(hours=1)}})
    assert relay.relay(publish, held, grace_s=1, budget_s=60).republished == 0  # all waiting: later
    lost = broker.task_id_of(redis_client.rpop(WORKORDER_QUEUE))  # the head, popped for nobody
    time.sleep(2.5)  # the head's snooze (a relay interval, 1 s), then the grace (1 s)
    result = relay.relay(publish, held, grace_s=1, budget_s=60)
    assert result.republished == 1
    assert broker.task_id_of(redis_client.lindex(WORKORDER_QUEUE, 0)) == lost  # sent again


def test_a_relay_run_stays_short_however_many_updates_are_spooled(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    n = 3000
    OutboxMessage._get_collection().insert_many(entries(n, "sp", state="spooled"))
    started = time.monotonic()
    first = relay_outbox(grace_s=60)["published"]
    took = time.monotonic() - started
    assert took < RUN_BOUND_S, f"one relay run took {took:.1f} s"
    published, runs = first, 1
    while published < n and runs < 100:
        published, runs = published + relay_outbox(grace_s=60)["published"], runs + 1
    assert published == n and redis_client.llen(WORKORDER_QUEUE) == n
    assert OutboxMessage.objects(state="spooled").count() == 0


def test_spooled_updates_the_broker_refused_at_the_start_of_a_run_go_out_at_its_end(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    """The broker comes back while a run looks at overdue entries: the spooled ones (a count a
    correction overtook) are published in that run, not a run later."""
    OutboxMessage._get_collection().insert_many(entries(3, "back", state="spooled"))
    long_ago = utcnow() - timedelta(seconds=120)
    OutboxMessage._get_collection().insert_many(entries(1, "lost", state="sent", sent_at=long_ago))
    refusals = [OSError("broker still down")]

    def publish_once_back(job_id: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if refusals:
            raise refusals.pop()
        return publish(job_id, args, kwargs)

    result = relay.relay(publish_once_back, lambda: {}, grace_s=60)
    assert (result.published, result.republished) == (3, 1)  # the broker read: the lost one sent again
    assert redis_client.llen(WORKORDER_QUEUE) == 4
    assert OutboxMessage.objects(state="spooled").count() == 0
