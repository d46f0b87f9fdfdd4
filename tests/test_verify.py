"""Continuous verification against real SecantusDB: drift of each kind found in one pass, no
false alarm while updates flow, a pass reading only what changed, every update accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from conftest import Worker, make_work_orders, outbox_waiting, spawn, wait_until
from mes_tasks.apply.ledger import Ledger
from mes_tasks.audit import logwatch
from mes_tasks.audit.alerts import summary
from mes_tasks.audit.checks import repair
from mes_tasks.audit.verify import UNEXPLAINED, VerifyOutcome, record, verify_pass
from mes_tasks.db import Mongo
from mes_tasks.models import (
    VERIFY_TRIGGER,
    AuditReport,
    FailedUpdate,
    OutboxMessage,
    QuantityLog,
    VerifyCheckpoint,
    VerifyState,
    WorkOrder,
    utcnow,
)
from mes_tasks.send.outbox import settled_request_ids
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import Settings
from mes_tasks.tasks import relay_outbox
from mes_tasks.validation import validate_update

WOS = [f"WO-V{i}" for i in range(6)]


@pytest.fixture()
def ledger(mongo: Mongo, redis_client: redis.Redis, settings: Settings, tmp_path: Path) -> Ledger:
    make_work_orders(WOS)
    quiet = Settings(**{**settings.__dict__, "reports_dir": str(tmp_path / "reports")})
    return Ledger(mongo, redis_client, quiet)


def a_pass(
    ledger: Ledger, sweep: int = 0, held: Callable[[], dict[str, int] | None] = dict, complete_s: float = 300
) -> VerifyOutcome:
    return verify_pass(
        ledger.mongo, sweep=sweep, complete_s=complete_s, settled=settled_request_ids, held=held
    )


def apply_some(ledger: Ledger, n: int, prefix: str) -> None:
    for i in range(n):
        ledger.apply(
            validate_update(WOS[i % len(WOS)], ("input", "output")[i % 2], 1 + i % 3), f"{prefix}{i}"
        )


def drift_of(outcome: VerifyOutcome) -> set[tuple[str, str, int]]:
    return {(f.work_order_id, f.field, f.delta) for f in outcome.findings}


def test_the_first_pass_proves_every_work_order_and_later_ones_read_only_the_new_logs(ledger: Ledger) -> None:
    apply_some(ledger, 300, "old")
    first = a_pass(ledger)
    assert (first.work_orders, first.proved, first.logs_read, first.findings) == (6, 6, 300, [])
    assert VerifyCheckpoint.objects.count() == 6

    apply_some(ledger, 5, "new")  # five updates on five work orders
    later = a_pass(ledger)
    assert (later.changed, later.proved, later.logs_read, later.findings) == (5, 0, 5, [])
    idle = a_pass(ledger)
    assert (idle.changed, idle.proved, idle.logs_read) == (0, 0, 0)


def test_a_counter_moved_behind_the_ledgers_back_is_found_in_the_next_pass(ledger: Ledger) -> None:
    apply_some(ledger, 30, "r")
    assert a_pass(ledger).findings == []
    WorkOrder._get_collection().update_one({"_id": "WO-V2"}, {"$inc": {"output_qty": 7}})  # no update follows
    assert drift_of(a_pass(ledger)) == {("WO-V2", "output_qty", 7)}
    # and a write that moved the version as well, on a work order that keeps receiving updates
    WorkOrder._get_collection().update_one({"_id": "WO-V3"}, {"$inc": {"input_qty": -2, "version": 1}})
    apply_some(ledger, 12, "more")
    assert drift_of(a_pass(ledger)) == {("WO-V2", "output_qty", 7), ("WO-V3", "input_qty", -2)}


def test_a_counter_restored_from_an_old_backup_is_found(ledger: Ledger) -> None:
    apply_some(ledger, 12, "before")
    backup = WorkOrder._get_collection().find_one({"_id": "WO-V1"})
    assert a_pass(ledger).findings == []
    apply_some(ledger, 24, "after")  # WO-V1 moves on: input +2 +2, output +1 +1 +1 +1 ... (see apply_some)
    assert a_pass(ledger).findings == []
    WorkOrder._get_collection().replace_one({"_id": "WO-V1"}, backup)
    found = a_pass(ledger)
    assert {f.work_order_id for f in found.findings} == {"WO-V1"}
    assert all(f.delta < 0 for f in found.findings)  # the counter is behind its logs


def test_a_counter_restored_to_exactly_its_checkpoint_is_found_without_another_update(ledger: Ledger) -> None:
    apply_some(ledger, 12, "before")
    assert a_pass(ledger).findings == []
    backup = WorkOrder._get_collection().find_one({"_id": "WO-V1"})  # as its checkpoint has it
    ledger.apply(validate_update("WO-V1", "input", 4), "after-1")
    ledger.apply(validate_update("WO-V1", "output", 2), "after-2")
    WorkOrder._get_collection().replace_one({"_id": "WO-V1"}, backup)  # then nothing more happens
    found = a_pass(ledger)  # no sweep: its new logs carry versions above the work order's
    assert drift_of(found) == {("WO-V1", "input_qty", -4), ("WO-V1", "output_qty", -2)}


def test_a_log_deleted_edited_or_replaced_behind_the_ledgers_back_is_found_in_the_next_pass(
    ledger: Ledger,
) -> None:
    apply_some(ledger, 30, "r")
    assert a_pass(ledger).findings == []
    logs = QuantityLog._get_collection()
    logs.delete_one({"request_id": "r0"})  # WO-V0 input 1
    logs.update_one({"request_id": "r4"}, {"$inc": {"quantity": 10}})  # WO-V4 input
    moved = logs.find_one({"request_id": "r1"})  # WO-V1 output 2, replaced as WO-V5's
    logs.replace_one({"_id": moved["_id"]}, {**moved, "work_order_id": "WO-V5"})
    found = a_pass(ledger)  # no sweep: the logs' change stream names the work orders
    assert drift_of(found) == {
        ("WO-V0", "input_qty", 1),
        ("WO-V4", "input_qty", -10),
        ("WO-V1", "output_qty", 2),
        ("WO-V5", "output_qty", -2),
    }
    assert (found.proved, found.log_changes) == (4, 3)
    assert a_pass(ledger).proved == 4  # still drifting: proved again, not forgotten


def test_a_change_the_stream_cannot_place_makes_the_pass_prove_everything(ledger: Ledger) -> None:
    apply_some(ledger, 12, "r")
    assert a_pass(ledger).proved == 6
    assert a_pass(ledger).proved == 0
    VerifyState._get_collection().update_one({"_id": "log_stream"}, {"$set": {"token": {"_data": "00"}}})
    QuantityLog._get_collection().delete_one({"request_id": "r3"})  # WO-V3 output 1
    found = a_pass(ledger)  # a position the server does not know: everything, once
    assert (found.proved, drift_of(found)) == (6, {("WO-V3", "output_qty", 1)})
    assert a_pass(ledger).proved == 1  # the position is kept again: only the drifting one


def test_a_stream_too_far_behind_makes_the_pass_prove_everything_once(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_some(ledger, 12, "r")
    assert a_pass(ledger).proved == 6
    apply_some(ledger, 6, "more")
    monkeypatch.setattr(logwatch, "READ_BUDGET_S", 0.0)  # as if the passes had stopped for a day
    assert a_pass(ledger).proved == 6
    monkeypatch.undo()
    QuantityLog._get_collection().delete_one({"request_id": "more2"})  # WO-V2 input 3
    found = a_pass(ledger)  # from the fresh position: the delete is seen
    assert (found.proved, drift_of(found)) == (1, {("WO-V2", "input_qty", 3)})


def test_before_mongodb_6_a_deleted_log_makes_the_pass_prove_everything(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logwatch, "PRE_IMAGES_WIRE_VERSION", 99)  # a server without pre-images
    apply_some(ledger, 12, "r")
    assert a_pass(ledger).proved == 6
    QuantityLog._get_collection().update_one({"request_id": "r2"}, {"$inc": {"quantity": 1}})  # WO-V2
    found = a_pass(ledger)  # an edit is still placed: the log as it is now says its work order
    assert (found.proved, drift_of(found)) == (1, {("WO-V2", "input_qty", -1)})
    QuantityLog._get_collection().delete_one({"request_id": "r3"})  # WO-V3: nothing says whose it was
    found = a_pass(ledger)
    assert (found.proved, drift_of(found)) == (6, {("WO-V2", "input_qty", -1), ("WO-V3", "output_qty", 1)})
    assert a_pass(ledger).proved == 2  # then the two drifting ones only


def test_the_sweep_proves_every_work_order_in_turn(ledger: Ledger) -> None:
    apply_some(ledger, 30, "r")
    assert a_pass(ledger).findings == []
    WorkOrder._get_collection().update_one({"_id": "WO-V4"}, {"$inc": {"input_qty": 3}})
    VerifyCheckpoint._get_collection().update_one({"_id": "WO-V4"}, {"$inc": {"input_qty": 3}})
    # the checkpoint moved with the counter: only a proof in full finds it
    assert a_pass(ledger).findings == []
    sweeps = [a_pass(ledger, sweep=2) for _ in range(3)]  # two work orders a pass: all six in three
    assert set().union(*(drift_of(s) for s in sweeps)) == {("WO-V4", "input_qty", 3)}


def test_no_false_alarm_while_updates_flow_then_exactly_the_tampered(
    mongo: Mongo, redis_client: redis.Redis, settings: Settings
) -> None:
    make_work_orders(WOS)
    stop, applied = threading.Event(), [0, 0]

    def writer(n: int) -> None:
        ledger = Ledger(mongo, redis_client, settings)  # one per thread
        mine = WOS[n::2]
        while not stop.is_set():
            i = applied[n]
            ledger.apply(validate_update(mine[i % 3], ("input", "output")[i % 2], 1 + i % 2), f"w{n}:{i}")
            applied[n] += 1

    checker = Ledger(mongo, redis_client, settings)
    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    passes = []
    try:
        while sum(applied) < 1500:
            passes.append(a_pass(checker, sweep=2))
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [f for p in passes for f in p.findings] == []
    assert sum(p.changed for p in passes[1:]) > len(passes) - 1, "no pass saw the updates: it proved nothing"
    WorkOrder._get_collection().update_one({"_id": "WO-V5"}, {"$inc": {"input_qty": 4}})
    assert drift_of(a_pass(checker)) == {("WO-V5", "input_qty", 4)}


def test_a_repair_clears_the_drift_and_the_checkpoint_moves_on(ledger: Ledger) -> None:
    apply_some(ledger, 12, "r")
    a_pass(ledger)
    WorkOrder._get_collection().update_one({"_id": "WO-V0"}, {"$inc": {"input_qty": 3}})
    assert drift_of(a_pass(ledger)) == {("WO-V0", "input_qty", 3)}
    assert repair(ledger, "WO-V0") is not None
    apply_some(ledger, 6, "then")
    assert a_pass(ledger).findings == []


def outbox_entry(request_id: str, age_s: float, state: str = "sent", wo: str = "WO-V0") -> str:
    job_id = f"job-{request_id}"
    at = utcnow() - timedelta(seconds=age_s)
    payload = json.dumps({"args": [wo, "input", 1], "kwargs": {"request_id": request_id}})
    OutboxMessage(job_id=job_id, request_id=request_id, payload=payload, state=state, created_at=at,
                  sent_at=at).save()  # fmt: skip
    return job_id


def test_an_old_update_with_no_outcome_and_nowhere_in_the_broker_is_unexplained(ledger: Ledger) -> None:
    ledger.apply(validate_update("WO-V0", "input", 1), "applied")
    outbox_entry("applied", 400)  # has its log: the relay prunes it
    FailedUpdate(request_id="dead", task_name="t", error_code="UNKNOWN_WORK_ORDER").save()
    outbox_entry("dead", 400)  # has its dead letter
    held = outbox_entry("held", 400)  # still queued in the broker
    outbox_entry("young", 100)  # not old enough yet
    outbox_entry("spooled", 400, state="spooled")  # the relay has yet to send it
    outbox_entry("lost", 400, wo="WO-V3")  # none of these: unexplained
    found = a_pass(ledger, held=lambda: {held: 0})
    assert found.completeness_checked
    assert [(u["check"], u["request_id"], u["work_order_id"]) for u in found.unexplained] == [
        (UNEXPLAINED, "lost", "WO-V3")
    ]
    assert found.unexplained[0]["age_s"] >= 400
    unread = a_pass(ledger, held=lambda: None)  # the broker cannot be read: no finding made up
    assert (unread.completeness_checked, unread.unexplained) == (False, [])


def test_the_outbox_is_pruned_only_once_a_pass_accounted_for_each_entry(
    ledger: Ledger, env_override: Callable[..., None]
) -> None:
    apply_some(ledger, 6, "r")
    for i in range(6):
        outbox_entry(f"r{i}", 400)
    FailedUpdate(request_id="dead", task_name="t", error_code="UNKNOWN_WORK_ORDER", status="retried").save()
    outbox_entry("dead", 400)  # retried: on its way again under a newer entry
    assert a_pass(ledger).outbox_pruned == 0  # nothing settled yet
    assert relay_outbox(grace_s=0)["settled"] == 6  # each has its log: settled, kept
    assert OutboxMessage.objects(state="settled").count() == 6 and outbox_waiting() == 1

    ledger.apply(validate_update("WO-V1", "input", 5), "by-hand-1")  # no outbox entry:
    ledger.apply(validate_update("WO-V2", "output", 1), "by-hand-2")  # MES_JOURNAL=0, or by hand
    QuantityLog._get_collection().delete_one({"request_id": "r3"})  # WO-V3 output 1, behind the back
    FailedUpdate.objects(request_id="dead").update_one(set__status="open")  # failed again: an outcome
    assert relay_outbox(grace_s=0)["settled"] == 1
    found = a_pass(ledger)
    assert drift_of(found) == {("WO-V3", "output_qty", 1)}
    assert (found.outbox_pruned, found.logs_without_entry) == (6, 2)  # all but r3, whose log is gone
    assert [d.request_id for d in OutboxMessage.objects] == ["r3"]
    state = record(found, ledger.settings) and VerifyState.objects.get(id="last")
    assert state and (state.outbox_pruned, state.logs_without_entry_total) == (6, 2)

    env_override(MES_VERIFY_INTERVAL_S="0")  # no passes: the relay deletes what has its outcome
    ledger.apply(validate_update("WO-V4", "input", 1), "r-off")
    outbox_entry("r-off", 400)
    assert relay_outbox(grace_s=0)["settled"] == 1
    assert [d.request_id for d in OutboxMessage.objects] == ["r3"]


def test_a_pass_is_kept_and_new_findings_are_reported_and_alerted_once(ledger: Ledger) -> None:
    apply_some(ledger, 12, "r")
    assert record(a_pass(ledger), ledger.settings) is None
    state = VerifyState.objects.get(id="last")
    assert (state.work_orders, state.drift, state.unexplained) == (6, [], [])

    WorkOrder._get_collection().update_one({"_id": "WO-V1"}, {"$inc": {"output_qty": 2}})
    outbox_entry("lost", 400)
    report = record(a_pass(ledger), ledger.settings)
    assert report is not None and report.trigger == VERIFY_TRIGGER
    checks = sorted((f["check"], f["work_order_id"]) for f in report.findings)
    assert checks == [("counter_mismatch", "WO-V1"), (UNEXPLAINED, "WO-V0")]
    assert (
        Path(report.files["csv"]).read_text().splitlines()[0].endswith("request_id,job_id,age_s,republished")
    )
    assert record(a_pass(ledger), ledger.settings) is None  # the same findings: no second report
    assert VerifyState.objects.get(id="last").drift == ["WO-V1"]
    assert AuditReport.objects(trigger=VERIFY_TRIGGER).count() == 1


def test_checkpoints_written_before_a_worker_of_an_earlier_release_logged_raise_no_false_alarm(
    ledger: Ledger,
) -> None:
    """A log without a version (a worker not yet upgraded) is not among "the logs since": the
    work order is proved in full instead, and agrees."""
    apply_some(ledger, 12, "r")
    a_pass(ledger)
    ledger.apply(validate_update("WO-V0", "input", 5), "old-worker")
    QuantityLog._get_collection().update_one({"request_id": "old-worker"}, {"$unset": {"version": 1}})
    found = a_pass(ledger)
    assert (found.findings, found.proved) == ([], 1)


def test_beat_and_the_audit_worker_find_drift_within_seconds_while_updates_flow(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The whole system: a worker applying a steady flow, beat scheduling a pass every second
    on the audit worker; a counter moved behind its back is found in a few passes, and
    nothing else is ever reported."""
    make_work_orders(WOS)
    every = {"MES_VERIFY_INTERVAL_S": "1", "MES_REPORTS_DIR": str(tmp_path / "reports")}
    start_worker()
    start_worker(name="audit", queue="audit", **every)
    beat = spawn([sys.executable, "-m", "celery", "-A", "mes_tasks", "beat", "--loglevel", "INFO",
                  "-s", str(tmp_path / "beat-schedule")], tmp_path / "beat.log", **every)  # fmt: skip
    stop, sent = threading.Event(), [0]

    def feed() -> None:
        while not stop.is_set():
            i = sent[0]
            submit_quantity_update(WOS[i % len(WOS)], ("input", "output")[i % 2], 1, f"flow-{i}")
            sent[0] += 1
            time.sleep(0.02)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_until(lambda: (VerifyState.objects(id="last").first() or VerifyState()).changed > 0, 60,
                   "a pass that saw updates")  # fmt: skip
        WorkOrder._get_collection().update_one({"_id": "WO-V4"}, {"$inc": {"output_qty": 5}})
        tampered_at = time.monotonic()
        wait_until(lambda: VerifyState.objects.get(id="last").drift == ["WO-V4"], 30, "the drift found")
        found_s = time.monotonic() - tampered_at
        time.sleep(3)  # a few more passes while updates flow
    finally:
        stop.set()
        feeder.join()
        beat.stop()
    assert "Sending due task continuous-verify" in beat.log()
    reports = AuditReport.objects(trigger=VERIFY_TRIGGER)
    assert [f["work_order_id"] for r in reports for f in r.findings] == ["WO-V4"]  # and nothing else
    assert found_s < 10, found_s


