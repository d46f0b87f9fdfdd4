"""The faults the chaos run injects (its stack under test is ``devtools.chaosrun``'s ``Run``).

Each fault is ``inject(run, injection)``: it does its harm, sets ``injection.ended`` (the
moment recovery is measured from, see ``FAULTS``) and adds a line to
``injection.problems`` for anything its own checks found wrong. The runtime is imported
inside the functions: the chaos run sets the environment its settings read first.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple

import redis

from devtools.chaosreport import RECOVERY_GOAL_S, Injection, outcomes, utc
from devtools.chaosrun import BOOT_TIMEOUT_S, BURST, Run

TXN_HOLD_S = 2.0  # the killed worker holds its written transaction open this long (devtools.faultworker)
HOOK_LINE = "holding the transaction open"
HOOK_WAIT_S = 30.0
# A connection gone silent is given up only after a read timeout (MES_REDIS_TIMEOUT_S, 1 s), and
# a worker meets several of them one after another in its event loop (the ack, the events, a
# lock, a retry's publish, the consume): 8-9 s measured, not the 5 s of the others. A frozen
# primary adds the Sentinels' failover.
SILENT_GOAL_S = 20.0
FROZEN_GOAL_S = 30.0
# A silent connection forwards again, and a frozen primary resumes, once the updates the fault
# waits for have outcomes, and no later than this after the fault struck.
SILENT_HOLD_S = 65.0
FROZEN_AFTER_S = 3.0  # a frozen primary stays frozen this much longer, for the flow
PAUSE_MARGIN_S = 2.0  # SIGSTOP lasts the lease TTL plus this
HOLD_S = 4.0  # how long latency and packet loss last
LATENCY_S = 0.2
LOSS = 0.2  # share of chunks "lost" (held for a retransmission timeout)
LOSS_STALL_S = 1.5  # and nothing forwarded at all for this long first
PAUSED_WATCH_S = 2.0  # paused, after the restarted worker is up: nothing may be applied
PAUSE_GRACE_S = 0.5  # the update running when the pause came may still commit
CONSUMER_WATCH_S = 3.0  # after resume: exactly one consumer of workorder
DEAD_LETTER_WAIT_S = 30.0
SPOOLED_COUNTS = 3  # +q updates sent while Redis refuses, one work order each
SPOOL_HOLD_S = 3.0  # Redis refuses at least this long
POISON_FOLLOWERS = 5  # valid spooled entries behind the poisoned one
BAD_BURST = 20
REPLICATION_LAG_S = 0.5  # the primary's last writes that never reach the replica


class Fault(NamedTuple):
    name: str  # as the table shows it
    inject: Callable[[Run, Injection], None]
    goal_s: float = RECOVERY_GOAL_S  # its worst recovery may be this long
    # A change of the fleet: every queue must stay consumed throughout, not only from its end
    # (the partitioned run's unconsumed gaps count from its start).
    whole: bool = False


def kill_txn_restart(run: Run, inj: Injection) -> None:
    """SIGKILL the active worker inside its open transaction; start one in its place, no standby."""
    hooked = run.start_worker(hold=f"written={TXN_HOLD_S:g}")
    if not hooked.wait_for(" ready.", BOOT_TIMEOUT_S):
        inj.problems.append("the worker with the transaction hook did not start")
    others = [w for w in run.live_workers() if w is not hooked]
    for worker in others:
        worker.signal(signal.SIGTERM)  # both at once: the hooked worker takes the lease
    for worker in others:
        worker.stop()
    if not hooked.wait_for(HOOK_LINE, HOOK_WAIT_S):
        inj.problems.append(f"no transaction held open within {HOOK_WAIT_S:g} s; killed anyway")
    run.burst()  # queued behind the open transaction
    hooked.signal(signal.SIGKILL)
    inj.ended = time.time()
    run.start_worker()


def kill_standby(run: Run, inj: Injection) -> None:
    """SIGKILL the active worker; the standby takes over."""
    worker = run.active_worker()
    run.burst()
    worker.signal(signal.SIGKILL)
    inj.ended = time.time()


def pause(run: Run, inj: Injection) -> None:
    from mes_tasks.settings import get_settings

    worker = run.active_worker()
    worker.signal(signal.SIGSTOP)
    time.sleep(get_settings().lease_ttl_s + PAUSE_MARGIN_S)  # past the lease: the standby takes over
    run.burst()  # in the queue as the paused worker wakes up
    worker.signal(signal.SIGCONT)
    inj.ended = time.time()


def restart(name: str) -> Callable[[Run, Injection], None]:
    def inject(run: Run, inj: Injection) -> None:
        if name == "redis":
            print(
                f"chaos:   {kept_locks(run)} work-order lock(s) held at the restart",
                file=sys.stderr,
                flush=True,
            )
        run.burst()  # waits in the broker across the restart
        run.services[name].restart()
        inj.ended = time.time()

    return inject


def kept_locks(run: Run) -> int:
    from mes_tasks.ops.status import held_locks
    from mes_tasks.settings import get_settings

    return len(held_locks(run.redis, get_settings().key_prefix))


def latency(name: str) -> Callable[[Run, Injection], None]:
    def inject(run: Run, inj: Injection) -> None:
        run.proxies[name].latency_s = LATENCY_S
        time.sleep(HOLD_S)
        run.proxies[name].latency_s = 0.0
        inj.ended = time.time()

    return inject


def drop(name: str) -> Callable[[Run, Injection], None]:
    def inject(run: Run, inj: Injection) -> None:
        run.burst()
        run.proxies[name].drop_all()
        inj.ended = time.time()

    return inject


def loss(name: str) -> Callable[[Run, Injection], None]:
    def inject(run: Run, inj: Injection) -> None:
        proxy = run.proxies[name]
        run.burst()
        proxy.stall(LOSS_STALL_S)
        proxy.loss = LOSS
        time.sleep(HOLD_S)
        proxy.loss = 0.0
        inj.ended = time.time()

    return inject


def queue_pause(run: Run, inj: Injection) -> None:
    """Operator pause, restart of the active worker, resume: nothing applied while paused, one consumer."""
    from mes_tasks.ops.status import pause as pause_queue

    if not _operator(inj, pause_queue):
        return
    paused_at = time.time()
    run.active_worker().stop()
    if not run.start_worker().wait_for(" ready.", BOOT_TIMEOUT_S):
        inj.problems.append("the restarted worker did not start")
    time.sleep(PAUSED_WATCH_S)
    _applied_while_paused(run, inj, paused_at + PAUSE_GRACE_S)
    inj.ended = time.time()  # the operator's command, not its reply
    if _resume(inj):
        _one_consumer(run, inj)


def _operator(inj: Injection, action: Callable[..., list[str]]) -> bool:
    """Run ``status.pause`` or ``status.resume`` as the CLI does; False (and a problem) if it failed."""
    from mes_tasks import db
    from mes_tasks.app import app
    from mes_tasks.errors import MesError
    from mes_tasks.settings import get_settings

    settings = get_settings()
    try:
        action(app, db.redis_client(settings), settings)
    except MesError as exc:
        inj.problems.append(f"{action.__name__}: {exc.code} {exc.message}")
        return False
    return True


def _resume(inj: Injection) -> bool:
    from mes_tasks.ops.status import resume

    return _operator(inj, resume)


def _applied_while_paused(run: Run, inj: Injection, since: float) -> None:
    n = run.db.quantity_logs.count_documents({"created_at": {"$gte": utc(since)}})
    if n:
        inj.problems.append(f"{n} update(s) applied while the queue was paused")


def _one_consumer(run: Run, inj: Injection) -> None:
    from mes_tasks.app import app
    from mes_tasks.errors import MesError
    from mes_tasks.ops.status import consumers

    seen: list[list[str]] = []
    deadline = time.monotonic() + CONSUMER_WATCH_S
    while time.monotonic() < deadline:
        try:
            seen.append(consumers(app).get("workorder", []))
        except MesError:
            seen.append(["?"])
        time.sleep(0.5)
    if len(seen[-1]) != 1 or any(len(s) > 1 for s in seen):
        inj.problems.append(f"consumers of workorder after resume: {seen}")
    if not seen[-1]:
        for worker in run.live_workers():  # nothing consumes: restart them so the run can go on
            worker.stop()


def spooled_corrections(run: Run, inj: Injection) -> None:
    """Counts spooled while Redis refuses; corrections sent the moment it is back overtake them."""
    n = len(run.injections)
    counts = [(f"CH-SP{n}-{i}", i + 2, f"chaos:spool:{n}:{i}") for i in range(SPOOLED_COUNTS)]
    for wo, _, _ in counts:
        run.new_work_order(wo)
    run.proxies["app-redis"].refuse = True  # the main app's broker is down; the workers' is not
    reopen_at = time.monotonic() + SPOOL_HOLD_S
    for wo, qty, rid in counts:
        code = run.submit(run.producer(), wo, "output", qty, rid).get("code")
        if code != "SPOOLED":
            inj.problems.append(f"{rid} sent while Redis refused came back {code}, not SPOOLED")
    time.sleep(max(0.0, reopen_at - time.monotonic()))
    run.proxies["app-redis"].refuse = False
    for wo, qty, rid in counts:
        run.submit(run.producer(), wo, "output", -qty, f"{rid}:fix")
    inj.ended = time.time()
    run.final_checks.append((inj, lambda: _netted_out(run, [wo for wo, _, _ in counts])))


def _netted_out(run: Run, work_orders: list[str]) -> list[str]:
    docs = run.db.work_orders.find({"_id": {"$in": work_orders}}, {"output_qty": 1})
    wrong = [f"{d['_id']} output={d.get('output_qty')}" for d in docs if d.get("output_qty")]
    dead = run.db.failed_updates.count_documents({"work_order_id": {"$in": work_orders}})
    return (["did not net out to 0: " + ", ".join(wrong)] if wrong else []) + (
        [f"{dead} count(s) or correction(s) dead-lettered"] if dead else []
    )


def retry_then_loss(run: Run, inj: Injection) -> None:
    """A dead letter retried while paused, its message then lost from the broker: still applied."""
    from mes_tasks.apply.deadletter import retry_failed
    from mes_tasks.models import FailedUpdate
    from mes_tasks.ops.status import pause as pause_queue
    from mes_tasks.tasks import update_quantity

    n = len(run.injections)
    wo, rid = f"CH-LATE-{n}", f"chaos:late:{n}"
    run.submit(run.producer(), wo, "input", 3, rid)
    if not _dead_lettered(run, rid, "UNKNOWN_WORK_ORDER"):
        inj.problems.append(f"{rid} was not dead-lettered UNKNOWN_WORK_ORDER in {DEAD_LETTER_WAIT_S:g} s")
        run.new_work_order(wo)
        return
    run.new_work_order(wo)
    paused = _operator(inj, pause_queue)
    record = FailedUpdate.objects(request_id=rid).first()
    task_id = retry_failed(record, lambda a, k: str(update_quantity.apply_async(a, k).id))
    if not remove_waiting(run.redis, task_id):
        inj.problems.append("the retried message was not waiting in the broker")
    inj.ended = time.time()
    if paused:
        _resume(inj)


def _dead_lettered(run: Run, rid: str, code: str) -> bool:
    deadline = time.monotonic() + DEAD_LETTER_WAIT_S
    while time.monotonic() < deadline:
        if run.db.failed_updates.find_one({"request_id": rid, "error_code": code}):
            return True
        time.sleep(0.1)
    return False


def remove_waiting(client: redis.Redis, task_id: str, queue: str = "workorder") -> bool:
    """LREM the one waiting message of ``task_id`` from the queue's list: the broker lost it."""
    raws: list[str] = client.lrange(queue, 0, -1)  # type: ignore[assignment]
    for raw in raws:
        if json.loads(raw).get("headers", {}).get("id") == task_id:
            return bool(client.lrem(queue, 1, raw))
    return False


