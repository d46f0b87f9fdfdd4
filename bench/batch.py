"""Enqueue rates of a scanner burst, side by side on the same servers in one run.

    python bench/batch.py [--updates N] [--rounds N] [--batch N] [--out FILE]

From one thread, the updates per second that

1. the classic design enqueues with one ``.delay()`` each (bench/classic.py);
2. mes_tasks enqueues with one ``submit_quantity_update`` each (an outbox insert, a publish);
3. mes_tasks enqueues with ``submit_quantity_updates`` in batches of ``--batch`` (one outbox
   write and one pipelined publish per batch).

Nothing consumes: only the producer's side is measured. Each round enqueues ``--updates``
with each design, in an order rotated per round, on a freshly dropped outbox and emptied
queues. Each figure is the median over rounds; each ratio the median of the ratios within a
round, which cancels the test server's drift between rounds. Starts its own redis-server
and SecantusDB, as bench/run.py does (or uses REDIS_URL / MONGODB_URI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py and classic.py, beside this file
from run import machine, start_servers, updates

DESIGNS = ("classic", "one_by_one", "batched")
WARM_UP = 20  # updates per design before the first round: connections, first declarations
Update = tuple[tuple[Any, ...], dict[str, Any]]


def senders(batch: int) -> dict[str, Callable[[list[Update]], None]]:
    import classic

    from mes_tasks.send.producer import submit_quantity_update, submit_quantity_updates

    def one_by_one(todo: list[Update]) -> None:
        for args, kwargs in todo:
            submit_quantity_update(*args, **kwargs)

    def batched(todo: list[Update]) -> None:
        items = [{"work_order_id": a[0], "kind": a[1], "quantity": a[2], **kw} for a, kw in todo]
        for start in range(0, len(items), batch):
            submit_quantity_updates(items[start : start + batch])

    def classic_delay(todo: list[Update]) -> None:
        for args, kwargs in todo:
            classic.update.delay(*args, **kwargs)

    return {"classic": classic_delay, "one_by_one": one_by_one, "batched": batched}


def fresh() -> None:
    """An empty outbox and empty queues, so every design starts from the same state."""
    from classic import QUEUE

    from mes_tasks import db
    from mes_tasks.models import OutboxMessage
    from mes_tasks.names import WORKORDER_QUEUE
    from mes_tasks.settings import get_settings

    OutboxMessage._get_collection().drop()
    OutboxMessage.ensure_indexes()
    db.redis_client(get_settings()).delete(WORKORDER_QUEUE, QUEUE)


def measure(n: int, rounds: int, batch: int) -> dict[str, Any]:
    send = senders(batch)
    for design in DESIGNS:
        send[design](updates(WARM_UP, f"warm-{design}"))
    rates: dict[str, list[float]] = {design: [] for design in DESIGNS}
    for r in range(rounds):
        first = r % len(DESIGNS)
        for design in DESIGNS[first:] + DESIGNS[:first]:
            fresh()
            todo = updates(n, f"{design}-{r}")
            started = time.perf_counter()
            send[design](todo)
            rates[design].append(n / (time.perf_counter() - started))
            done = f"  round {r + 1}/{rounds} {design}: {rates[design][-1]:.0f}/s"
            print(done, file=sys.stderr, flush=True)

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 2)

    return {
        "per_s": {design: round(statistics.median(values), 1) for design, values in rates.items()},
        "batched_vs_classic": paired("batched", "classic"),
        "batched_vs_one_by_one": paired("batched", "one_by_one"),
        "one_by_one_vs_classic": paired("one_by_one", "classic"),
        "per_round": {design: [round(v, 1) for v in values] for design, values in rates.items()},
        "updates": n,
        "rounds": rounds,
        "batch": batch,
    }


def table(res: dict[str, Any]) -> str:
    rate = res["per_s"]
    return "\n".join([
        f"enqueue rate, one thread (updates/s; median of {res['rounds']} rounds of {res['updates']})",
        f"  classic, one .delay() each                {rate['classic']:>8}",
        f"  mes_tasks, one submit each                {rate['one_by_one']:>8}"
        f"   {res['one_by_one_vs_classic']:.2f}x classic",
        f"  mes_tasks, batches of {res['batch']:<4}                {rate['batched']:>8}"
        f"   {res['batched_vs_classic']:.2f}x classic   {res['batched_vs_one_by_one']:.2f}x one by one",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=2000, help="updates per design per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="items per submit_quantity_updates call")
    parser.add_argument("--out", help="also write the results, as JSON, here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mes-bench-batch-") as tmp_dir:
        servers = start_servers(Path(tmp_dir))
        try:
            from mes_tasks import db
            from mes_tasks.settings import get_settings

            db.prepare(get_settings())
            results = {"machine": machine(), "enqueue": measure(args.updates, args.rounds, args.batch)}
        finally:
            for server in reversed(servers):
                server.stop()
    print(table(results["enqueue"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
