"""Retries waiting on their countdown (ETA messages in kombu's ``unacked`` hash) through a
Redis restart and through a partition hand-over followed by its old holder's death."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis
from celery import Celery, Task
from celery.exceptions import Reject

from conftest import DEFAULT_TIMINGS, Worker, make_work_orders, wait_until
from devtools.devserver import Service
from mes_tasks.broker import delivered_tags, delivery_times, restore_delivery
from mes_tasks.errors import TransientError
from mes_tasks.keys import handed_key, lease_owner_key, members_key, negative_wait_key
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import NEGATIVE_WAIT_S
from mes_tasks.worker.handover import Handed, handed_due, liveness
from mes_tasks.worker.retries import retry

# The goal: applying again, and every message a dead worker held back in a queue, within 5 s.
BACK_WITHIN_S = 5.0
# A correction's countdown (NEGATIVE_COUNTER), seeded: longer than a Redis restart ...
RESTART_COUNTDOWN_S = 4.0
# ... and than a worker's start and a hand-over, so that its holder dies while it waits.
HAND_OVER_COUNTDOWN_S = 15.0
TIMINGS = {**DEFAULT_TIMINGS, "MES_RETRY_BACKOFF_S": "600"}  # the countdown is what is left of the wait


def _applied(*rids: str) -> bool:
    return QuantityLog.objects(request_id__in=list(rids)).count() == len(rids)


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_redis_restart_with_a_retry_on_its_countdown_leaves_the_worker_applying(
    redis_client: redis.Redis,
    servers: dict[str, Service],
    start_worker: Callable[..., Worker],
    env_override: Callable[..., None],
    partitions: int,
) -> None:
    """The worker holds a correction's retry (NEGATIVE_COUNTER) as Redis restarts: it used to
    exit on an AttributeError from kombu's restore of that message; with N > 1 it then never
    restored it (its own unacknowledged message, taken back with its lease)."""
    env_override(MES_PARTITIONS=str(partitions))
    make_work_orders(["WO-1"])
    worker = start_worker(MES_PARTITIONS=str(partitions), **TIMINGS)
    _seed_negative_wait(redis_client, "correction", RESTART_COUNTDOWN_S)
    assert submit_quantity_update("WO-1", "input", -1, request_id="correction")["success"]
    worker.wait_for_log("NEGATIVE_COUNTER", 20)
    servers["redis"].stop()
    servers["redis"].start()
    back = time.monotonic()
    assert submit_quantity_update("WO-1", "input", 5, request_id="count")["success"]
    wait_until(lambda: _applied("count") or not worker.alive(), 30, "the count after the restart")
    took = time.monotonic() - back
    assert worker.alive(), worker.log()[-2000:]
    print(f"\nN={partitions}: applying again {took:.1f}s after Redis came back")
    assert took < BACK_WITHIN_S
    wait_until(lambda: _applied("correction"), 4 * RESTART_COUNTDOWN_S, "the retry held through the restart")
    assert WorkOrder.objects.get(id="WO-1").input_qty == 4


def _seed_negative_wait(client: redis.Redis, request_id: str, left_s: float) -> None:
    """The correction was first refused long ago: its next countdown is the ``left_s`` remaining."""
    first = time.time() - (NEGATIVE_WAIT_S - left_s)
    client.set(negative_wait_key("mes:", request_id), f"{first:.3f}", ex=int(2 * NEGATIVE_WAIT_S))


def _received(worker: Worker, job_id: str) -> bool:
    return f"[{job_id}] received" in worker.log()


def test_retries_a_worker_held_come_back_within_seconds_of_its_death_even_of_a_partition_it_handed_over(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], env_override: Callable[..., None]
) -> None:
    """Worker A holds both partitions, each with a correction's retry on its countdown; B
    joins, A hands one partition over and is SIGKILLed 0.5 s later. The retry of the
    partition B takes over from the dead A came back; the one of the partition A had handed
    over stayed in kombu's unacked hash for the visibility timeout (600 s)."""
    env_override(MES_PARTITIONS="2")
    wos = ["WO-1001", "WO-1"]  # partitions 0 and 1
    make_work_orders(wos)
    timings = {**TIMINGS, "MES_PARTITIONS": "2"}
    doomed = start_worker(**timings)
    wait_until(lambda: doomed.log().count("took the workorder.") == 2, 20, "both partitions held")
    jobs = {}
    for wo in wos:
        _seed_negative_wait(redis_client, f"fix:{wo}", HAND_OVER_COUNTDOWN_S)
        jobs[wo] = submit_quantity_update(wo, "input", -1, request_id=f"fix:{wo}")["job_id"]
    wait_until(lambda: doomed.log().count("NEGATIVE_COUNTER") == 2, 20, "both retries on their countdown")
    joiner = start_worker(**timings)
    doomed.wait_for_log("handed workorder.", 20)
    time.sleep(0.5)
    assert not any(_received(joiner, job) for job in jobs.values())  # its holder is alive
    doomed.kill()
    killed = time.monotonic()
    wait_until(lambda: all(_received(joiner, job) for job in jobs.values()), 15, "both retries back")
    took = time.monotonic() - killed
    print(f"\nboth retries back {took:.1f}s after their holder's death")
    assert took < BACK_WITHIN_S
    for wo in wos:
        assert submit_quantity_update(wo, "input", 5, request_id=f"count:{wo}")["success"]
    wait_until(lambda: _applied(*(f"fix:{wo}" for wo in wos)), 2 * HAND_OVER_COUNTDOWN_S, "both corrections")
    assert [WorkOrder.objects.get(id=wo).input_qty for wo in wos] == [4, 4]
    assert redis_client.hlen(handed_key("mes:")) == 0


