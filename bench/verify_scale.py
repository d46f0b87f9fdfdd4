"""Continuous verification's cost against the number of logs ever written.

    python bench/verify_scale.py [--logs 10000,100000,1000000] [--work-orders 1000]

For each size, on its own SecantusDB (or MONGODB_URI): load that many consistent logs over
the work orders (each log with its version, as the ledger writes them), run the first pass
(it proves every work order in full, once), then give every work order one new update and
time the pass that verifies them: the same 1,000 changed work orders whatever the history.
Prints one JSON line per size and the ratio of each pass to the smallest size's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mes_tasks import db
from mes_tasks.audit.verify import VerifyOutcome, verify_pass
from mes_tasks.models import QuantityLog, VerifyCheckpoint, WorkOrder
from mes_tasks.settings import Settings

INSERT_BATCH = 5000
PASSES = 3  # the fastest is kept


def load(n_logs: int, n_wos: int) -> None:
    logs, wos = QuantityLog._get_collection(), WorkOrder._get_collection()
    for model in (QuantityLog, WorkOrder, VerifyCheckpoint):
        model._get_collection().drop()
        model.ensure_indexes()
    totals: dict[str, list[int]] = {f"WO-{i:06d}": [0, 0, 0] for i in range(n_wos)}  # input, output, version
    batch: list[dict[str, Any]] = []
    for i in range(n_logs):
        wo, kind = f"WO-{i % n_wos:06d}", i % 2
        t = totals[wo]
        t[kind] += 1
        t[2] += 1
        batch.append({"request_id": f"b{i}", "work_order_id": wo, "kind": ("input", "output")[kind],
                      "quantity": 1, "value_after": t[kind], "version": t[2], "epoch": 1})  # fmt: skip
        if len(batch) == INSERT_BATCH:
            logs.insert_many(batch, ordered=False)
            batch = []
    if batch:
        logs.insert_many(batch, ordered=False)
    wos.insert_many([{"_id": wo, "input_qty": t[0], "output_qty": t[1], "epoch": 1, "version": t[2]}
                     for wo, t in totals.items()])  # fmt: skip


def one_update_each(round_: int) -> None:
    """What the ledger writes for one input update of every work order (log + counter)."""
    logs, wos = QuantityLog._get_collection(), WorkOrder._get_collection()
    docs = list(wos.find({}, {"input_qty": 1, "version": 1}))
    new = [
        {"request_id": f"new{round_}-{d['_id']}", "work_order_id": d["_id"], "kind": "input",
         "quantity": 1, "value_after": d["input_qty"] + 1, "version": d["version"] + 1, "epoch": 1}
        for d in docs
    ]  # fmt: skip
    logs.insert_many(new)
    for d in docs:
        wos.update_one({"_id": d["_id"]}, {"$inc": {"input_qty": 1, "version": 1}})


def a_pass(mongo: db.Mongo) -> VerifyOutcome:
    return verify_pass(mongo, sweep=0, complete_s=300, settled=lambda ids: set(), held=dict)


def measure(uri: str, n_logs: int, n_wos: int) -> dict[str, Any]:
    mongo = db.prepare(Settings(mongodb_uri=uri))
    load(n_logs, n_wos)
    started = time.perf_counter()
    first = a_pass(mongo)
    first_s = time.perf_counter() - started
    assert not first.findings and first.proved == n_wos, first
    took = float("inf")
    for round_ in range(PASSES):
        one_update_each(round_)
        started = time.perf_counter()
        outcome = a_pass(mongo)
        took = min(took, time.perf_counter() - started)
        assert (outcome.changed, outcome.proved, outcome.logs_read, outcome.findings) == (n_wos, 0, n_wos, [])
    return {"logs": n_logs, "work_orders": n_wos, "first_pass_s": round(first_s, 3),
            "pass_s": round(took, 3), "logs_read_per_pass": n_wos}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", default="10000,100000")
    parser.add_argument("--work-orders", type=int, default=1000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools: not installed
    from devtools.devserver import free_port, mongo_service, secantus_uri

    results = []
    for n_logs in (int(n) for n in args.logs.split(",")):
        uri, server = os.environ.get("MONGODB_URI"), None
        if not uri:
            port = free_port()
            server = mongo_service(Path(tempfile.mkdtemp(prefix="mes-bench-")), port).start()
            uri = secantus_uri(port, "mes_bench")
        try:
            results.append(measure(uri, n_logs, args.work_orders))
        finally:
            if server:
                server.stop()
        results[-1]["ratio_to_smallest"] = round(results[-1]["pass_s"] / results[0]["pass_s"], 2)
        print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
