"""Property: whatever the mix of submissions, duplicates, redeliveries, lost locks, paused
holders, kept locks taken away between updates, deliveries held back (a paused queue, a
count spooled during an outage) so that corrections overtake their counts, operator
retries of dead letters and poisoned outbox entries beside good ones, every counter
equals the sum of its distinct accepted requests, exactly once each, every log records
the value its own update left, and a correction is refused only if it would still take
its counter below zero once everything held back has arrived.

Runs the real apply step and the real outbox relay against the real servers; hypothesis
chooses the sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_work_orders
from mes_tasks.apply.group import GroupItem, apply_group
from mes_tasks.apply.keptlocks import KeptLocks
from mes_tasks.apply.ledger import ApplyResult, Ledger
from mes_tasks.db import Mongo
from mes_tasks.errors import FenceLost, LockLost, NegativeCounter, UnknownWorkOrder
from mes_tasks.keys import lock_key
from mes_tasks.models import ALL_MODELS, FailedUpdate, OutboxMessage, QuantityLog, WorkOrder
from mes_tasks.send import relay
from mes_tasks.settings import Settings
from mes_tasks.validation import UpdateRequest, bind_update, validate_update

WOS = ["P-1", "P-2", "P-3"]
FAULTS = ("none", "redeliver", "lock_lost", "paused_holder", "kept_lock_taken",
          "held_back", "operator_retry", "poisoned_outbox")  # fmt: skip


@dataclass(frozen=True)
class Step:
    request: int  # index into the request pool: the same index is the same request (a duplicate)
    fault: str


requests_pool = st.lists(
    st.tuples(st.sampled_from(WOS), st.sampled_from(["input", "output"]), st.integers(-4, 9).filter(bool)),
    min_size=1,
    max_size=8,
)
steps = st.lists(st.builds(Step, st.integers(0, 7), st.sampled_from(FAULTS)), min_size=1, max_size=25)


def attempt(
    ledger: Ledger, redis_client: redis.Redis, req: UpdateRequest, rid: str, fault: str, seen: bool
) -> None:
    """One delivery with its fault; the retry the task would make follows a transient failure.

    ``seen``: the request was accepted before, so a lock lost mid-way meets the duplicate first.
    """
    if fault in ("lock_lost", "paused_holder") and ledger.kept is not None:
        ledger.kept.drop(req.work_order_id)  # these faults hold the lock themselves
    if fault == "lock_lost":
        with ledger.lock_for(req.work_order_id) as lock:
            epoch = ledger.bump_epoch(req.work_order_id)
            redis_client.delete(lock.key)
            if seen:
                assert ledger.commit(req, rid, epoch, lock=lock).status == "duplicate"
            else:
                with pytest.raises(LockLost):
                    ledger.commit(req, rid, epoch, lock=lock)
    elif fault == "paused_holder":
        epoch = ledger.bump_epoch(req.work_order_id)  # then it stalls past its TTL ...
        ledger.bump_epoch(req.work_order_id)  # ... and the next holder acquires
        with pytest.raises(FenceLost):
            ledger.commit(req, rid, epoch)
    elif fault == "kept_lock_taken":
        # Between two updates another holder took the lock we keep, wrote and left.
        redis_client.delete(lock_key(ledger.settings.key_prefix, req.work_order_id))
        ledger.bump_epoch(req.work_order_id)
    deliver(ledger, req, rid)  # the (re)delivery or retry
    if fault == "redeliver":
        assert deliver(ledger, req, rid).status == "duplicate"


def deliver(ledger: Ledger, req: UpdateRequest, rid: str) -> ApplyResult:
    """One delivery, and the retries the task would make after it was fenced or lost its lock."""
    for _ in range(3):
        try:
            return ledger.apply(req, rid)
        except (FenceLost, LockLost):
            continue
    raise AssertionError(f"{rid}: three transient failures in a row")


@dataclass
class Run:
    """What the sequence did so far, as the pipeline around the apply step would see it."""

    ledger: Ledger
    redis: redis.Redis
    expected: dict[tuple[str, str], int]
    accepted: set[str] = field(default_factory=set)
    held_back: list[tuple[UpdateRequest, str]] = field(default_factory=list)  # paused / spooled
    waiting: list[tuple[UpdateRequest, str]] = field(default_factory=list)  # refused below zero

    def offer(self, req: UpdateRequest, rid: str, fault: str) -> None:
        """One delivery; a refusal below zero waits for a retry, as the task's does."""
        try:
            attempt(self.ledger, self.redis, req, rid, fault, seen=rid in self.accepted)
        except NegativeCounter:
            assert self.expected[req.work_order_id, req.kind] + req.quantity < 0 and rid not in self.accepted
            if (req, rid) not in self.waiting:
                self.waiting.append((req, rid))
            return
        self.waiting = [(r, i) for r, i in self.waiting if i != rid]
        if rid not in self.accepted:
            self.accepted.add(rid)
            self.expected[req.work_order_id, req.kind] += req.quantity

    def retry_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for req, rid in waiting:
            self.offer(req, rid, "none")

    def relay_beside_a_poisoned_entry(self, req: UpdateRequest, rid: str, n: int) -> None:
        """The update spooled behind an entry that can never be published; the relay sends it."""
        bad = json.dumps({"args": [req.work_order_id], "kwargs": {"request_id": f"poison-{n}", "eta": 1}})
        OutboxMessage(job_id=f"poison-{n}", request_id=f"poison-{n}", state="spooled", payload=bad).save()
        good = {"args": [req.work_order_id, req.kind, req.quantity], "kwargs": {"request_id": rid}}
        OutboxMessage(job_id=f"job-{n}", request_id=rid, state="spooled", payload=json.dumps(good)).save()

        def publish(job_id: str, args: list[object], kwargs: dict[str, object]) -> None:
            named = bind_update(args, kwargs)[1]  # TypeError for the poisoned entry
            self.offer(req, str(named["request_id"]), "none")

        result = relay.relay(publish, held=dict, grace_s=3600)
        assert (result.published, result.set_aside) == (1, 1)
        assert FailedUpdate.objects.get(request_id=f"poison-{n}").error_code == "UNPUBLISHABLE"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pool=requests_pool, sequence=steps, keep=st.booleans())
