"""A main app in another language: the Node.js client of examples/node against a real gateway and worker.

Many concurrent Node callers, a share of updates sent twice, and every open connection cut
every 50 ms by a proxy between Node and the gateway (so some calls go through while Node
sees an error, and sends them again with the same idempotency key): the counts are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from api_client import PRODUCER_TOKEN, Gateway, start_gateway

from conftest import TEST_ENV, Worker, make_work_orders, wait_until
from devtools.faultproxy import FaultProxy
from mes_tasks.models import QuantityLog, WorkOrder

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
CUT_EVERY_S = 0.05


def node() -> str:
    found = shutil.which("node")
    if found is None:
        message = (
            "Node.js (node, version 18 or later) is not on the PATH: install it to run the Node client test"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture()
def gateway(services: redis.Redis, tmp_path: Path) -> Iterator[Gateway]:
    running = start_gateway(tmp_path / "api.log", TEST_ENV)
    yield running
    running.stop()


def _cutting(proxy: FaultProxy, stop: threading.Event) -> None:
    while not stop.wait(CUT_EVERY_S):
        proxy.drop_all()


def test_concurrent_node_callers_with_repeats_and_cut_connections_count_exactly(
    gateway: Gateway, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    binary = node()
    make_work_orders([f"WO-N{i}" for i in range(8)])
    start_worker()
    proxy, stop = FaultProxy(gateway.port, seed=7).start(), threading.Event()
    cutter = threading.Thread(target=_cutting, args=(proxy, stop), daemon=True)
    cutter.start()
    env = {**os.environ, "MES_API_URL": f"http://127.0.0.1:{proxy.port}", "MES_API_TOKEN": PRODUCER_TOKEN}
    try:
        args = ["--callers", "16", "--updates", "300", "--retries", "40"]  # a main app retries until answered
        done = subprocess.run([binary, str(NODE_DIR / "load.mjs"), *args],
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    finally:
        stop.set()
        cutter.join()
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(summary["codes"], "resent", summary["resent"])
    assert summary["sent"] > summary["unique"] == 300
    assert set(summary["codes"]) <= {"QUEUED", "DUPLICATE"}, summary  # every call answered in the end
    assert summary["resent"] > 0, "no connection was cut: the proxy did not do its part"

    def counted() -> bool:
        totals = {}
        for doc in WorkOrder._get_collection().find({}):
            totals[f"{doc['_id']}:input"] = doc.get("input_qty", 0)
            totals[f"{doc['_id']}:output"] = doc.get("output_qty", 0)
        return all(totals.get(k) == v for k, v in summary["expected"].items())

    wait_until(counted, 60, "every update counted")
    docs = WorkOrder._get_collection().find({})
    assert sum(d.get("input_qty", 0) + d.get("output_qty", 0) for d in docs) == sum(
        summary["expected"].values()
    )
    assert QuantityLog.objects.count() == summary["unique"]  # one log per request id, none twice
