"""What the operator sees: --json on every command, one-line errors, confirmations, honest counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from conftest import REPO, TEST_ENV, Worker, make_work_orders, spawn_worker
from mes_tasks.apply.deadletter import Failure, record_failure
from mes_tasks.apply.locks import RedisLock
from mes_tasks.errors import UnknownWorkOrder
from mes_tasks.keys import first_start_key, lock_key
from mes_tasks.models import FailedUpdate
from mes_tasks.ops.doctor import INFO, Context, check_flower_auth
from mes_tasks.settings import Settings

EXIT_ERROR = 2
EXIT_CONFIG = 78


def cli(*args: str, answer: str | None = None) -> Result:
    return CliRunner().invoke(celery, ["-A", "mes_tasks", *args], input=answer, catch_exceptions=False)


def assert_one_error_line(result: Result, code: str) -> None:
    assert result.exit_code == EXIT_ERROR, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error [{code}]: "), result.stderr
    assert [line for line in lines if line.startswith("error [")] == [lines[-1]]
    assert "Traceback" not in result.output and "Usage:" not in result.output


def dead_letter(request_id: str) -> FailedUpdate:
    error = UnknownWorkOrder("no WO-1")
    args, kwargs = ["WO-1", "output", 3], {"request_id": request_id}
    record_failure(
        Failure(
            "mes_tasks.tasks.update_quantity", f"t-{request_id}", request_id, "WO-1", args, kwargs, error, 1
        )
    )
    return FailedUpdate.objects.get(request_id=request_id)


# -- --json on every command --------------------------------------------------------------


def test_every_subcommand_answers_json_that_parses(
    services: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MES_REPORTS_DIR", str(tmp_path))
    make_work_orders(["WO-1"])
    record = str(dead_letter("j1").id)
    RedisLock(services, lock_key("mes:", "WO-1"), 30).acquire()
    report = json.loads(cli("audit", "run", "--json").stdout)["id"]
    commands = [
        ("doctor",),
        ("queue", "status"),
        ("queue", "pause"),
        ("queue", "resume"),
        ("queue", "purge", "--yes"),
        ("failed", "list"),
        ("failed", "show", record),
        ("failed", "retry", record),
        ("failed", "discard", record, "--yes"),
        ("audit", "list"),
        ("audit", "show", report),
        ("locks", "list"),
        ("locks", "release", "WO-1", "--yes"),
        ("workorder", "show", "WO-1"),
        ("workorder", "create", "WO-2"),
    ]
    for args in commands:
        result = cli(*args, "--json")
        assert result.exit_code in (0, 1), (args, result.output)
        json.loads(result.stdout)


def test_an_error_with_json_is_also_a_json_object_on_stdout(services: redis.Redis) -> None:
    result = cli("workorder", "show", "WO-404", "--json")
    assert_one_error_line(result, "UNKNOWN_WORK_ORDER")
    assert json.loads(result.stdout)["error"]["code"] == "UNKNOWN_WORK_ORDER"
    usage = cli("failed", "list", "--status", "bogus", "--json")
    assert_one_error_line(usage, "USAGE")
    assert json.loads(usage.stdout)["error"]["code"] == "USAGE"


# -- one-line errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "purge", "--bogus"),  # a bad option
        ("failed", "show"),  # a missing argument
        ("failed", "list", "--status", "bogus"),  # an invalid choice
        ("workorder", "show", "WO-1", "--logs", "many"),  # not a number
        ("queue", "nope"),  # no such subcommand
        ("doctor", "--bogus"),
        ("failed", "retry"),  # neither ids nor --all: ours, not click's
    ],
)
def test_a_usage_error_is_one_line_with_exit_2(args: tuple[str, ...]) -> None:
    assert_one_error_line(cli(*args), "USAGE")


def test_a_declined_confirmation_is_one_line_and_changes_nothing(services: redis.Redis) -> None:
    record = dead_letter("c1")
    held = RedisLock(services, lock_key("mes:", "WO-1"), 30)
    held.acquire()
    for args, answer in [
        (("queue", "purge"), "n\n"),
        (("failed", "discard", str(record.id)), "n\n"),
        (("failed", "discard", "--all"), None),  # no answer at all (stdin closed) is a no
        (("locks", "release", "WO-1"), None),
    ]:
        assert_one_error_line(cli(*args, answer=answer), "ABORTED")
    assert FailedUpdate.objects.get(id=record.id).status == "open"
    assert services.get(held.key) == held.token
    assert "1 discarded" in cli("failed", "discard", "--all", answer="y\n").stdout


# -- honest counts --------------------------------------------------------------------------


def test_discarding_an_already_discarded_record_says_so(services: redis.Redis) -> None:
    record = str(dead_letter("d1").id)
    assert cli("failed", "discard", record, "--yes").stdout.splitlines()[-1] == "1 discarded"
    again = cli("failed", "discard", record, "--yes")
    assert again.exit_code == 0
    assert again.stdout.splitlines()[-1] == "0 discarded, 1 already discarded"
    data = json.loads(cli("failed", "discard", record, "--yes", "--json").stdout)
    assert data == {"discarded": [], "already_discarded": [{"id": record, "request_id": "d1"}]}
    history = [e["event"] for e in FailedUpdate.objects.get(id=record).history]
    assert history == ["failed", "discarded"]


def test_retrying_a_record_that_is_not_open_says_what_it_was(services: redis.Redis) -> None:
    record = str(dead_letter("r1").id)
    cli("failed", "discard", record, "--yes")
    retried = cli("failed", "retry", record)
    assert retried.exit_code == 0 and "(it was discarded)" in retried.stdout
    data = json.loads(cli("failed", "retry", record, "--json").stdout)
    assert data["re_sent"][0]["was"] == "retried" and data["re_sent"][0]["applied_before"] is False


# -- doctor on a new, healthy stack --------------------------------------------------------


def test_doctor_on_a_new_healthy_stack_has_no_alarm_about_the_audit_or_flower(
    services: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    assert services.get(first_start_key("mes:"))  # the worker recorded the deployment's start
    checks = {c["name"]: c for c in json.loads(cli("doctor", "--json").stdout)["checks"]}
    assert checks["last audit"]["status"] == INFO
    assert checks["last audit"]["detail"].startswith("none yet: the deployment is ")
    assert "the first runs at" in checks["last audit"]["detail"]
    assert checks["flower auth"]["status"] == INFO
    assert {c["status"] for c in checks.values()} <= {"OK", INFO}, checks


def test_doctor_warns_when_an_old_deployment_has_no_recent_audit(services: redis.Redis) -> None:
    services.set(first_start_key("mes:"), f"{time.time() - 3 * 24 * 3600:.0f}")  # three days ago
    checks = {c["name"]: c for c in json.loads(cli("doctor", "--json").stdout)["checks"]}
    assert checks["last audit"]["status"] == "WARN"


def test_doctor_checks_flower_over_http_where_its_url_is_known(settings: Settings) -> None:
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from threading import Thread

    class Guarded(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401 if self.path == "/api/workers" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Guarded)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        ctx = Context(Settings(flower_url=url), None)  # type: ignore[arg-type]
        assert [c.status for c in check_flower_auth(ctx)] == ["OK"]
        Guarded.do_GET = lambda self: (self.send_response(200), self.end_headers())  # type: ignore[method-assign]
        assert [c.status for c in check_flower_auth(ctx)] == ["FAIL"]
    finally:
        server.shutdown()
    assert [c.status for c in check_flower_auth(ctx)] == ["WARN"]  # nothing listens there now


# -- bad settings: one line, exit 78 --------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDIS_URL": "redis://:hunter2@127.0.0.1:99999/3"}, "REDIS_URL=redis://:***@127.0.0.1:99999/3"),
        ({"REDIS_URL": "http://127.0.0.1:6379/3"}, "must start with redis://"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/three"}, "database 'three' is not a number"),
        ({"MONGODB_URI": "mongodb://mes:hunter2@127.0.0.1:70000/mes"}, "MONGODB_URI=mongodb://mes:***@"),
        ({"MONGODB_URI": "postgres://127.0.0.1/mes"}, "must start with mongodb://"),
    ],
)
def test_a_bad_setting_stops_doctor_with_one_line_and_exit_78(env: dict[str, str], needle: str) -> None:
    full = {**os.environ, **TEST_ENV, **env}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "mes_tasks", "doctor"],
        cwd=REPO, env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "hunter2" not in done.stderr + done.stdout and done.stdout == ""


def test_a_bad_setting_read_by_a_command_in_process_is_one_line(env_override: Callable[..., None]) -> None:
    env_override(REDIS_URL="redis://127.0.0.1:99999/3")
    assert_one_error_line(cli("doctor"), "CONFIG_INVALID")
    assert_one_error_line(cli("queue", "status"), "CONFIG_INVALID")


# -- a worker that cannot reach a store says so, once --------------------------------------


def test_a_worker_whose_redis_is_unreachable_says_so_in_one_line_while_it_waits(
    tmp_path: Path, servers: object
) -> None:
    worker = spawn_worker(tmp_path / "w.log", REDIS_URL="redis://:hunter2@127.0.0.1:1/3")
    try:
        worker.wait_for_log("mes_tasks: waiting for Redis [REDIS_UNAVAILABLE]", 60)
        time.sleep(3)  # several retries: still one line until REDIS_WAIT_REPORT_S has passed
        log = worker.log()
    finally:
        worker.kill()
    assert log.count("waiting for Redis") == 1
    assert "REDIS_URL=redis://:***@127.0.0.1:1/3 is unreachable" in log and "hunter2" not in log


def test_a_worker_whose_mongodb_is_unreachable_stops_with_one_line(tmp_path: Path, servers: object) -> None:
    worker = spawn_worker(
        tmp_path / "w.log", MONGODB_URI="mongodb://127.0.0.1:1/mes", MES_CONNECT_TIMEOUT_S="1"
    )
    assert worker.proc.wait(60) == EXIT_CONFIG
    log = worker.log()
    assert log.count("cannot start the worker [MONGO_UNAVAILABLE]") == 1
    assert "Topology Description" not in log
