"""The outbox: every submission recorded until it has an outcome; spooled while the broker is down,
re-sent when the broker lost it, and never counted twice."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis

from conftest import Worker, make_work_orders, outbox_waiting, wait_until, with_redis_down
from devtools.devserver import Service
from mes_tasks.db import Mongo
from mes_tasks.errors import QueueError
from mes_tasks.models import OutboxMessage, QuantityLog, WorkOrder, utcnow
from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.send.producer import Producer
from mes_tasks.settings import Settings
from mes_tasks.tasks import relay_outbox, update_quantity


def relay(grace_s: float = 0.0) -> dict[str, int]:
    return relay_outbox(grace_s=grace_s)


def overdue() -> None:
    """Every sent entry's turn in the queue passed a minute ago."""
    past = utcnow() - timedelta(minutes=1)
    OutboxMessage._get_collection().update_many({"state": "sent"}, {"$set": {"sent_at": past}})


def settle() -> dict[str, int]:
    """A relay run once every sent entry is overdue."""
    overdue()
    return relay()


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
    assert OutboxMessage.objects(state="spooled").count() == 2
    assert redis_client.llen(WORKORDER_QUEUE) == 0

    worker = start_worker()
    assert relay(grace_s=60)["published"] == 2
    assert relay(grace_s=60)["published"] == 0  # sent now, waiting for their outcome
    wait_until(lambda: QuantityLog.objects.count() == 2, 30, "the relayed updates")
    assert relay(grace_s=60)["settled"] == 0  # not overdue yet: not even looked at
    assert settle()["settled"] == 2 and outbox_waiting() == 0  # both have an outcome now
    OutboxMessage(job_id="x", request_id="sp-1", state="spooled", payload='{"args": ["WO-1", "input", 2], '
                  '"kwargs": {"request_id": "sp-1", "context": null}}').save()  # fmt: skip
    # A relay that crashed before marking it sent: it comes again, and is settled already.
    assert relay(grace_s=60) == {"published": 1, "settled": 0, "republished": 0, "set_aside": 0}
    assert settle() == {"published": 0, "settled": 1, "republished": 0, "set_aside": 0}
    wait_until(lambda: redis_client.llen(WORKORDER_QUEUE) == 0, 30, "the re-published duplicate")
    wait_until(lambda: "duplicate" in worker.log(), 30, "the duplicate's outcome")
    assert WorkOrder.objects.get(id="WO-1").input_qty == 5
    assert QuantityLog.objects(request_id="sp-1").count() == 1


