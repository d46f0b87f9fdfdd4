"""The HTTP gateway against the producer called in-process, side by side on the same servers in one run.

    python bench/api.py [--updates N] [--rounds N] [--clients 1,4,16] [--workers N] [--out FILE]

1. submissions per second with 1, 4 and 16 concurrent clients: through the gateway (one
   keep-alive connection per client thread) and ``submit_quantity_update`` in this process
   (as many threads);
2. the latency a submission sees at 100 requests/s, one client: p50 and p99 of each, and
   what the gateway adds;
3. from one thread: the batch endpoint (100 updates a call) against the classic design's
   one ``.delay()`` each (bench/classic.py).

Nothing consumes: only the sending side is measured. Each round starts from a dropped
outbox and empty queues, its designs in an order rotated per round; each figure is the
median over rounds and each ratio the median of the ratios within a round. The gateway runs
as a deployer would on this machine (``celery -A mes_tasks api --workers N``, 2 by default).
Starts its own redis-server and SecantusDB (or uses REDIS_URL / MONGODB_URI).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py, batch.py and classic.py, beside this file
from batch import fresh
from run import REPO, machine, start_servers, updates

TOKEN = "bench-producer-token-0123456789"
PACED_RATE = 100.0
PACED_S = 10.0
BATCH = 100
Update = tuple[tuple[Any, ...], dict[str, Any]]


class Client:
    """One keep-alive connection to the gateway, as a main app's HTTP client keeps one."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def post(self, path: str, body: Any) -> dict[str, Any]:
        try:
            return self._post(path, body)
        except ConnectionError:  # closed while idle (the server's keep-alive timeout): once more, anew
            self.conn.close()
            return self._post(path, body)

    def _post(self, path: str, body: Any) -> dict[str, Any]:
        self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
        if response.status >= 400:
            raise RuntimeError(f"{response.status}: {answer}")
        return answer

    def submit(self, update: Update) -> None:
        (wo, kind, qty), kwargs = update
        self.post(
            "/api/workorder/update-quantity", {"work_order_id": wo, "kind": kind, "quantity": qty, **kwargs}
        )


def start_gateway(base: Path, workers: int) -> tuple[Any, int]:
    from devtools.devserver import api_argv, free_port
    from devtools.process import Child

    port = free_port()
    env = {**os.environ, "MES_API_TOKENS": f"producer:{TOKEN}"}
    child = Child("api", api_argv(port, workers=workers), base / "api.log", env=env, cwd=REPO).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
            return child, port
        except OSError:
            time.sleep(0.2)
    child.stop()
    raise RuntimeError(f"the gateway did not start:\n{child.log_text()[-2000:]}")


def in_threads(n_threads: int, todo: list[Update], send: Callable[[int], Callable[[Update], None]]) -> float:
    """Updates per second sending ``todo`` from ``n_threads`` threads, each with its own sender."""
    shares = [todo[i::n_threads] for i in range(n_threads)]
    senders = [send(i) for i in range(n_threads)]
    threads = [threading.Thread(target=lambda s=s, share=share: [s(u) for u in share]) for s, share in
               zip(senders, shares, strict=True)]  # fmt: skip
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(todo) / (time.perf_counter() - started)


def concurrency(port: int, n: int, rounds: int, clients: list[int]) -> dict[str, Any]:
    from mes_tasks.send.producer import submit_quantity_update

    def direct(_: int) -> Callable[[Update], None]:
        return lambda u: submit_quantity_update(*u[0], **u[1])

    def gateway(_: int) -> Callable[[Update], None]:
        return Client(port).submit

    designs = {"gateway": gateway, "in_process": direct}
    out: dict[str, Any] = {}
    for c in clients:
        rates: dict[str, list[float]] = {d: [] for d in designs}
        for r in range(rounds):
            for name in list(designs)[r % 2 :] + list(designs)[: r % 2]:
                fresh()
                rates[name].append(in_threads(c, updates(n, f"{name}-{c}-{r}"), designs[name]))
                print(f"  {c} client(s), round {r + 1}/{rounds} {name}: {rates[name][-1]:.0f}/s",
                      file=sys.stderr, flush=True)  # fmt: skip
        out[str(c)] = {
            "per_s": {d: round(statistics.median(v), 1) for d, v in rates.items()},
            "gateway_vs_in_process": paired(rates["gateway"], rates["in_process"]),
        }
    return out


