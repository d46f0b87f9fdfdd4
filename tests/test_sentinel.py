"""Redis behind Sentinels: the primary killed under load fails over, and every update counts once.

This process's app reads the plain test Redis; the producer and the outbox relay run in a
subprocess (``feed`` below) whose ``REDIS_URL`` names the Sentinels, as the worker's does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DEFAULT_TIMINGS, REPO, TEST_ENV, Worker, make_work_orders
from devtools.process import Child
from devtools.sentinel import Topology, sentinel_supported

WORK_ORDERS = [f"WO-S{i}" for i in range(8)]
UPDATES = 300
RATE = 40.0  # offered per second: about 7 s of flow
KILL_AFTER = 100  # updates sent before the primary dies
LAG_S = 0.5  # the primary's last writes the replica never gets
FEED_TIMEOUT_S = 45.0
TESTS = Path(__file__).resolve().parent


def feed(out: str) -> None:
    """The main app and beat: submit ``UPDATES`` (a tenth again under the same request id) while
    the relay runs every ``MES_OUTBOX_RELAY_INTERVAL_S``; then relay until each has an outcome."""
    import threading
    from collections import Counter

    from devtools.load import plan
    from mes_tasks import db
    from mes_tasks.send.outbox import settled_request_ids
    from mes_tasks.send.producer import Producer
    from mes_tasks.settings import get_settings
    from mes_tasks.tasks import relay_outbox

    settings = get_settings()
    db.connect(settings)
    relayed: Counter[str] = Counter()
    stop = threading.Event()

    def relay_forever() -> None:
        while not stop.wait(settings.outbox_relay_interval_s):
            try:
                relayed.update(relay_outbox())
            except Exception:  # a store is down: the next run tries again, as beat's would
                relayed["errors"] += 1

    threading.Thread(target=relay_forever, daemon=True).start()
    producer, codes = Producer(), Counter[str]()
    accepted: dict[str, tuple[str, str, int]] = {}
    sent_at: dict[str, float] = {}
    started = time.monotonic()
    for i, u in enumerate(plan(UPDATES, WORK_ORDERS, "sentinel", seed=7, dup_share=0.1)):
        time.sleep(max(0.0, started + i / RATE - time.monotonic()))
        result = producer.submit(u["work_order_id"], u["kind"], u["quantity"], u["request_id"])
        codes[result.get("code", "?")] += 1
        if result["success"] and u["request_id"] not in accepted:
            accepted[u["request_id"]] = (u["work_order_id"], u["kind"], u["quantity"])
            sent_at[u["request_id"]] = time.time()
        print(f"sent {i + 1}", flush=True)
    deadline = time.monotonic() + FEED_TIMEOUT_S
    while len(settled_request_ids(accepted)) < len(accepted) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    Path(out).write_text(
        json.dumps({"accepted": accepted, "sent_at": sent_at, "relayed": relayed, "codes": codes})
    )


@pytest.fixture()
def topology(tmp_path: Path) -> Iterator[Topology]:
    if not sentinel_supported():
        pytest.skip("this redis-server has no Sentinel mode (--sentinel)")
    topology = Topology(tmp_path / "sentinel").start()
    yield topology
    topology.stop()


def test_the_primary_killed_under_load_fails_over_and_every_update_counts_once(
    topology: Topology, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    def kill(worker: Worker) -> None:
        worker.signal(signal.SIGSTOP)  # a backlog: what is sent in the lag is still queued at the kill
        topology.kill_primary(lag_s=LAG_S)
        worker.signal(signal.SIGCONT)

    fed = fail_over_under_load(topology, start_worker, tmp_path, kill)
    assert fed["relayed"].get("republished", 0) > 0  # what replication dropped, sent again


def test_the_primary_frozen_under_load_fails_over_and_the_worker_follows(
    topology: Topology, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """A master that stops answering but keeps its connections open (a network partition):
    the worker's BRPOP to it would wait for TCP; the broker watchdog reconnects it."""
    # Each connection to the frozen master is given up after a socket timeout (5 s), and the
    # worker meets a few of them one after another: slower than a kill, bounded all the same.
    fail_over_under_load(topology, start_worker, tmp_path, lambda worker: topology.freeze_primary(), 40)
    assert topology.frozen  # still frozen: the new master did all of it
    topology.rejoin()  # the partition heals; the old master becomes a replica