def test_every_queued_submission_is_recorded_until_its_update_has_an_outcome(
    mongo: Mongo, redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    assert Producer().submit("WO-1", "input", 2, "q-1")["code"] == "QUEUED"
    assert Producer().submit("WO-NONE", "input", 2, "q-2")["code"] == "QUEUED"  # dead-lettered later
    entries = {e.request_id: e for e in OutboxMessage.objects}
    assert set(entries) == {"q-1", "q-2"} and {e.state for e in entries.values()} == {"sent"}
    assert relay(grace_s=60) == {"published": 0, "settled": 0, "republished": 0, "set_aside": 0}
    start_worker()
    wait_until(lambda: settle()["settled"] == 2 or outbox_waiting() == 0, 30, "outcomes")
    assert outbox_waiting() == 0


def test_an_update_the_broker_lost_is_sent_again_and_counted_once(
    mongo: Mongo, redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    Producer().submit("WO-1", "output", 4, "lost-1")
    Producer().submit("WO-1", "output", 1, "kept-1")
    assert settle()["republished"] == 0  # both still queued: nothing is lost yet
    redis_client.rpop(WORKORDER_QUEUE)  # a BRPOP whose worker died before recording it unacked
    assert redis_client.llen(WORKORDER_QUEUE) == 1
    assert relay(grace_s=60)["republished"] == 0  # not overdue yet
    assert settle()["republished"] == 1
    assert OutboxMessage.objects.get(request_id="lost-1").republished == 1
    start_worker()
    wait_until(lambda: QuantityLog.objects.count() == 2, 30, "both updates")
    assert settle()["republished"] == 0 and outbox_waiting() == 0
    assert WorkOrder.objects.get(id="WO-1").output_qty == 5


def test_a_delivered_unacknowledged_update_is_not_sent_again(mongo: Mongo, redis_client: redis.Redis) -> None:
    Producer().submit("WO-1", "output", 4, "inflight-1")
    raw = redis_client.rpop(WORKORDER_QUEUE)
    tag = json.loads(raw)["properties"]["delivery_tag"]
    redis_client.hset("unacked", tag, json.dumps([json.loads(raw), "", WORKORDER_QUEUE]))
    assert settle()["republished"] == 0
    redis_client.hdel("unacked", tag)
    assert settle()["republished"] == 1


def test_a_delay_call_from_the_main_app_is_recorded_and_spooled_when_the_broker_is_down(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    sent = update_quantity.delay("WO-1", "output", 1, request_id="d-1", context={"barcode": "B1"})
    by_position = update_quantity.apply_async(("WO-1", "output", 2, "d-2"))
    no_request_id = update_quantity.delay("WO-1", "output", 3)
    entries = {e.request_id: e for e in OutboxMessage.objects}
    assert set(entries) == {"d-1", "d-2", no_request_id.id}
    assert entries["d-1"].job_id == sent.id and entries["d-2"].job_id == by_position.id
    assert json.loads(entries["d-2"].payload) == {
        "args": ["WO-1", "output", 2],
        "kwargs": {"request_id": "d-2"},
    }
    assert redis_client.llen(WORKORDER_QUEUE) == 3
    del sent, by_position, no_request_id
    gc.collect()  # their result subscriptions end now, while Redis is up

    down = with_redis_down(servers, lambda: update_quantity.delay("WO-1", "output", 1, request_id="d-3"))
    assert OutboxMessage.objects.get(job_id=down.id).state == "spooled"


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
    assert outbox_waiting() == 0
    with pytest.raises(QueueError, match="nothing was recorded"):
        with_redis_down(
            servers, lambda: producer.send("job-x", ["WO-1", "input", 2], {"request_id": "x"}, {})
        )


def test_the_relay_keeps_everything_while_the_broker_is_still_down(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    producer = Producer()
    with_redis_down(servers, lambda: producer.submit("WO-1", "input", 2, "sp-2"))
    relayed = with_redis_down(servers, lambda: relay())
    assert relayed["published"] == 0
    message = OutboxMessage.objects.get(request_id="sp-2")
    assert message.state == "spooled" and message.attempts == 1 and message.last_error


def test_mongodb_down_at_the_producer_still_queues_and_stops_waiting_for_it(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    dead_mongo = Settings(
        **{**settings.__dict__, "mongodb_uri": "mongodb://127.0.0.1:1/mes", "connect_timeout_s": 0.5}
    )
    producer = Producer(settings=dead_mongo)
    assert producer.submit("WO-1", "input", 2, "m-1")["code"] == "QUEUED"
    assert producer._outbox_down_until > 0  # the next submissions skip the outbox for a while
    assert producer.submit("WO-1", "input", 2, "m-2")["code"] == "QUEUED"
    assert redis_client.llen(WORKORDER_QUEUE) == 2


def test_a_malformed_delay_raises_at_the_call_site_and_is_never_spooled(
    mongo: Mongo, redis_client: redis.Redis, servers: dict[str, Service]
) -> None:
    with pytest.raises(TypeError, match="countdown"):
        update_quantity.delay("WO-1", "input", 5, request_id="x", countdown=5)
    with pytest.raises(TypeError, match="countdown"):  # with the broker down too: not an outage
        with_redis_down(servers, lambda: update_quantity.delay("WO-1", "input", 5, countdown=5))
    with pytest.raises(TypeError, match="missing"):
        update_quantity.delay("WO-1", "input")
    assert outbox_waiting() == 0 and redis_client.llen(WORKORDER_QUEUE) == 0


def _spooled(name: str, payload: str) -> None:
    OutboxMessage(job_id=name, request_id=f"{name}-1", state="spooled", payload=payload).save()


def test_a_poisoned_outbox_entry_is_set_aside_and_the_entries_behind_it_still_go(
    mongo: Mongo, redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    from celery.bin.celery import celery
    from click.testing import CliRunner

    from mes_tasks.models import FailedUpdate

    make_work_orders(["WO-1"])
    _spooled(
        "bad", json.dumps({"args": ["WO-1", "input", 1], "kwargs": {"request_id": "bad-1", "countdown": 5}})
    )
    _spooled("junk", "{not json")
    _spooled("good", json.dumps({"args": ["WO-1", "input", 2], "kwargs": {"request_id": "good-1"}}))
    result = relay()
    assert (result["published"], result["set_aside"]) == (1, 2)
    assert {f.request_id: f.error_code for f in FailedUpdate.objects} == {
        "bad-1": "UNPUBLISHABLE", "junk-1": "UNPUBLISHABLE"}  # fmt: skip
    assert OutboxMessage.objects(state="spooled").count() == 0
    start_worker()
    wait_until(lambda: QuantityLog.objects(request_id="good-1").count() == 1, 30, "the good entry")
    bad = FailedUpdate.objects.get(request_id="bad-1")
    retried = CliRunner().invoke(celery, ["-A", "mes_tasks", "failed", "retry", str(bad.id)])
    assert retried.exit_code == 2 and "UNRETRYABLE" in retried.stderr and "Traceback" not in retried.output
    assert FailedUpdate.objects.get(request_id="bad-1").status == "open"


def test_the_relay_reaches_every_spooled_entry_not_only_the_oldest_page(
    mongo: Mongo, redis_client: redis.Redis
) -> None:
    from mes_tasks.send.relay import RELAY_PAGE

    n = RELAY_PAGE * 2 + 10
    OutboxMessage._get_collection().insert_many([
        {"job_id": f"j{i}", "request_id": f"r{i}", "state": "spooled", "attempts": 0,
         "payload": json.dumps({"args": ["WO-1", "input", 1], "kwargs": {"request_id": f"r{i}"}})}
        for i in range(n)
    ])  # fmt: skip
    published = [relay(grace_s=60)["published"]]
    while published[-1] and len(published) < 10:  # a run stops after its share of the interval
        published.append(relay(grace_s=60)["published"])
    assert sum(published) == n and published[-1] == 0
    assert redis_client.llen(WORKORDER_QUEUE) == n


def test_a_retried_dead_letter_stays_protected_until_it_has_an_outcome(
    mongo: Mongo, redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    from celery.bin.celery import celery
    from click.testing import CliRunner

    from mes_tasks.apply.deadletter import Failure, record_failure
    from mes_tasks.errors import UnknownWorkOrder
    from mes_tasks.models import FailedUpdate
    from mes_tasks.tasks import UPDATE_QUANTITY

    kwargs = {"request_id": "late-wo", "context": None}
    error = UnknownWorkOrder("no WO-9")
    record_failure(Failure(UPDATE_QUANTITY, "t-1", "late-wo", "WO-9", ["WO-9", "input", 3], kwargs, error, 1))
    make_work_orders(["WO-9"])  # the main app created it late: the operator retries
    record = FailedUpdate.objects.get(request_id="late-wo")
    assert CliRunner().invoke(celery, ["-A", "mes_tasks", "failed", "retry", str(record.id)]).exit_code == 0
    assert redis_client.delete(WORKORDER_QUEUE) == 1  # the broker loses the retried message
    assert settle()["republished"] == 1  # "retried" is no outcome: it is sent again
    start_worker()
    wait_until(lambda: QuantityLog.objects(request_id="late-wo").count() == 1, 30, "the retried update")
    assert WorkOrder.objects.get(id="WO-9").input_qty == 3
    wait_until(lambda: settle()["settled"] == 1 or OutboxMessage.objects.count() == 0, 10, "settled")
    assert outbox_waiting() == 0