def paced_latency(port: int) -> dict[str, Any]:
    from mes_tasks.send.producer import submit_quantity_update

    client = Client(port)
    sends: dict[str, Callable[[Update], None]] = {
        "gateway": client.submit, "in_process": lambda u: submit_quantity_update(*u[0], **u[1])}  # fmt: skip
    out: dict[str, Any] = {}
    for name, send in sends.items():
        fresh()
        todo, took = updates(int(PACED_RATE * PACED_S), f"paced-{name}"), []
        start = time.perf_counter()
        for i, update in enumerate(todo):
            time.sleep(max(0.0, start + i / PACED_RATE - time.perf_counter()))
            began = time.perf_counter()
            send(update)
            took.append((time.perf_counter() - began) * 1000)
        took.sort()
        out[name] = {
            "p50_ms": round(took[len(took) // 2], 2),
            "p99_ms": round(took[int(len(took) * 0.99)], 2),
        }
    out["added_p50_ms"] = round(out["gateway"]["p50_ms"] - out["in_process"]["p50_ms"], 2)
    out["added_p99_ms"] = round(out["gateway"]["p99_ms"] - out["in_process"]["p99_ms"], 2)
    return out


def batch_vs_classic(port: int, n: int, rounds: int) -> dict[str, Any]:
    import classic

    client = Client(port)

    def batched(todo: list[Update]) -> None:
        items = [{"work_order_id": a[0], "kind": a[1], "quantity": a[2], **kw} for a, kw in todo]
        for start in range(0, len(items), BATCH):
            client.post("/api/workorder/batch-update-quantity", {"updates": items[start : start + BATCH]})

    def one_by_one(todo: list[Update]) -> None:
        for args, kwargs in todo:
            classic.update.delay(*args, **kwargs)

    designs = {"gateway_batch": batched, "classic": one_by_one}
    rates: dict[str, list[float]] = {d: [] for d in designs}
    for r in range(rounds):
        for name in list(designs)[r % 2 :] + list(designs)[: r % 2]:
            fresh()
            todo = updates(n, f"b-{name}-{r}")
            started = time.perf_counter()
            designs[name](todo)
            rates[name].append(n / (time.perf_counter() - started))
    return {
        "per_s": {d: round(statistics.median(v), 1) for d, v in rates.items()},
        "gateway_batch_vs_classic": paired(rates["gateway_batch"], rates["classic"]),
        "batch": BATCH,
    }


def paired(a: list[float], b: list[float]) -> float:
    """The median of the ratios within a round."""
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 2)


def table(res: dict[str, Any]) -> str:
    lines = [f"submissions/s by concurrent clients ({res['workers']} gateway processes; median of rounds)"]
    for c, row in res["concurrency"].items():
        lines.append(f"  {c:>2} client(s): gateway {row['per_s']['gateway']:>7}  in-process "
                     f"{row['per_s']['in_process']:>7}   {row['gateway_vs_in_process']:.2f}x")  # fmt: skip
    lat = res["latency"]
    gw, ip = lat["gateway"], lat["in_process"]
    lines.append(f"latency at {PACED_RATE:g}/s: gateway p50 {gw['p50_ms']} ms p99 {gw['p99_ms']} ms; "
                 f"in-process p50 {ip['p50_ms']} ms p99 {ip['p99_ms']} ms; added p50 {lat['added_p50_ms']} "
                 f"ms p99 {lat['added_p99_ms']} ms")  # fmt: skip
    b = res["batch"]
    rate = b["per_s"]
    lines.append(f"one thread: gateway batches of {b['batch']} {rate['gateway_batch']}/s, classic .delay() "
                 f"{rate['classic']}/s: {b['gateway_batch_vs_classic']:.2f}x classic")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=2000, help="updates per design per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--workers", type=int, default=2, help="gateway processes")
    parser.add_argument("--out", help="also write the results, as JSON, here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mes-bench-api-") as tmp_dir:
        servers = start_servers(Path(tmp_dir))
        gateway = None
        try:
            from mes_tasks import db
            from mes_tasks.settings import get_settings

            db.prepare(get_settings())
            gateway, port = start_gateway(Path(tmp_dir), args.workers)
            clients = [int(c) for c in args.clients.split(",")]
            results = {
                "machine": machine(),
                "workers": args.workers,
                "concurrency": concurrency(port, args.updates, args.rounds, clients),
                "latency": paced_latency(port),
                "batch": batch_vs_classic(port, args.updates, args.rounds),
            }
        finally:
            if gateway is not None:
                gateway.stop()
            for server in reversed(servers):
                server.stop()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
