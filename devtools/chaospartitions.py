"""The faults of a partitioned chaos run (``--partitions N``): three automatic workers share
N partitions, and the faults strike partition holders and change the fleet.

The goal (design: "Partitions through every change"): a rolling change of N, a mixed
fleet, pinned and automatic workers never leave a queue with waiting updates unconsumed
for more than 5 s, and never let two workers consume one queue (``devtools.chaoswatch``),
while every update still counts once.

Every Redis fault, and the hand-over followed by a death, strikes while retries wait on
their countdown (``with_pending``): a ``-1`` correction on a new work order at zero in
each partition, retried ``NEGATIVE_COUNTER`` until the ``+2`` sent after the fault lets
it apply. Those corrections are left out of the recovery (they wait for their count by
design); each must net its work order to 1, checked at the end.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from devtools.chaosfaults import PAUSE_MARGIN_S, SILENT_GOAL_S, Fault, drop, restart, silence
from devtools.chaosreport import Injection
from devtools.chaosrun import BOOT_TIMEOUT_S, Run, Worker

POLL_S = 0.1
ROLL_SETTLE_S = 1.0  # after each new worker of a rolling change is ready, before the next step
JOIN_WAIT_S = 20.0  # a joining worker takes a partition within this
PINNED_WAIT_S = 20.0  # a pinned worker holds its partition within this
PINNED_HOLD_S = 3.0  # and keeps it this long, under a burst, before it stops
HANDOVER_WAIT_S = 20.0  # an old worker hands a partition to the joining one within this
KILL_AFTER_HANDOVER_S = 0.5
PENDING_WAIT_S = 20.0  # each seeded correction is refused (and retried) within this
PENDING_COUNT = 2  # the count sent after the fault: each correction then nets its work order to 1
PENDING_IDS = 200  # candidate work-order ids searched for one in each partition
HANDED = re.compile(r"\bhand(?:s|ed) (?:workorder\.\d+ )?over\b")  # the worker's hand-over line
TOOK = "took the workorder."


def other_n(n: int) -> int:
    """Where a rolling change of N goes from ``n`` (and comes back from)."""
    return 2 if n != 2 else 4


def target(run: Run) -> str:
    """The partition an injection aims at: each in turn."""
    from mes_tasks.partitions import queue_of

    return queue_of(len(run.injections) % run.partitions)


def until(check: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return bool(check())
        time.sleep(POLL_S)
    return True


def _ready(worker: Worker, inj: Injection) -> bool:
    if worker.wait_for(" ready.", BOOT_TIMEOUT_S):
        return True
    inj.problems.append(f"{worker.name} did not start")
    return False


def kill_holder(run: Run, inj: Injection) -> None:
    """SIGKILL the holder of a partition (and of whatever else it holds); the others take over."""
    queue = target(run)
    worker = run.holder_of(queue) or run.live_workers()[-1]
    run.burst()
    worker.signal(signal.SIGKILL)
    inj.ended = time.time()


def pause_holder(run: Run, inj: Injection) -> None:
    """SIGSTOP the holder of a partition past the lease TTL, a burst queued, then SIGCONT."""
    from mes_tasks.settings import get_settings

    worker = run.holder_of(target(run)) or run.live_workers()[-1]
    worker.signal(signal.SIGSTOP)
    try:
        time.sleep(get_settings().lease_ttl_s + PAUSE_MARGIN_S)
        run.burst()
    finally:
        worker.signal(signal.SIGCONT)
    inj.ended = time.time()


def rolling_change(run: Run, inj: Injection) -> None:
    """Change N and back as docs/deployment.md says, while updates flow."""
    home = run.partitions
    try:
        roll_to(run, inj, other_n(home))
        roll_to(run, inj, home)
    finally:
        run.set_producers(home)
    inj.ended = time.time()


def roll_to(run: Run, inj: Injection, n: int) -> None:
    """Each worker restarted on ``n`` one by one (its replacement first: the first step is a
    mixed fleet, with the producers still on the old N), then the producers."""
    for step, old in enumerate(run.live_workers()):
        new = run.start_worker(MES_PARTITIONS=str(n))
        if _ready(new, inj):
            time.sleep(ROLL_SETTLE_S)
        run.burst(tag=f":n{n}:{step}")
        old.stop()
    run.set_producers(n)


def join_leave(run: Run, inj: Injection) -> None:
    """A worker joins (it is handed partitions); then a holder leaves (SIGTERM)."""
    joiner = run.start_worker()
    if _ready(joiner, inj) and not joiner.wait_for(TOOK, JOIN_WAIT_S):
        inj.problems.append(f"the joining {joiner.name} took no partition within {JOIN_WAIT_S:g} s")
    others = [w for w in run.live_workers() if w is not joiner]
    holder = run.holder_of(target(run))
    leaving = holder if holder is not None and holder is not joiner else others[0]
    run.burst()
    leaving.signal(signal.SIGTERM)
    inj.ended = time.time()
    leaving.stop()


def pinned(run: Run, inj: Injection) -> None:
    """A worker pinned to the last partition (``-Q workorder.{N-1}``) beside the automatic ones:
    it holds that partition, the others keep the rest; then it stops (SIGTERM)."""
    from mes_tasks.partitions import queue_of

    queue = queue_of(run.partitions - 1)
    worker = run.start_worker(queue=queue)
    if _ready(worker, inj) and not until(lambda: run.holder_of(queue) is worker, PINNED_WAIT_S):
        holder = run.holder_of(queue)
        inj.problems.append(f"{worker.name}, pinned to {queue}, did not hold it within {PINNED_WAIT_S:g} s "
                            f"(held by {holder.name if holder else 'nobody'})")  # fmt: skip
    run.burst(work_orders=run.work_orders_of(queue) or None)
    time.sleep(PINNED_HOLD_S)
    worker.signal(signal.SIGTERM)
    inj.ended = time.time()
    worker.stop()


def handover_kill(run: Run, inj: Injection) -> None:
    """A worker joins; the first old holder to hand it a partition is SIGKILLed 0.5 s later."""
    before = {w.name: _handovers(w) for w in run.live_workers()}
    joiner = run.start_worker()
    _ready(joiner, inj)

    def giver() -> Worker | None:
        return next((w for w in run.live_workers() if _handovers(w) > before.get(w.name, 0)), None)

    if not until(giver, HANDOVER_WAIT_S):
        inj.problems.append(f"nobody handed a partition over within {HANDOVER_WAIT_S:g} s of a join")
        inj.ended = time.time()
        return
    doomed = giver()
    time.sleep(KILL_AFTER_HANDOVER_S)
    assert doomed is not None
    doomed.signal(signal.SIGKILL)
    inj.ended = time.time()


def _handovers(worker: Worker) -> int:
    return len(HANDED.findall(worker.log_text()))


def with_pending(inject: Callable[[Run, Injection], None]) -> Callable[[Run, Injection], None]:
    """``inject`` while a correction's retry waits on its countdown in every partition."""

    def injected(run: Run, inj: Injection) -> None:
        pending = seed_pending(run, inj)
        try:
            inject(run, inj)
        finally:
            release_pending(run, inj, pending)

    return injected


