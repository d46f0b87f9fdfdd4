"""`make run`'s devserver: the whole stack in the foreground, stopped cleanly, data kept in var/."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from pymongo import MongoClient

from conftest import REPO, wait_until
from devtools.devserver import free_port, port_open, secantus_uri

SUBMIT = """
from mes_tasks import db
from mes_tasks.models import WorkOrder
from mes_tasks.settings import get_settings
from mes_tasks.tasks import update_quantity
db.connect(get_settings())
WorkOrder.objects(id="WO-1001").upsert_one(set_on_insert__input_qty=0)
sent = update_quantity.delay("WO-1001", "output", 1, request_id="scan:BC123:PACK")
print(sent.get(timeout=60)["status"])
"""


def start_stack(var: Path, *ports: int) -> tuple[subprocess.Popen[str], Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
    env.pop("MES_FLOWER_PASSWORD", None)
    log = var.parent / f"devserver-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "devtools.devserver", "run", "--var", str(var)]
    argv += [
        f"--{name}-port={port}"
        for name, port in zip(("redis", "mongo", "flower", "metrics"), ports, strict=True)
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    ready = ("workorder| ", "audit    | ")

    def up() -> bool:
        text = log.read_text()
        return all(any(line.startswith(p) and " ready." in line for line in text.splitlines()) for p in ready)

    wait_until(lambda: up() or proc.poll() is not None, 90, "the stack")
    assert proc.poll() is None, log.read_text()
    return proc, log


def bare_env() -> dict[str, str]:
    """A new shell's environment: no store URL, no MES_* setting, no venv on PATH."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}


def flower_get(port: int, path: str, auth: tuple[str, str] | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def submit(redis_port: int, mongo_port: int) -> str:
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/3",
        "MONGODB_URI": secantus_uri(mongo_port, "mes"),
    }
    done = subprocess.run([sys.executable, "-c", SUBMIT], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow  # the whole stack, for 20 s
def test_the_stack_runs_stops_on_ctrl_c_and_keeps_its_data(tmp_path: Path) -> None:
    var, redis_port, mongo_port, flower_port = tmp_path / "var", free_port(), free_port(), free_port()
    metrics_port = free_port()
    proc, log = start_stack(var, redis_port, mongo_port, flower_port, metrics_port)
    assert submit(redis_port, mongo_port) == "applied"

    password = (var / "flower-password").read_text().strip()
    assert f"generated Flower password (kept in {var / 'flower-password'}): {password}" in log.read_text()
    wait_until(lambda: port_open(flower_port), 60, "Flower")
    assert flower_get(flower_port, "/", None)[0] == 401
    assert flower_get(flower_port, "/", ("admin", "wrong"))[0] == 401
    assert flower_get(flower_port, "/", ("admin", password))[0] == 200
    assert flower_get(flower_port, "/api/workers", None)[0] == 401

    def workers_listed() -> bool:
        status, body = flower_get(flower_port, "/api/workers?refresh=1", ("admin", password))
        return status == 200 and "workorder@" in body and "audit@" in body

    wait_until(workers_listed, 60, "Flower to list the workers")
    wait_until(lambda: port_open(metrics_port), 60, "the metrics endpoint")

    def counted() -> bool:  # the worker flushes its counts between tasks, twice a second
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20) as reply:
            return "mes_updates_applied_total 1.0" in reply.read().decode()

    wait_until(counted, 10, "the applied update to be counted")

    env_file = (var / "stack.env").read_text()  # what `make shell` sources
    assert f"export REDIS_URL=redis://127.0.0.1:{redis_port}/3" in env_file
    assert (var / "stack.env").stat().st_mode & 0o077 == 0  # its owner's only
    shell = f". {var / 'stack.env'} && celery -A mes_tasks queue status --json"
    done = subprocess.run(
        ["bash", "-c", shell], cwd=REPO, env=bare_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and '"queues"' in done.stdout, done.stderr
    for name in ("workorder", "audit", "beat", "flower", "metrics", "redis"):
        assert (var / "log" / f"{name}.log").stat().st_size > 0, name
    assert (var / "log" / "mongo.log").exists()  # SecantusDB logs warnings only
    assert password not in (var / "log" / "flower.log").read_text()
    redis.Redis(port=redis_port, db=3).set("mes:test:kept", "1")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert not port_open(redis_port) and not port_open(mongo_port)
    assert (var / "redis" / "appendonlydir").is_dir()
    assert "stopping redis" in log.read_text()

    proc, log = start_stack(var, redis_port, mongo_port, flower_port, metrics_port)
    assert "generated Flower password" not in log.read_text()  # made once, then kept
    try:
        assert redis.Redis(port=redis_port, db=3).get("mes:test:kept") == b"1"
        assert submit(redis_port, mongo_port) == "duplicate"  # the first run's log is still there
        doc = MongoClient(port=mongo_port).mes.work_orders.find_one({"_id": "WO-1001"})
        assert doc is not None and doc["output_qty"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
