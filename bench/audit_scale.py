"""Audit scaling: audit time and peak memory for N logs, next to a bare $group (the floor).

    python bench/audit_scale.py --logs 100000 [--work-orders 1000]

Starts its own SecantusDB (or uses MONGODB_URI), loads N consistent logs, then times,
side by side on the same server: a bare server-side $group over the logs, and the audit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from mes_tasks import db
from mes_tasks.audit.checks import run_audit
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.settings import Settings

INSERT_BATCH = 5000
DEFAULT_WORK_ORDERS = 1000


def load(n_logs: int, n_wos: int) -> None:
    logs, wos = QuantityLog._get_collection(), WorkOrder._get_collection()
    for model, coll in ((QuantityLog, logs), (WorkOrder, wos)):
        coll.drop()  # deleting documents one by one would leave the server slow on this collection
        model.ensure_indexes()
    totals: dict[str, list[int]] = {f"WO-{i:06d}": [0, 0] for i in range(n_wos)}
    batch: list[dict[str, Any]] = []
    for i in range(n_logs):
        wo, kind = f"WO-{i % n_wos:06d}", i % 2
        totals[wo][kind] += 1
        batch.append({"request_id": f"b{i}", "work_order_id": wo, "kind": ("input", "output")[kind],
                      "quantity": 1, "value_after": totals[wo][kind], "epoch": 1})  # fmt: skip
        if len(batch) == INSERT_BATCH:
            logs.insert_many(batch, ordered=False)
            batch = []
    if batch:
        logs.insert_many(batch, ordered=False)
    wos.insert_many(
        [
            {"_id": wo, "input_qty": t[0], "output_qty": t[1], "epoch": 1, "version": 1}
            for wo, t in totals.items()
        ]
    )


def bare_group_s() -> float:
    started = time.perf_counter()
    pipeline = [{"$group": {"_id": "$work_order_id", "s": {"$sum": "$quantity"}}}]
    for _ in QuantityLog._get_collection().aggregate(pipeline, allowDiskUse=True):
        pass
    return time.perf_counter() - started


def audit_s(mongo: db.Mongo, runs: int = 2) -> tuple[float, float, int]:
    """The fastest of ``runs`` audits (as for the ``$group``), and an audit's peak Python memory.

    The peak is taken in a run of its own: tracemalloc slows every allocation.
    """
    tracemalloc.start()
    outcome = run_audit(mongo)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not outcome.findings, outcome.findings[:3]
    took = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        run_audit(mongo)
        took = min(took, time.perf_counter() - started)
    return took, peak / 2**20, outcome.logs_scanned


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", type=int, default=100_000)
    parser.add_argument("--work-orders", type=int, default=DEFAULT_WORK_ORDERS)
    args = parser.parse_args()
    server = None
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools: not installed
        from devtools.devserver import free_port, mongo_service, secantus_uri

        port = free_port()
        server = mongo_service(Path(tempfile.mkdtemp(prefix="mes-bench-")), port).start()
        uri = secantus_uri(port, "mes_bench")
    try:
        mongo = db.prepare(Settings(mongodb_uri=uri))
        load(args.logs, args.work_orders)
        group = min(bare_group_s() for _ in range(2))
        took, peak_mb, scanned = audit_s(mongo)
        result = {"logs": scanned, "work_orders": args.work_orders, "audit_s": round(took, 3),
                  "group_floor_s": round(group, 3), "ratio": round(took / group, 2),
                  "audit_peak_py_mb": round(peak_mb, 2)}  # fmt: skip
        print(json.dumps(result))
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