def seed_pending(run: Run, inj: Injection) -> list[tuple[str, str]]:
    """A ``-1`` on a new work order at zero in each partition; (work order, request id) of each,
    once the worker refused each (``NEGATIVE_COUNTER``: its retry is on its countdown)."""
    from mes_tasks.keys import negative_wait_key
    from mes_tasks.settings import get_settings

    n = len(run.injections)
    pending = [(wo, f"chaos:pending:{n}:{wo}") for wo in one_per_partition(run, f"CH-PR{n}-")]
    for wo, rid in pending:
        run.new_work_order(wo)
        run.submit(run.producer(), wo, "input", -1, rid)
    rids = {rid for _, rid in pending}
    run.aside |= rids
    inj.excluded = inj.excluded | rids
    keys = [negative_wait_key(get_settings().key_prefix, rid) for rid in rids]
    if not until(lambda: run.redis.exists(*keys) == len(keys), PENDING_WAIT_S):
        inj.problems.append(f"not every correction was refused NEGATIVE_COUNTER within {PENDING_WAIT_S:g} s")
    return pending


def one_per_partition(run: Run, prefix: str) -> list[str]:
    """Work-order ids ``{prefix}{i}``, the first that falls in each partition."""
    from mes_tasks.partitions import partition_of

    found: dict[int, str] = {}
    for i in range(PENDING_IDS):
        found.setdefault(partition_of(f"{prefix}{i}", run.partitions), f"{prefix}{i}")
    return [found[p] for p in sorted(found)]


def release_pending(run: Run, inj: Injection, pending: list[tuple[str, str]]) -> None:
    """Send each correction's count; each work order must end at ``PENDING_COUNT - 1``."""
    for wo, rid in pending:
        run.submit(run.producer(), wo, "input", PENDING_COUNT, f"{rid}:count")
    run.final_checks.append((inj, lambda: _pending_netted(run, pending)))


def _pending_netted(run: Run, pending: list[tuple[str, str]]) -> list[str]:
    wos = [wo for wo, _ in pending]
    docs = {d["_id"]: d.get("input_qty") for d in run.db.work_orders.find({"_id": {"$in": wos}})}
    wrong = [f"{wo} input={docs.get(wo)}" for wo in wos if docs.get(wo) != PENDING_COUNT - 1]
    dead = run.db.failed_updates.count_documents({"work_order_id": {"$in": wos}})
    problems = []
    if wrong:
        problems.append(f"the pending corrections did not net to {PENDING_COUNT - 1}: {', '.join(wrong)}")
    if dead:
        problems.append(f"{dead} pending correction(s) or count(s) dead-lettered")
    return problems


# Recovery counts from: the kill; the SIGCONT; the restarted store answering, the dropped
# connections, the silence (until outcomes); the producers back on N and the last old
# worker stopped; the SIGTERM of the leaving or pinned worker; the kill after the hand-over.
PARTITION_FAULTS: dict[str, Fault] = {
    "kill-holder": Fault("SIGKILL a partition holder", kill_holder),
    "pause-holder": Fault("SIGSTOP a holder > lease TTL", pause_holder),
    "redis-restart": Fault("Redis restart, retries pending", with_pending(restart("redis"))),
    "mongo-restart": Fault("MongoDB restart", restart("mongo")),
    "redis-drop": Fault("Redis dropped, retries pending", with_pending(drop("redis"))),
    "mongo-drop": Fault("MongoDB connections dropped", drop("mongo")),
    "redis-silent": Fault("Redis silent, retries pending", with_pending(silence), SILENT_GOAL_S),
    "rolling-n": Fault("rolling change of N and back", rolling_change, whole=True),
    "join-leave": Fault("a worker joins, a holder leaves", join_leave, whole=True),
    "pinned": Fault("pinned worker beside automatic", pinned, whole=True),
    "handover-kill": Fault("hand-over, old holder SIGKILLed", with_pending(handover_kill), whole=True),
}
