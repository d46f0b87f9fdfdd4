"""``make demo``: a simulated factory line against the running stack (started if needed).

Several producer processes send scans at a chosen rate, with a share of duplicate
scans and of bad input; a progress bar; then a summary and an audit of the line's
work orders, which must find nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import click

from devtools.load import plan as load_plan
from devtools.process import Child

LINE = [f"DEMO-{i:03d}" for i in range(1, 11)]
DRAIN_TIMEOUT_S = 600.0
STACK_TIMEOUT_S = 120.0


def plan(run: str, count: int, dup_share: float, bad_share: float, seed: int) -> list[dict[str, Any]]:
    """The scans to send; duplicates repeat an earlier scan exactly, bad ones are malformed."""
    return load_plan(count, LINE, f"demo:{run}", seed, dup_share=dup_share, bad_share=bad_share,
                     max_quantity=5, source="DEMO")  # fmt: skip


def produce(args: tuple[list[dict[str, Any]], float, Any]) -> list[dict[str, Any]]:
    """One producer process: send its scans at ``rate`` per second, report progress."""
    from mes_tasks.send.producer import submit_quantity_update

    scans, rate, progress = args
    results = []
    started = time.monotonic()
    for n, scan in enumerate(scans):
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
        results.append(submit_quantity_update(**scan))
        progress.put(1)
    return results


def send_all(scans: list[dict[str, Any]], producers: int, rate: float) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Manager().Queue()
    shares = [(scans[i::producers], rate / producers, progress) for i in range(producers)]
    with ctx.Pool(producers) as pool:
        pending = pool.map_async(produce, shares)
        with click.progressbar(length=len(scans), label=f"{producers} producers sending") as bar:
            while not pending.ready() or not progress.empty():
                while not progress.empty():
                    bar.update(progress.get())
                time.sleep(0.05)
        return [r for share in pending.get() for r in share]


def wait_for_drain(client: Any) -> None:
    """Until nothing waits in ``workorder`` and nothing is in flight, for two looks in a row."""
    from mes_tasks.ops.status import backlog

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    quiet = 0
    while quiet < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not drain the queue in time: is it running?")
        busy = backlog(client)
        quiet = quiet + 1 if busy == 0 else 0
        time.sleep(0.5)


def summarise(run: str, scans: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, int]:
    """The run's numbers, counted by request id as the worker's metrics count outcomes.

    ``applied``: logs; ``failed``: dead letters, one per request id; ``duplicates``: the
    queued rest, repeats of an applied scan and of a refused one whose dead letter is open.
    """
    from mes_tasks.models import FailedUpdate, QuantityLog

    queued = sum(1 for r in results if r["success"])
    of_run = {"request_id": {"$regex": f"^{re.escape(f'demo:{run}:')}"}}
    applied = QuantityLog._get_collection().count_documents(of_run)
    failed = FailedUpdate._get_collection().count_documents(of_run)
    refused = Counter(r["code"] for r in results if not r["success"])
    return {
        "sent": len(scans),
        "queued": queued,
        "applied": applied,
        "duplicates": queued - applied - failed,
        "refused": sum(refused.values()),
        "failed": failed,
    }


def ensure_stack() -> Child | None:
    """Use ``REDIS_URL`` / ``make run``'s stack; start that stack in the background if it is down."""
    from devtools.devserver import DEV_MONGO_PORT, DEV_REDIS_PORT, port_open, secantus_uri

    if os.environ.get("REDIS_URL"):
        return None  # a stack of the user's own
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{DEV_REDIS_PORT}/3"
    os.environ.setdefault("MONGODB_URI", secantus_uri(DEV_MONGO_PORT, "mes"))
    if port_open(DEV_REDIS_PORT):
        return None
    click.echo("the stack is not running: starting it (output in var/log/demo-stack.log)")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
    argv = [sys.executable, "-m", "devtools.devserver", "run"]
    return Child("stack", argv, Path("var/log/demo-stack.log"), env=env).start()


def wait_for_worker(app: Any) -> None:
    from mes_tasks.ops.status import consumers

    deadline = time.monotonic() + STACK_TIMEOUT_S
    while not consumers(app).get("workorder"):
        if time.monotonic() > deadline:
            raise SystemExit("no worker consumes workorder: start the stack with `make run`")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--producers", type=int, default=int(os.environ.get("DEMO_PRODUCERS", 4)))
    parser.add_argument("--count", type=int, default=int(os.environ.get("DEMO_COUNT", 1000)))
    parser.add_argument(
        "--rate", type=float, default=float(os.environ.get("DEMO_RATE", 50)), help="scans/s, all"
    )
    parser.add_argument("--dup-share", type=float, default=float(os.environ.get("DEMO_DUP_SHARE", 0.1)))
    parser.add_argument("--bad-share", type=float, default=float(os.environ.get("DEMO_BAD_SHARE", 0.05)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("DEMO_SEED", 1)))
    args = parser.parse_args(argv)
    stack = ensure_stack()
    try:
        return _demo(args)
    finally:
        if stack is not None:
            stack.stop(60)


def _demo(args: argparse.Namespace) -> int:
    from mes_tasks import app, db
    from mes_tasks.audit.checks import run_audit
    from mes_tasks.models import WorkOrder
    from mes_tasks.settings import get_settings

    settings = get_settings()
    mongo = db.prepare(settings)
    wait_for_worker(app)
    for wo in LINE:
        WorkOrder.objects(id=wo).upsert_one(set_on_insert__input_qty=0)
    run = uuid.uuid4().hex[:8]
    scans = plan(run, args.count, args.dup_share, args.bad_share, args.seed)
    results = send_all(scans, args.producers, args.rate)
    click.echo("waiting for the worker to drain the queue ...")
    wait_for_drain(db.redis_client(settings))
    summary = summarise(run, scans, results)
    click.echo("  ".join(f"{k}={v}" for k, v in summary.items()))
    findings = run_audit(mongo, LINE).findings
    click.echo(f"audit of {len(LINE)} work orders: {len(findings)} finding(s)")
    return 0 if not findings and summary["duplicates"] >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