@example(
    pool=[("P-1", "input", 2), ("P-1", "input", -2)],
    sequence=[Step(0, "none"), Step(1, "redeliver")],
    keep=True,
)
@example(  # a correction overtakes its held-back count
    pool=[("P-1", "output", 5), ("P-1", "output", -5)],
    sequence=[Step(0, "held_back"), Step(1, "none")],
    keep=False,
)
def test_every_counter_is_the_sum_of_its_distinct_accepted_requests(
    mongo: Mongo,
    redis_client: redis.Redis,
    settings: Settings,
    pool: list[tuple[str, str, int]],
    sequence: list[Step],
    keep: bool,
) -> None:
    for model in ALL_MODELS:
        model._get_collection().delete_many({})
    redis_client.flushdb()
    make_work_orders(WOS)
    ledger = Ledger(mongo, redis_client, settings, KeptLocks(60.0 if keep else 0.0))
    run = Run(ledger, redis_client, {(wo, kind): 0 for wo in WOS for kind in ("input", "output")})
    for n, step in enumerate(sequence):
        wo, kind, qty = pool[step.request % len(pool)]
        rid = f"req-{step.request % len(pool)}"
        req = validate_update(wo, kind, qty)
        if step.fault == "held_back":
            run.held_back.append((req, rid))
        elif step.fault == "poisoned_outbox":
            run.relay_beside_a_poisoned_entry(req, rid, n)
        elif step.fault == "operator_retry":  # delivered, then sent again by `failed retry`
            run.offer(req, rid, "none")
            run.offer(req, rid, "none")
        else:
            run.offer(req, rid, step.fault)
        run.retry_waiting()
    for req, rid in run.held_back:  # resumed, or the relay sent what was spooled
        run.offer(req, rid, "none")
        run.retry_waiting()
    run.retry_waiting()  # the last retry before MES_NEGATIVE_WAIT_S ends
    for req, _ in run.waiting:  # dead-lettered only if it still goes below zero
        assert run.expected[req.work_order_id, req.kind] + req.quantity < 0
    expected, accepted = run.expected, run.accepted
    for doc in WorkOrder.objects:
        assert (doc.input_qty, doc.output_qty) == (expected[doc.id, "input"], expected[doc.id, "output"])
    assert sorted(log.request_id for log in QuantityLog.objects) == sorted(accepted)
    running = dict.fromkeys(expected, 0)
    for log in QuantityLog.objects.order_by("id"):  # ids grow in insertion order within this process
        running[log.work_order_id, log.kind] += log.quantity
        assert log.value_after == running[log.work_order_id, log.kind], log.request_id
    assert ledger.kept is not None
    ledger.kept.release_all()