def test_a_leftover_queue_whose_dead_holder_left_its_last_message_in_flight_is_taken_and_restored(
    redis_client: redis.Redis, start_worker: Callable[..., Worker], env_override: Callable[..., None]
) -> None:
    """``workorder.3`` is left over from N = 4 and empty: its holder died with its last message
    unacknowledged. Only queues with messages waiting were taken, so that one waited out the
    visibility timeout."""
    from kombu import Connection

    from mes_tasks.settings import get_settings

    env_override(MES_PARTITIONS="4")
    make_work_orders(["WO-1"])
    assert submit_quantity_update("WO-1", "input", 3, request_id="last")["success"]  # workorder.3
    with Connection(get_settings().redis_transport_url) as conn:
        channel = conn.default_channel
        assert channel.basic_get("workorder.3", no_ack=False) is not None  # delivered, never acked
        channel.qos.restore_at_shutdown = False  # its holder dies: nothing restores it
    assert redis_client.llen("workorder.3") == 0 and redis_client.hlen("unacked") == 1
    redis_client.set(lease_owner_key("mes:", "workorder.3"), _dead_owner())
    start_worker(MES_PARTITIONS="2", **DEFAULT_TIMINGS)
    ready = time.monotonic()
    wait_until(lambda: _applied("last"), 15, "the leftover's in-flight update")
    print(f"\nleftover's in-flight update applied {time.monotonic() - ready:.1f}s after the worker was ready")
    assert WorkOrder.objects.get(id="WO-1").input_qty == 3


def _dead_owner() -> str:
    """The owner id of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:dead00"


def test_a_handed_over_delivery_is_due_once_nobody_runs_it() -> None:
    entries = {
        "mine-held": Handed("workorder.0", "me", 1.0),
        "mine-let-go": Handed("workorder.0", "me", 1.0),  # acked, handed back, or its connection lost
        "alive-holder": Handed("workorder.0", "alive", 1.0),
        "dead-holder": Handed("workorder.0", "dead", 1.0),
        "dead-holder-elsewhere": Handed("workorder.1", "dead", 1.0),  # that partition's holder restores it
    }
    due = handed_due(entries, "me", mine={"mine-held"}, held={"workorder.0"}, alive=lambda o: o == "alive")
    assert sorted(due) == ["dead-holder", "mine-let-go"]


def test_a_worker_is_alive_while_its_membership_runs_and_its_process_does(redis_client: redis.Redis) -> None:
    soon = int(time.time() * 1000) + 60_000
    redis_client.hset(
        members_key("mes:"),
        mapping={
            "elsewhere:1:aaa": soon,
            "elsewhere:2:bbb": f'{{"until": {soon}, "n": 2, "pinned": []}}',
            "elsewhere:3:ccc": soon - 120_000,
            _dead_owner(): soon,
        },
    )
    alive = liveness(redis_client, "mes:")
    assert [
        alive(o) for o in ["elsewhere:1:aaa", "elsewhere:2:bbb", "elsewhere:3:ccc", "elsewhere:4:ddd"]
    ] == [
        True,
        True,
        False,  # expired
        False,  # never a member, or gone
    ]
    assert not any(
        alive(o) for o in redis_client.hkeys(members_key("mes:")) if o.startswith(socket.gethostname())
    )


def test_a_delivery_is_restored_only_while_it_is_the_one_noted(
    servers: dict[str, Service], redis_client: redis.Redis
) -> None:
    """A message restored and delivered again keeps its tag: a restore meant for the earlier
    delivery must not take the later one, which another worker may be running."""
    from kombu import Connection

    with Connection(f"redis://127.0.0.1:{servers['redis'].port}/3") as conn:
        channel = conn.default_channel
        channel.queue_declare("handed-test")
        channel.basic_publish(channel.prepare_message("x"), exchange="", routing_key="handed-test")
        first = channel.basic_get("handed-test")
        tag = first.delivery_tag
        assert delivered_tags(channel, "handed-test") == {tag} and delivered_tags(channel, "other") == set()
        with channel.conn_or_acquire() as client:
            at = delivery_times(client, channel, [tag, "not-in-flight"])
            assert list(at) == [tag]
            assert not restore_delivery(client, channel, tag, at[tag] + 1)  # another delivery's time
            assert restore_delivery(client, channel, tag, at[tag])
            assert redis_client.llen("handed-test") == 1 and redis_client.hlen("unacked") == 0
            again = channel.basic_get("handed-test")
            assert again.delivery_tag == tag
            assert not restore_delivery(client, channel, tag, at[tag])  # the later delivery stays
        assert redis_client.hlen("unacked") == 1 and redis_client.llen("handed-test") == 0
        again.ack()


def test_a_retry_the_broker_did_not_take_sends_its_message_back_to_the_queue() -> None:
    """Celery answers a retry it could not publish with a reject that drops the message: the
    update would then live only in the outbox, or nowhere with ``MES_JOURNAL=0``. It goes
    back to its queue instead (seen in the chaos run: a correction waiting for its count,
    its retry published as Redis went silent, ``reject requeue=False``)."""
    app = Celery("refusing", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(
        broker_transport_options={"socket_connect_timeout": 0.3},
        task_publish_retry_policy={"max_retries": 0},
    )

    @app.task(bind=True, shared=False)
    def job(self: Task) -> None:
        pass

    job.push_request(id="retried", retries=0, called_directly=False, delivery_info={"routing_key": "wo"})
    try:
        with pytest.raises(Reject) as rejected:
            retry(job, TransientError("busy"), 1.0)
    finally:
        job.pop_request()
    assert rejected.value.requeue