def malformed_call(run: Run, inj: Injection) -> None:
    """A .delay() that cannot bind is refused at the call site; a poisoned outbox entry blocks nothing."""
    from mes_tasks.send.outbox import spool
    from mes_tasks.tasks import update_quantity

    n = len(run.injections)
    run.bad_sent += 1
    try:
        update_quantity.delay("CH-000", "input", 5, request_id=f"chaos:malformed:{n}", countdown=5)
    except TypeError:
        run.refused += 1
    else:
        inj.problems.append("update_quantity.delay(..., countdown=5) did not raise TypeError")
    poison = {"args": ["CH-000", "input", 1], "kwargs": {"request_id": f"chaos:poison:{n}", "bogus": 1}}
    run.db.outbox.insert_one({"job_id": str(uuid.uuid4()), "request_id": f"chaos:poison:{n}",
                              "payload": json.dumps(poison), "state": "spooled", "attempts": 0,
                              "created_at": utc(time.time())})  # fmt: skip
    for i in range(POISON_FOLLOWERS):
        wo, rid = f"CH-{i:03d}", f"chaos:behind-poison:{n}:{i}"
        spool(run.db.outbox, str(uuid.uuid4()), [wo, "output", 1], {"request_id": rid, "context": None},
              "chaos: spooled behind a poisoned entry")  # fmt: skip
        run.sent.accept(rid, (wo, "output", 1), time.time())
    inj.ended = time.time()