# Group commit: the same property when the worker applies what waits in its queue together.

group_pool = st.lists(
    st.tuples(
        st.sampled_from([*WOS, "P-404"]),  # P-404: an unknown work order, a poisoned item
        st.sampled_from(["input", "output"]),
        st.integers(-4, 9).filter(bool),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pool=group_pool,
    queue=st.lists(st.integers(0, 7), min_size=1, max_size=40),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    taken=st.lists(st.sampled_from([None, *WOS]), min_size=1, max_size=10),
    keep=st.booleans(),
)
@example(  # a correction behind its count in the same group, the count repeated
    pool=[("P-1", "output", 5), ("P-1", "output", -5)],
    queue=[1, 0, 0, 1],
    sizes=[4],
    taken=[None],
    keep=True,
)
def test_groups_count_every_distinct_accepted_request_once(
    mongo: Mongo,
    redis_client: redis.Redis,
    settings: Settings,
    pool: list[tuple[str, str, int]],
    queue: list[int],
    sizes: list[int],
    taken: list[str | None],
    keep: bool,
) -> None:
    """The queue is applied as the worker does with MES_GROUP_MAX: a group of what waits, its
    leader applied alone if the group left it, the rest of what it left back at the head;
    between groups another holder may take a kept lock. Repeats, corrections behind their
    counts and poisoned items fall inside groups."""
    for model in ALL_MODELS:
        model._get_collection().delete_many({})
    redis_client.flushdb()
    make_work_orders(WOS)
    ledger = Ledger(mongo, redis_client, settings, KeptLocks(60.0 if keep else 0.0))
    run = Run(ledger, redis_client, {(wo, kind): 0 for wo in [*WOS, "P-404"] for kind in ("input", "output")})
    pending = [(validate_update(*pool[i % len(pool)]), f"req-{i % len(pool)}") for i in queue]
    n = 0
    while pending:
        other = taken[n % len(taken)]
        if other is not None:  # another holder took the work order between two groups
            redis_client.delete(lock_key(settings.key_prefix, other))
            ledger.bump_epoch(other)
        group, pending = pending[: sizes[n % len(sizes)]], pending[sizes[n % len(sizes)] :]
        n += 1
        outcomes = apply_group(ledger, [GroupItem(req, rid) for req, rid in group])
        for (req, rid), outcome in zip(group, outcomes, strict=True):
            if outcome is None:
                continue
            assert outcome.status == ("duplicate" if rid in run.accepted else "applied"), rid
            if rid not in run.accepted:
                run.accepted.add(rid)
                run.expected[req.work_order_id, req.kind] += req.quantity
                run.waiting = [(r, i) for r, i in run.waiting if i != rid]
        left = [entry for entry, outcome in zip(group, outcomes, strict=True) if outcome is None]
        if outcomes[0] is None:  # the task's own update, applied alone
            leader, left = left[0], left[1:]
            try:
                run.offer(*leader, "none")
            except UnknownWorkOrder:
                assert leader[0].work_order_id == "P-404"
        pending = left + pending
        run.retry_waiting()
    for req, _ in run.waiting:  # dead-lettered only if it still goes below zero
        assert run.expected[req.work_order_id, req.kind] + req.quantity < 0
    for doc in WorkOrder.objects:
        assert (doc.input_qty, doc.output_qty) == (
            run.expected[doc.id, "input"],
            run.expected[doc.id, "output"],
        )
    assert sorted(log.request_id for log in QuantityLog.objects) == sorted(run.accepted)
    running = dict.fromkeys(run.expected, 0)
    for log in QuantityLog.objects.order_by("id"):
        running[log.work_order_id, log.kind] += log.quantity
        assert log.value_after == running[log.work_order_id, log.kind] >= 0, log.request_id
    assert ledger.kept is not None
    ledger.kept.release_all()