def test_flower_sees_updates_and_audits_but_not_the_relay_or_the_passes(
    start_worker: Callable[..., Worker],
) -> None:
    """Beat's periodic internals would bury the updates in Flower's task list: their tasks
    publish no event, neither when sent nor on the worker; an audit and an update still do."""
    from mes_tasks.app import app
    from mes_tasks.names import AUDIT_QUEUE
    from mes_tasks.tasks import audit_work_orders, relay_outbox, update_quantity, verify_counters

    make_work_orders(WOS)
    start_worker()
    start_worker(name="audit", queue="audit")
    seen: list[dict[str, object]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        listening = threading.Thread(target=receiver.capture, kwargs={"limit": None}, daemon=True)
        listening.start()
        wait_until(lambda: any(e.get("type") == "worker-heartbeat" for e in seen), 10, "the event stream")
        quiet = [relay_outbox.apply_async(queue=AUDIT_QUEUE), verify_counters.apply_async(queue=AUDIT_QUEUE)]
        audit = audit_work_orders.apply_async(queue=AUDIT_QUEUE)
        update = update_quantity.delay("WO-V0", "input", 1, request_id="seen-1")
        wait_until(lambda: VerifyState.objects(id="last").first() is not None, 30, "the pass")
        wait_until(lambda: QuantityLog.objects(request_id="seen-1").count() == 1, 30, "the update")
        wait_until(lambda: AuditReport.objects(trigger="schedule").count() == 1, 30, "the audit")
        time.sleep(1)  # the last events on their way
        receiver.should_stop = True
        listening.join(5)
    by_task: dict[str, set[str]] = {}
    for event in seen:
        if str(event.get("type", "")).startswith("task-"):
            by_task.setdefault(str(event["uuid"]), set()).add(str(event["type"]))
    assert {"task-sent", "task-received", "task-succeeded"} <= by_task.get(audit.id, set())
    assert "task-succeeded" in by_task.get(update.id, set())
    assert [q.id for q in quiet if q.id in by_task] == []


def test_a_pass_with_redis_down_still_proves_the_counters_and_says_completeness_waited(
    ledger: Ledger, servers: dict[str, object]
) -> None:
    """The checkpoints live in MongoDB: a Redis restart costs them nothing. With the broker
    unreadable, a pass still verifies the counters, finds no update unexplained, and says so."""
    from conftest import with_redis_down
    from mes_tasks.send.relay import broker_holds

    apply_some(ledger, 12, "r")
    assert a_pass(ledger).findings == []
    outbox_entry("lost", 400)  # would be unexplained, if the broker could be read
    WorkOrder._get_collection().update_one({"_id": "WO-V2"}, {"$inc": {"input_qty": 1}})
    down = with_redis_down(servers, lambda: a_pass(ledger, held=broker_holds))  # type: ignore[arg-type]
    assert (drift_of(down), down.completeness_checked, down.unexplained) == (
        {("WO-V2", "input_qty", 1)},
        False,
        [],
    )
    after = a_pass(ledger, held=broker_holds)  # Redis is back
    assert after.proved == 1 and [u["request_id"] for u in after.unexplained] == ["lost"]


def test_the_nightly_audit_verifies_the_checkpoints_and_drops_a_wrong_one(ledger: Ledger) -> None:
    """A checkpoint edited behind mes_tasks's back could one day mask a drift of the same size:
    the audit, which proves every counter, finds it and deletes it; the next pass proves that
    work order in full again and finds nothing."""
    from mes_tasks.audit.reports import audit_and_report

    apply_some(ledger, 12, "r")
    a_pass(ledger)
    VerifyCheckpoint._get_collection().update_one({"_id": "WO-V3"}, {"$inc": {"output_qty": 4}})
    report = audit_and_report(ledger)
    assert (report.finding_count, report.checkpoints_reset) == (0, 1)
    assert "1 verification checkpoint(s) were wrong" in summary(report)
    assert VerifyCheckpoint.objects(id="WO-V3").count() == 0
    after = a_pass(ledger)
    assert (after.proved, after.findings) == (1, [])
    assert audit_and_report(ledger).checkpoints_reset == 0


def test_checkpoints_survive_a_new_checker_process_and_a_redis_restart(
    ledger: Ledger, servers: dict[str, object], tmp_path: Path
) -> None:
    """Each pass runs in a process of its own (``audit verify``, as a restarted audit worker
    would), with Redis restarted between them: the second reads only the new logs, proves
    nothing in full again, and still finds a drift that happened meanwhile."""

    def verify_in_a_new_process() -> dict[str, object]:
        env = {**os.environ, "MES_VERIFY_SWEEP": "0", "MES_REPORTS_DIR": str(tmp_path / "reports")}
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "mes_tasks", "audit", "verify", "--json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        data: dict[str, object] = json.loads(done.stdout)
        return data

    apply_some(ledger, 120, "old")
    first = verify_in_a_new_process()
    assert (first["proved"], first["logs_read"], first["drift"]) == (6, 120, [])
    servers["redis"].restart()  # type: ignore[attr-defined]
    apply_some(ledger, 5, "new")
    WorkOrder._get_collection().update_one({"_id": "WO-V5"}, {"$inc": {"output_qty": 2}})
    second = verify_in_a_new_process()
    # The five new logs, and the drifted work order's 20 read once more to prove it in full
    # before it is reported; not the 120 a checker that lost its checkpoints would read.
    assert (second["changed"], second["proved"], second["drift"]) == (5, 1, ["WO-V5"])
    assert second["logs_read"] == 5 + 20