def bad_input(run: Run, inj: Injection) -> None:
    from mes_tasks.send.producer import submit_quantity_update
    from mes_tasks.tasks import update_quantity

    n = len(run.injections)
    for _ in range(BAD_BURST // 2):
        run.bad_sent += 1
        run.refused += not submit_quantity_update("", "output", 1)["success"]
    for i in range(BAD_BURST // 2):  # valid in form, refused by the worker
        run.bad_sent += 1
        update_quantity.apply_async(
            ("WO-NONE", "output", 1), {"request_id": f"chaos:bad:{n}:{i}"}, ignore_result=True
        )
    inj.ended = time.time()


def primary_killed(run: Run, inj: Injection) -> None:
    """SIGKILL the Redis primary with a backlog its replica never got; the Sentinels promote the replica."""
    assert run.sentinel is not None
    worker = run.active_worker()
    worker.signal(signal.SIGSTOP)  # a backlog: the burst and the flow in the lag stay queued
    try:
        run.sentinel.kill_primary(lag_s=REPLICATION_LAG_S, during_lag=run.burst)
    finally:
        worker.signal(signal.SIGCONT)
    inj.ended = time.time()
    try:
        run.sentinel.wait_failover()
        print(f"chaos:   failed over in {time.time() - inj.ended:.1f} s", file=sys.stderr, flush=True)
    finally:
        run.sentinel.rejoin()  # the old primary back as a replica, ready for the next injection


def silence(run: Run, inj: Injection) -> None:
    """Every open connection of the workers to Redis goes silent and stays open (a partition
    nobody has noticed); new connections work. The partition heals once the updates accepted
    until then have their outcomes (or after ``SILENT_HOLD_S``): a connection that was idle
    all along would otherwise bite whoever uses it next, in a later injection."""
    run.burst()
    proxy = run.proxies["redis"]
    proxy.silence_open()
    inj.ended = time.time()
    try:
        _until_outcomes(run, run.sent.before(inj.ended) - inj.excluded, inj.ended + SILENT_HOLD_S)
    finally:
        proxy.heal()


def primary_frozen(run: Run, inj: Injection) -> None:
    """SIGSTOP the Redis primary and leave it stopped while the updates settle on the new one;
    then resume it, and the Sentinels make it a replica (the partition heals).

    Recovery counts from a burst accepted by the new master: from then on, a worker stuck on
    the old one is the only thing that would keep an update waiting. (The flow's producer
    is held up too, until its own reads of the frozen master time out.)
    """
    assert run.sentinel is not None
    run.sentinel.freeze_primary()
    frozen_at = time.time()
    try:
        run.sentinel.wait_failover()
        print(f"chaos:   failed over in {time.time() - frozen_at:.1f} s", file=sys.stderr, flush=True)
        at = len(run.injections)
        run.burst()
        inj.ended = time.time()
        print(f"chaos:   a burst accepted {inj.ended - frozen_at:.1f} s after the freeze", file=sys.stderr,
              flush=True)  # fmt: skip
        _until_outcomes(run, {f"chaos:burst:{at}:{i}" for i in range(BURST)}, frozen_at + SILENT_HOLD_S)
        time.sleep(FROZEN_AFTER_S)
    finally:
        run.sentinel.rejoin()


def _until_outcomes(run: Run, request_ids: set[str], deadline: float) -> None:
    """Until each of ``request_ids`` has an outcome, or ``deadline`` (epoch seconds)."""
    waiting = set(request_ids)
    while waiting and time.time() < deadline:
        waiting -= outcomes(run.db, waiting).keys()
        time.sleep(0.2)


# Recovery counts from: the kill for kills; the SIGCONT, the restart, the fault switched
# off, the resume, the reopened broker (and corrections sent), the spooled entries
# written, the end of the burst for the others.
FAULTS: dict[str, Fault] = {
    "kill-txn-restart": Fault("SIGKILL in txn, restart in place", kill_txn_restart),
    "kill-standby": Fault("SIGKILL active, standby takes over", kill_standby),
    "pause": Fault("SIGSTOP active > lease TTL", pause),
    "redis-restart": Fault("Redis restart (AOF, kept locks)", restart("redis")),
    "mongo-restart": Fault("MongoDB restart", restart("mongo")),
    "redis-latency": Fault(f"Redis latency {LATENCY_S * 1000:.0f} ms", latency("redis")),
    "mongo-latency": Fault(f"MongoDB latency {LATENCY_S * 1000:.0f} ms", latency("mongo")),
    "redis-drop": Fault("Redis connections dropped", drop("redis")),
    "mongo-drop": Fault("MongoDB connections dropped", drop("mongo")),
    "redis-loss": Fault(f"Redis packet loss {LOSS:.0%}, stall", loss("redis")),
    "mongo-loss": Fault(f"MongoDB packet loss {LOSS:.0%}, stall", loss("mongo")),
    "queue-pause": Fault("queue pause, restart, resume", queue_pause),
    "spooled-corrections": Fault("spooled counts, corrections first", spooled_corrections),
    "retry-then-loss": Fault("failed retry, message lost", retry_then_loss),
    "malformed-call": Fault("malformed .delay(), poisoned outbox", malformed_call),
    "bad-input": Fault("bad input burst", bad_input),
    "redis-silent": Fault("Redis connections gone silent", silence, SILENT_GOAL_S),
}
# Faults that need the one Redis behind the fault proxies: not in a Sentinel run.
PROXIED_REDIS = frozenset(
    {"redis-restart", "redis-latency", "redis-drop", "redis-loss", "redis-silent", "spooled-corrections"}
)
# Faults only a Sentinel run (``--sentinel``) has.
SENTINEL_FAULTS: dict[str, Fault] = {
    "redis-failover": Fault("Redis primary killed (failover)", primary_killed),
    "redis-frozen": Fault("Redis primary frozen (failover)", primary_frozen, FROZEN_GOAL_S),
}


def faults_for(sentinel: bool) -> dict[str, Fault]:
    """The faults a run can inject: with Sentinels, all but the proxied Redis's, and the failover."""
    if not sentinel:
        return FAULTS
    return {k: f for k, f in FAULTS.items() if k not in PROXIED_REDIS} | SENTINEL_FAULTS
