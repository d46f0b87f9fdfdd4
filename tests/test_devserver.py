"""`make run`'s devserver: the whole stack in the foreground, stopped cleanly, data kept in var/."""

from __future__ import annotations

import base64
import json
import os
import shlex
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
from devtools.devserver import free_port, port_open, secantus_uri, settle_store_urls
from devtools.stack import write_env_file

STACK_READY_TIMEOUT_S = 90.0
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


def run_argv(var: Path, *ports: int) -> list[str]:
    """``make run``'s command line, on these ports (redis, mongo, flower, metrics, api)."""
    argv = [sys.executable, "-m", "devtools.devserver", "run", "--var", str(var)]
    return argv + [
        f"--{name}-port={port}"
        for name, port in zip(("redis", "mongo", "flower", "metrics", "api"), ports, strict=True)
    ]


def http_json(port: int, path: str, token: str, body: dict[str, object] | None = None) -> dict[str, object]:
    """One call to the stack's gateway (a POST of ``body`` as JSON, else a GET)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=20) as reply:
        answer: dict[str, object] = json.loads(reply.read())
        return answer


def start_stack(var: Path, *ports: int) -> tuple[subprocess.Popen[str], Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
    env.pop("MES_FLOWER_PASSWORD", None)
    return launch(run_argv(var, *ports), env, var.parent)


def launch(argv: list[str], env: dict[str, str], logs: Path) -> tuple[subprocess.Popen[str], Path]:
    """The stack started by ``argv``, once both workers said they are ready."""
    log = logs / f"devserver-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    ready = ("workorder| ", "audit    | ")

    def up() -> bool:
        text = log.read_text()
        return all(any(line.startswith(p) and " ready." in line for line in text.splitlines()) for p in ready)

    try:
        wait_until(lambda: up() or proc.poll() is not None, STACK_READY_TIMEOUT_S, "the stack")
    except AssertionError:
        proc.send_signal(signal.SIGINT)  # the stack stops what it started
        proc.wait(60)
        raise AssertionError(f"the stack was not ready:\n{log.read_text()[-3000:]}") from None
    assert proc.poll() is None, log.read_text()
    return proc, log


def child_pid(parent: int, marker: str) -> int:
    """The pid of ``parent``'s child whose command line contains ``marker``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if ppid == parent and marker in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {parent} runs {marker!r}")


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
    metrics_port, api_port = free_port(), free_port()
    proc, log = start_stack(var, redis_port, mongo_port, flower_port, metrics_port, api_port)
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

    os.kill(child_pid(proc.pid, "-Q workorder"), signal.SIGKILL)  # as compose would, the stack restarts it
    wait_until(
        lambda: "[stack] workorder exited with -9; restarting it in 1 s" in log.read_text(), 20, "the restart"
    )
    wait_until(
        lambda: log.read_text().count(" ready.") >= 3, STACK_READY_TIMEOUT_S, "the new workorder worker"
    )
    assert submit(redis_port, mongo_port) == "duplicate"  # consumed again, counted once

    env_file = (var / "stack.env").read_text()  # what `make shell` sources
    assert f"export REDIS_URL=redis://127.0.0.1:{redis_port}/3" in env_file
    tokens = (var / "api-tokens").read_text().split()
    assert f"export MES_API_URL=http://127.0.0.1:{api_port}" in env_file and tokens[0] in env_file
    assert all(t.split(":", 1)[1] not in log.read_text() for t in tokens)  # never printed
    wait_until(lambda: port_open(api_port), 60, "the HTTP gateway")
    producer = tokens[0].split(":", 1)[1]
    item = {"work_order_id": "WO-1001", "kind": "input", "quantity": 1, "request_id": "stack-http-1"}
    sent = http_json(api_port, "/api/workorder/update-quantity", producer, item)
    assert sent["code"] == "QUEUED", sent
    wait_until(lambda: http_json(api_port, "/api/updates/stack-http-1", producer)["state"] == "applied", 30,
               "the update sent over HTTP to be applied")  # fmt: skip
    assert (var / "stack.env").stat().st_mode & 0o077 == 0  # its owner's only
    shell = f". {var / 'stack.env'} && celery -A mes_tasks queue status --json"
    done = subprocess.run(
        ["bash", "-c", shell], cwd=REPO, env=bare_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and '"queues"' in done.stdout, done.stderr
    for name in ("workorder", "audit", "beat", "flower", "metrics", "api", "redis"):
        assert (var / "log" / f"{name}.log").stat().st_size > 0, name
    assert (var / "log" / "mongo.log").exists()  # SecantusDB logs warnings only
    assert password not in (var / "log" / "flower.log").read_text()
    redis.Redis(port=redis_port, db=3).set("mes:test:kept", "1")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert not port_open(redis_port) and not port_open(mongo_port)
    assert (var / "redis" / "appendonlydir").is_dir()
    assert "stopping redis" in log.read_text()

    proc, log = start_stack(var, redis_port, mongo_port, flower_port, metrics_port, api_port)
    assert "generated Flower password" not in log.read_text()  # made once, then kept
    try:
        assert redis.Redis(port=redis_port, db=3).get("mes:test:kept") == b"1"
        assert submit(redis_port, mongo_port) == "duplicate"  # the first run's log is still there
        doc = MongoClient(port=mongo_port).mes.work_orders.find_one({"_id": "WO-1001"})
        assert doc is not None and doc["output_qty"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def own_stack_env(var: Path, redis_port: int, mongo_port: int) -> Path:
    """The stack.env an earlier ``make run`` on these ports wrote (what ``make shell`` sources)."""
    own = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/3", "MONGODB_URI": secantus_uri(mongo_port, "mes")}
    return write_env_file(var, {**own, "MES_REPORTS_DIR": str(var / "reports")})


@pytest.mark.slow  # the whole stack, started and stopped
def test_make_run_inside_make_shell_with_the_stack_stopped_starts_its_own_servers(tmp_path: Path) -> None:
    var, ports = tmp_path / "var", [free_port() for _ in range(5)]
    var.mkdir()
    env_file = own_stack_env(var, ports[0], ports[1])
    typed = f". {env_file} && exec {shlex.join(run_argv(var, *ports))}"  # `make run` in `make shell`
    proc, log = launch(["bash", "-c", typed], bare_env(), tmp_path)
    try:
        assert f"starting redis on 127.0.0.1:{ports[0]}" in log.read_text()
        assert f"starting mongo on 127.0.0.1:{ports[1]}" in log.read_text()
        assert submit(ports[0], ports[1]) == "applied"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert not port_open(ports[0]) and not port_open(ports[1])


def test_a_store_url_of_its_own_stopped_stack_is_dropped_so_make_run_starts_that_server() -> None:
    redis_port, mongo_port = free_port(), free_port()
    environ = {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/3",
        "MONGODB_URI": secantus_uri(mongo_port, "mes"),
    }
    settle_store_urls(environ, redis_port, mongo_port)
    assert environ == {}


def test_a_store_url_that_answers_nowhere_stops_make_run_with_what_to_do() -> None:
    redis_port, mongo_port, elsewhere = free_port(), free_port(), free_port()
    environ = {"REDIS_URL": f"redis://:s3cret@127.0.0.1:{elsewhere}/0"}
    with pytest.raises(SystemExit) as stopped:
        settle_store_urls(environ, redis_port, mongo_port)
    message = str(stopped.value.code)
    assert "REDIS_URL" in message and "unset REDIS_URL MONGODB_URI" in message
    assert "s3cret" not in message and "\n" not in message
    assert environ["REDIS_URL"].endswith(f":{elsewhere}/0")  # left as it was


def test_a_store_url_that_answers_or_cannot_be_probed_is_used_as_given(redis_client: redis.Redis) -> None:
    from mes_tasks.settings import get_settings

    running = get_settings().redis_url  # the test Redis: someone's server on another port
    sentinel = "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2/mymaster/3"
    for url in (running, sentinel):
        environ = {"REDIS_URL": url}
        settle_store_urls(environ, free_port(), free_port())
        assert environ == {"REDIS_URL": url}
