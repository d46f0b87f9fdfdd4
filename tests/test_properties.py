"""Property: whatever the mix of submissions, duplicates, redeliveries, lost locks, paused
holders and kept locks taken away between updates, every counter equals the sum of its
distinct accepted requests, exactly once each, and every log records the value its own
update left.

Runs the real apply step against the real servers; hypothesis chooses the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_work_orders
from mes_tasks.db import Mongo
from mes_tasks.errors import FenceLost, LockLost, NegativeCounter
from mes_tasks.keptlocks import KeptLocks
from mes_tasks.keys import lock_key
from mes_tasks.ledger import ApplyResult, Ledger
from mes_tasks.models import ALL_MODELS, QuantityLog, WorkOrder
from mes_tasks.settings import Settings
from mes_tasks.validation import UpdateRequest, validate_update

WOS = ["P-1", "P-2", "P-3"]
FAULTS = ("none", "redeliver", "lock_lost", "paused_holder", "kept_lock_taken")


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
                assert ledger.commit(req, rid, epoch, before_commit=lock.ensure_held).status == "duplicate"
            else:
                with pytest.raises(LockLost):
                    ledger.commit(req, rid, epoch, before_commit=lock.ensure_held)
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pool=requests_pool, sequence=steps, keep=st.booleans())
@example(
    pool=[("P-1", "input", 2), ("P-1", "input", -2)],
    sequence=[Step(0, "none"), Step(1, "redeliver")],
    keep=True,
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
    expected = {(wo, kind): 0 for wo in WOS for kind in ("input", "output")}
    accepted: set[str] = set()
    for step in sequence:
        wo, kind, qty = pool[step.request % len(pool)]
        rid = f"req-{step.request % len(pool)}"
        req = validate_update(wo, kind, qty)
        try:
            attempt(ledger, redis_client, req, rid, step.fault, seen=rid in accepted)
        except NegativeCounter:
            assert expected[wo, kind] + qty < 0 and rid not in accepted
            continue
        if rid not in accepted:
            accepted.add(rid)
            expected[wo, kind] += qty
    for doc in WorkOrder.objects:
        assert (doc.input_qty, doc.output_qty) == (expected[doc.id, "input"], expected[doc.id, "output"])
    assert sorted(log.request_id for log in QuantityLog.objects) == sorted(accepted)
    running = dict.fromkeys(expected, 0)
    for log in QuantityLog.objects.order_by("id"):  # ids grow in insertion order within this process
        running[log.work_order_id, log.kind] += log.quantity
        assert log.value_after == running[log.work_order_id, log.kind], log.request_id
    assert ledger.kept is not None
    ledger.kept.release_all()