def test_a_connection_idle_through_a_failover_follows_the_new_master_when_the_old_one_resumes(
    topology: Topology,
) -> None:
    """A frozen master resumes as a master, with the data it had, until the Sentinels demote it
    (about 10 s): a connection that sat idle through the failover, like a worker's lock-check
    line or a pooled one, must not send its next command there."""
    import redis

    from mes_tasks import db
    from mes_tasks.apply.locks import CheckLine, RedisLock
    from mes_tasks.errors import LockLost
    from mes_tasks.settings import Settings

    client = db.redis_client(Settings(redis_url=topology.url(), connect_timeout_s=2))
    lock, line = RedisLock(client, "mes:lock:WO-IDLE", ttl_s=120), CheckLine(client)
    lock.acquire()
    with lock.check_sent(line) as check:
        check.confirm()  # the line is connected to the primary, and stays idle from now on
    client.set("mes:test:pooled", "before")  # so is the pool's connection
    client.wait(1, 5000)  # both keys on the replica too
    topology.freeze_primary()
    new_master = redis.Redis(port=topology.wait_failover(), db=topology.db, decode_responses=True)
    new_master.set(lock.key, "another-holder")  # the lock changed hands on the new master
    topology.rejoin(wait=False)
    with pytest.raises(LockLost), lock.check_sent(line) as check:
        check.confirm()
    client.set("mes:test:pooled", "after")
    assert new_master.get("mes:test:pooled") == "after"


def fail_over_under_load(
    topology: Topology,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
    inject: Callable[[Worker], object],
    again_within_s: float = 15,
) -> dict[str, Any]:
    """Feed the updates, ``inject`` the primary's failure after ``KILL_AFTER``, check every
    update counted once and soon; what the feed recorded."""
    from mes_tasks.models import FailedUpdate, QuantityLog, WorkOrder

    make_work_orders(WORK_ORDERS)
    # The shipped timings: a failover must not cost a dead letter on them.
    sentinels = {"REDIS_URL": topology.url(master_in_url=False), "MES_REDIS_SENTINEL_MASTER": "mymaster",
                 **DEFAULT_TIMINGS}  # fmt: skip
    worker = start_worker(**sentinels)
    out = tmp_path / "feed.json"
    feed_argv = [sys.executable, "-c", f"import test_sentinel; test_sentinel.feed({str(out)!r})"]
    env = {**os.environ, **TEST_ENV, **sentinels, "PYTHONPATH": str(REPO)}
    producer = Child("feed", feed_argv, tmp_path / "feed.log", env=env, cwd=TESTS).start()
    assert producer.wait_for(f"sent {KILL_AFTER}\n", 30), producer.log_text()[-3000:]

    inject(worker)
    killed_at = time.time()
    topology.wait_failover()
    failed_over_s = time.time() - killed_at
    producer.wait(FEED_TIMEOUT_S + UPDATES / RATE + 10)
    assert producer.returncode == 0, producer.log_text()[-3000:]

    fed = json.loads(out.read_text())
    accepted = {rid: tuple(u) for rid, u in fed["accepted"].items()}
    logs = list(QuantityLog.objects.only("request_id", "created_at"))
    missing = sorted(set(accepted) - {log.request_id for log in logs})
    logs_tail = f"the worker's log: {worker.log_text()[-6000:]}\nthe feed's: {producer.log_text()[-2000:]}"
    assert not missing, f"{len(missing)} never applied, first {missing[:5]}; {logs_tail}"
    assert sorted(log.request_id for log in logs) == sorted(accepted)  # each applied once, none lost
    for wo in WorkOrder.objects(id__in=WORK_ORDERS):
        for kind in ("input", "output"):
            expected = sum(q for w, k, q in accepted.values() if (w, k) == (wo.id, kind))
            assert getattr(wo, f"{kind}_qty") == expected, (wo.id, kind)
    assert FailedUpdate.objects.count() == 0
    applied_at = {log.request_id: log.created_at.timestamp() for log in logs}
    again_s = min(t for t in applied_at.values() if t > killed_at) - killed_at
    before = [rid for rid, t in fed["sent_at"].items() if t < killed_at]
    settled_s = max(applied_at[rid] for rid in before) - killed_at
    print(f"failover {failed_over_s:.1f} s; updates applied again {again_s:.1f} s and every earlier one "
          f"{settled_s:.1f} s after the kill; the relay re-sent {fed['relayed'].get('republished', 0)}; "
          f"submissions {fed['codes']}")  # fmt: skip
    assert again_s < again_within_s and settled_s < again_within_s + 5
    fed_back: dict[str, Any] = fed
    return fed_back


def test_a_sentinel_url_gives_every_store_client_the_master_with_todays_options() -> None:
    import redis.sentinel

    from mes_tasks import db
    from mes_tasks.settings import Settings

    settings = Settings(
        redis_url="sentinel://:pw@h1;sentinel://:pw@h2/3?master_name=m",
        connect_timeout_s=2,
        redis_timeout_s=0.5,
    )
    pool = db.redis_client(settings).connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == "m"
    assert pool.connection_class is db.MasterConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"], kwargs["socket_timeout"]) == (
        3,
        "pw",
        True,
        0.5,
    )
    assert kwargs["socket_connect_timeout"] == 2 and kwargs["retry"].get_retries() == 1
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [
        26379,
        26379,
    ]
