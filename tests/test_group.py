"""Group commit (``apply.group``) against real Redis and SecantusDB: every guarantee of one
update, inside a group."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from conftest import Worker, make_work_orders, wait_until
from mes_tasks.apply import faults
from mes_tasks.apply.group import GroupItem, apply_group
from mes_tasks.apply.keptlocks import KeptLocks
from mes_tasks.apply.ledger import ApplyResult, Ledger
from mes_tasks.db import Mongo
from mes_tasks.keys import apply_histogram_key, lock_key
from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder
from mes_tasks.names import UPDATE_QUANTITY
from mes_tasks.ops.metrics import registry_for
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import Settings
from mes_tasks.tally import GROUP_SERIES, SUM
from mes_tasks.tasks import update_quantity
from mes_tasks.validation import validate_update
from mes_tasks.worker import waiting

WOS = ["WO-1", "WO-2", "WO-3"]


@pytest.fixture()
def ledger(mongo: Mongo, redis_client: redis.Redis, settings: Settings) -> Ledger:
    make_work_orders(WOS)
    return Ledger(mongo, redis_client, settings, KeptLocks(settings.lock_linger_s))


def item(wo: str, kind: str, quantity: int, rid: str) -> GroupItem:
    return GroupItem(validate_update(wo, kind, quantity, rid), rid, f"task-{rid}")


def counters(wo: str) -> tuple[int, int]:
    doc = WorkOrder.objects.get(id=wo)
    return doc.input_qty, doc.output_qty


def statuses(outcomes: list[ApplyResult | None]) -> list[str | None]:
    return [None if o is None else o.status for o in outcomes]


def logs_equal_counters() -> None:
    for wo in WorkOrder.objects:
        logs = QuantityLog.objects(work_order_id=wo.id)
        assert sum(log.quantity for log in logs if log.kind == "input") == wo.input_qty, wo.id
        assert sum(log.quantity for log in logs if log.kind == "output") == wo.output_qty, wo.id


def test_a_group_commits_in_queue_order_with_each_value_and_version_right_after_its_update(
    ledger: Ledger,
) -> None:
    items = [item(WOS[i % 3], "output", i + 1, f"r{i}") for i in range(30)]
    outcomes = apply_group(ledger, items)
    assert statuses(outcomes) == ["applied"] * 30
    for wo in WOS:
        mine = [(it, o) for it, o in zip(items, outcomes, strict=True) if it.req.work_order_id == wo]
        running = 0
        for n, (it, result) in enumerate(mine, start=1):
            running += it.req.quantity
            assert result is not None and result.value == running
            log = QuantityLog.objects.get(request_id=it.request_id)
            assert (log.value_after, log.version, log.task_id) == (running, n, it.task_id)
        assert counters(wo) == (0, running)
        assert WorkOrder.objects.get(id=wo).version == len(mine)
    logs_equal_counters()


def test_a_request_id_repeated_in_the_group_or_already_logged_counts_once(ledger: Ledger) -> None:
    ledger.apply(validate_update("WO-1", "input", 5), "old")
    items = [
        item("WO-1", "input", 1, "a"),
        item("WO-1", "input", 5, "old"),  # logged before the group
        item("WO-2", "input", 2, "b"),
        item("WO-1", "input", 1, "a"),  # repeated inside it
        item("WO-2", "input", 2, "b"),
    ]
    outcomes = apply_group(ledger, items)
    assert statuses(outcomes) == ["applied", "duplicate", "applied", "duplicate", "duplicate"]
    assert [o.value for o in outcomes if o is not None] == [6, 5, 2, 6, 2]
    assert counters("WO-1") == (6, 0) and counters("WO-2") == (2, 0)
    assert QuantityLog.objects(request_id="a").count() == 1
    logs_equal_counters()


def test_a_request_id_reused_for_another_update_is_left_to_the_single_apply(ledger: Ledger) -> None:
    items = [item("WO-1", "input", 1, "a"), item("WO-1", "input", 9, "a"), item("WO-2", "input", 3, "c")]
    assert statuses(apply_group(ledger, items)) == ["applied", None, "applied"]
    assert counters("WO-1") == (1, 0)


def test_the_update_that_would_go_below_zero_waits_and_the_others_commit(ledger: Ledger) -> None:
    items = [
        item("WO-1", "output", 3, "a"),
        item("WO-1", "output", -5, "too-many"),  # 3 - 5 < 0: judged in queue order
        item("WO-1", "output", -2, "b"),  # 3 - 2 = 1: fine after the one left out
        item("WO-2", "output", 4, "c"),
    ]
    outcomes = apply_group(ledger, items)
    assert statuses(outcomes) == ["applied", None, "applied", "applied"]
    assert counters("WO-1") == (0, 1) and counters("WO-2") == (0, 4)
    assert QuantityLog.objects(request_id="too-many").count() == 0
    logs_equal_counters()


def test_an_unknown_work_order_is_left_out_and_the_rest_commits(ledger: Ledger) -> None:
    items = [item("WO-404", "input", 1, "x"), item("WO-1", "input", 2, "a"), item("WO-404", "input", 1, "y")]
    assert statuses(apply_group(ledger, items)) == [None, "applied", None]
    assert counters("WO-1") == (2, 0)
    assert WorkOrder.objects(id="WO-404").count() == 0


def test_a_work_order_whose_lock_is_busy_is_left_to_the_single_apply_without_waiting(
    ledger: Ledger, redis_client: redis.Redis, settings: Settings
) -> None:
    """A group holding locks never waits for another: two workers (the old and the new
    partition of a change of MES_PARTITIONS) would wait on each other."""
    other = Ledger(ledger.mongo, redis_client, settings).lock_for("WO-2")
    other.acquire()
    try:
        started = time.monotonic()
        items = [item("WO-1", "input", 1, "a"), item("WO-2", "input", 2, "b"), item("WO-3", "input", 3, "c")]
        assert statuses(apply_group(ledger, items)) == ["applied", None, "applied"]
        assert time.monotonic() - started < settings.lock_wait_s
    finally:
        other.let_go()
    assert counters("WO-2") == (0, 0)


def test_a_request_id_logged_meanwhile_aborts_the_whole_group_and_nothing_moves(
    ledger: Ledger, mongo: Mongo
) -> None:
    """Someone else (a worker of the old partition) logs one of the group's ids between its
    duplicate check and its write: the unique key aborts the transaction as a whole."""
    items = [item("WO-1", "input", 1, "a"), item("WO-2", "input", 2, "b"), item("WO-3", "input", 3, "c")]

    def someone_logs_b() -> None:
        QuantityLog._get_collection().insert_one({"request_id": "b", "work_order_id": "WO-9"})

    with faults.injected(faults.BEGUN, someone_logs_b):
        assert apply_group(ledger, items) == [None, None, None]
    assert [counters(wo) for wo in WOS] == [(0, 0)] * 3
    assert QuantityLog.objects(request_id__in=["a", "c"]).count() == 0


def test_a_lock_lost_before_the_commit_stops_the_whole_group(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    items = [item("WO-1", "input", 1, "a"), item("WO-2", "input", 2, "b")]
    steal = lambda: redis_client.set(lock_key("mes:", "WO-2"), "intruder")  # noqa: E731
    with faults.injected(faults.BEGUN, steal):
        assert apply_group(ledger, items) == [None, None]
    assert counters("WO-1") == (0, 0) and counters("WO-2") == (0, 0)
    assert QuantityLog.objects.count() == 0
    assert len(ledger.kept or ()) == 0  # every lock let go: the single applies take them afresh


def test_a_fenced_out_holder_writes_nothing(ledger: Ledger, mongo: Mongo) -> None:
    """Another holder took WO-2's fence after this one: its counter write matches nothing,
    and the group is aborted whole (WO-1's update included)."""
    apply_group(ledger, [item("WO-1", "input", 1, "warm-1"), item("WO-2", "input", 1, "warm-2")])

    def someone_takes_the_fence() -> None:
        WorkOrder._get_collection().update_one({"_id": "WO-2"}, {"$inc": {"epoch": 1}})

    items = [item("WO-1", "input", 1, "a"), item("WO-2", "input", 2, "b")]
    with faults.injected(faults.BEGUN, someone_takes_the_fence):
        assert apply_group(ledger, items) == [None, None]
    assert counters("WO-1") == (1, 0) and counters("WO-2") == (1, 0)
    assert QuantityLog.objects(request_id__in=["a", "b"]).count() == 0


@pytest.mark.parametrize("point", [faults.BEGUN, faults.WRITTEN])
def test_a_crash_inside_the_group_leaves_nothing_and_the_redelivery_counts_once(
    ledger: Ledger, mongo: Mongo, redis_client: redis.Redis, settings: Settings, point: str
) -> None:
    items = [item(WOS[i % 3], "input", 1, f"r{i}") for i in range(9)]

    def crash() -> None:
        raise SystemExit("SIGKILL")

    with faults.injected(point, crash), pytest.raises(SystemExit):
        apply_group(ledger, items)
    assert QuantityLog.objects.count() == 0
    assert [counters(wo) for wo in WOS] == [(0, 0)] * 3
    # The killed worker's locks run out; a new worker process takes the redelivered messages.
    redis_client.delete(*(lock_key("mes:", wo) for wo in WOS))
    successor = Ledger(mongo, redis_client, settings, KeptLocks(settings.lock_linger_s))
    outcomes = apply_group(successor, items + items[:3])  # redelivered, some twice
    assert statuses(outcomes) == ["applied"] * 9 + ["duplicate"] * 3
    assert [counters(wo) for wo in WOS] == [(3, 0)] * 3
    logs_equal_counters()


def test_a_group_after_single_applies_and_before_them_keeps_one_count(ledger: Ledger) -> None:
    """The kept lock's known counters pass from the single way to the group and back."""
    ledger.apply(validate_update("WO-1", "input", 2), "s1")
    apply_group(ledger, [item("WO-1", "input", 3, "g1"), item("WO-1", "input", 4, "g2")])
    result = ledger.apply(validate_update("WO-1", "input", 1), "s2")
    assert result.value == 10 and counters("WO-1") == (10, 0)
    assert WorkOrder.objects.get(id="WO-1").version == 4
    logs_equal_counters()


def test_a_direct_change_behind_the_kept_lock_sends_the_group_one_by_one(ledger: Ledger) -> None:
    """A counter changed without the lock (a manual fix): the group's match fails, nothing is
    written twice, and the single applies count on the real value."""
    apply_group(ledger, [item("WO-1", "input", 1, "a"), item("WO-2", "input", 1, "b")])
    WorkOrder._get_collection().update_one({"_id": "WO-1"}, {"$inc": {"input_qty": 100}})
    outcomes = apply_group(ledger, [item("WO-1", "input", 1, "c"), item("WO-2", "input", 1, "d")])
    assert outcomes == [None, None]
    assert ledger.apply(validate_update("WO-1", "input", 1), "c").value == 102


# End to end: a real worker drains a backlog in groups.


def test_a_worker_drains_a_backlog_in_groups_counting_every_update_once(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    """Sent before the worker starts, so they wait together: repeats, a correction behind its
    count, an unknown work order and a bad payload in the middle of the groups."""
    make_work_orders(WOS)
    sent, refused, delayed = [], [], []
    for n in range(300):
        wo = WOS[n % 3]
        sent.append(submit_quantity_update(wo, "output", 2, request_id=f"r{n}"))
        if n % 50 == 10:
            sent.append(submit_quantity_update(wo, "output", 2, request_id=f"r{n}"))  # repeated
            sent.append(submit_quantity_update(wo, "output", -1, request_id=f"fix{n}"))  # behind its count
            refused.append(submit_quantity_update("WO-404", "input", 1, request_id=f"lost{n}")["job_id"])
            refused.append(update_quantity.apply_async(("WO-1", "output", "many")).id)  # straight to the task
        if n % 30 == 20:  # a .delay() caller waits for its result
            delayed.append(update_quantity.delay(wo, "input", 1, request_id=f"d{n}"))
    assert all(r["code"] == "QUEUED" for r in sent)
    start_worker(MES_GROUP_MAX="50")
    wait_until(lambda: QuantityLog.objects.count() >= 316, 120, "every update logged")
    assert [r.get(timeout=30)["status"] for r in delayed] == ["applied"] * 10
    assert sorted(_final_failure(job_id).error_code for job_id in refused) == sorted(
        ["UNKNOWN_WORK_ORDER", "INVALID_QUANTITY"] * 6
    )
    assert [counters(wo) for wo in WOS] == [(0, 198), (0, 198), (10, 198)]  # 100 x 2, less 2 x 1
    assert Counter(log.request_id for log in QuantityLog.objects).most_common(1)[0][1] == 1
    logs_equal_counters()
    wait_until(
        lambda: _scraped(redis_client).get("mes_updates_applied_total") == 316, 5, "every update counted"
    )
    scraped = _scraped(redis_client)  # updates counted as updates, and the groups' sizes apart
    assert scraped["mes_group_size_sum"] > 150 and scraped['mes_group_size_bucket{le="50.0"}'] >= 2, scraped


def _scraped(client: redis.Redis) -> dict[str, float]:
    text = generate_latest(registry_for(client, "mes:")).decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mes_")}


@pytest.mark.parametrize("point", [faults.BEGUN, faults.COMMITTED])
def test_a_worker_killed_inside_a_group_or_before_its_acks_loses_nothing_and_counts_nothing_twice(
    start_worker: Callable[..., Worker], point: str
) -> None:
    """Killed with the group's transaction open (nothing committed), or committed with
    no message acknowledged: the successor gets every message back, and counts each once."""
    make_work_orders(WOS)
    for n in range(60):
        submit_quantity_update(WOS[n % 3], "input", 1, request_id=f"r{n}")
    doomed = start_worker(hold=f"{point}=60", MES_GROUP_MAX="20")
    doomed.wait_for_log("holding the transaction open")
    doomed.kill()
    start_worker(MES_GROUP_MAX="20")
    wait_until(lambda: QuantityLog.objects.count() >= 60, 60, "every update logged")
    time.sleep(1)  # a second, wrong application would land now
    assert [counters(wo) for wo in WOS] == [(20, 0)] * 3
    assert QuantityLog.objects.count() == 60
    logs_equal_counters()


def test_flower_sees_each_grouped_update_as_a_task_with_its_work_order_and_outcome(
    start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    from mes_tasks.app import app

    make_work_orders(WOS)
    jobs = [submit_quantity_update(WOS[n % 3], "input", 1, request_id=f"f{n}")["job_id"] for n in range(40)]
    seen: list[dict[str, object]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        listening = threading.Thread(target=receiver.capture, kwargs={"limit": None}, daemon=True)
        listening.start()
        start_worker(MES_GROUP_MAX="20")
        wait_until(lambda: QuantityLog.objects.count() == 40, 30, "every update")
        wait_until(lambda: _group_sizes(redis_client) > 20, 5, "updates counted in groups")
        time.sleep(1)  # the last events on their way
        receiver.should_stop = True
        listening.join(5)
    events: dict[str, dict[str, dict[str, object]]] = {}
    for event in seen:
        if str(event.get("type", "")).startswith("task-"):
            events.setdefault(str(event["uuid"]), {})[str(event["type"])] = event
    for job in jobs:
        received, succeeded = events[job]["task-received"], events[job]["task-succeeded"]
        assert received["name"] == UPDATE_QUANTITY and "WO-" in str(received["args"]), received
        assert "'status': 'applied'" in str(succeeded["result"]), succeeded
        assert received["hostname"] == succeeded["hostname"] and "workorder" in str(received["hostname"])


def _group_sizes(client: redis.Redis) -> float:
    """Updates applied in groups, as the worker counted them for the metrics."""
    raw = client.hget(apply_histogram_key("mes:"), f"{GROUP_SERIES}{SUM}")
    return 0.0 if raw is None else float(raw)


def _final_failure(job_id: str) -> FailedUpdate:
    wait_until(lambda: FailedUpdate.objects(task_id=job_id).count() == 1, 60, f"{job_id} dead-lettered")
    return FailedUpdate.objects.get(task_id=job_id)


# The broker side (worker.waiting): taken, handed back and recovered in queue order.


@pytest.fixture()
def channel(redis_client: redis.Redis) -> Iterator[Any]:
    from mes_tasks.app import app

    with app.connection_for_write() as conn:
        yield conn.default_channel


def _queued_tags(client: redis.Redis) -> list[str]:
    """The queue's delivery tags, the next to be consumed first (kombu pops from the right)."""
    return [
        json.loads(raw)["properties"]["delivery_tag"] for raw in reversed(client.lrange("workorder", 0, -1))
    ]


def test_a_take_stops_before_a_message_that_is_not_kombus_and_the_hand_back_restores_the_order(
    channel: Any, redis_client: redis.Redis
) -> None:
    make_work_orders(WOS)
    for n in range(3):
        submit_quantity_update("WO-1", "input", 1, request_id=f"a{n}")
    redis_client.lpush("workorder", "not a kombu message")
    for n in range(2):
        submit_quantity_update("WO-1", "input", 1, request_id=f"b{n}")
    before = redis_client.lrange("workorder", 0, -1)
    taken = waiting.take(channel, "workorder", 10)
    assert len(taken.messages) == 3 and redis_client.llen("workorder") == 3
    assert redis_client.lindex("workorder", -1) == "not a kombu message"  # left at the head for Celery
    assert redis_client.hlen(channel.unacked_key) == 3 and redis_client.zcard(channel.unacked_index_key) == 3
    waiting.hand_back(channel, "workorder", taken.messages)
    after = redis_client.lrange("workorder", 0, -1)
    assert [_tag(x) for x in after] == [_tag(x) for x in before]  # the same messages, the same order
    assert redis_client.hlen(channel.unacked_key) == 0
    assert channel.qos.can_consume() and not set(channel.qos._delivered) - channel.qos._dirty  # slots free


def test_a_take_whose_reply_is_lost_is_found_and_handed_back_in_order(
    channel: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_work_orders(WOS)
    for n in range(5):
        submit_quantity_update("WO-1", "input", 1, request_id=f"a{n}")
    before = _queued_tags(redis_client)
    real, lost = channel.conn_or_acquire, []

    @contextmanager
    def reply_lost_once(client: Any = None) -> Iterator[Any]:
        with real(client) as conn:
            if not lost:
                run = conn.eval

                def run_then_lose(*args: Any) -> Any:
                    lost.append(run(*args))  # the script ran on the server...
                    raise redis.ConnectionError("connection reset")  # ...its reply never came

                conn.eval = run_then_lose
            yield conn

    monkeypatch.setattr(channel, "conn_or_acquire", reply_lost_once)
    taken = waiting.take(channel, "workorder", 10)
    assert taken.messages == [] and len(lost[0]) == 5  # taken on the server, unknown to the worker
    assert _queued_tags(redis_client) == before  # found under the take key and handed back at once
    assert redis_client.hlen(channel.unacked_key) == 0 and not waiting.has_pending()


def _tag(raw: str) -> str:
    """A message's delivery tag (what is not a kombu message, as it is)."""
    try:
        return str(json.loads(raw)["properties"]["delivery_tag"])
    except ValueError:
        return raw


@pytest.fixture()
def pre_8_0_ledger(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """A server without the client-level bulkWrite (MongoDB 7, as docker-compose runs)."""
    monkeypatch.setattr(ledger, "_has_bulk_write", lambda: False)
    return ledger


def test_before_mongodb_8_a_group_commits_in_one_transaction_all_the_same(pre_8_0_ledger: Ledger) -> None:
    ledger = pre_8_0_ledger
    items = [item(WOS[i % 3], "output", i + 1, f"r{i}") for i in range(12)] + [
        item("WO-1", "output", 1, "r0")
    ]
    assert statuses(apply_group(ledger, items)) == ["applied"] * 12 + ["duplicate"]
    logs_equal_counters()

    def someone_takes_the_fence() -> None:
        WorkOrder._get_collection().update_one({"_id": "WO-2"}, {"$inc": {"epoch": 1}})

    with faults.injected(faults.BEGUN, someone_takes_the_fence):
        assert apply_group(ledger, [item("WO-1", "input", 1, "x"), item("WO-2", "input", 1, "y")]) == [
            None,
            None,
        ]
    assert QuantityLog.objects(request_id__in=["x", "y"]).count() == 0
    logs_equal_counters()
