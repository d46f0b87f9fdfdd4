"""The worker refuses to start on a broken deployment, with a message that says how to fix it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import TEST_ENV, spawn_worker
from devtools.devserver import free_port, mongo_service

EXIT_CONFIG = 78


def test_a_contradictory_setting_stops_the_worker_with_the_fix(tmp_path: Path, servers: object) -> None:
    worker = spawn_worker(tmp_path / "w.log", MES_LOCK_TTL_S="3", MES_LOCK_EXTEND_INTERVAL_S="2")
    assert worker.proc.wait(60) == EXIT_CONFIG
    log = worker.log()
    assert "MES_LOCK_TTL_S=3 is shorter than three watchdog intervals" in log
    assert "Traceback" not in log


def test_a_too_short_visibility_timeout_stops_the_worker(tmp_path: Path, servers: object) -> None:
    worker = spawn_worker(tmp_path / "w.log", MES_VISIBILITY_TIMEOUT_S="5")
    assert worker.proc.wait(60) == EXIT_CONFIG
    assert "MES_VISIBILITY_TIMEOUT_S=5 is too short" in worker.log()


def test_the_worker_refuses_a_standalone_mongodb_that_cannot_run_transactions(
    tmp_path: Path, servers: object
) -> None:
    port = free_port()
    standalone = mongo_service(tmp_path / "db", port, tmp_path / "mongo.log", standalone=True).start()
    try:
        worker = spawn_worker(
            tmp_path / "w.log", MONGODB_URI=f"mongodb://127.0.0.1:{port}/mes", REDIS_URL=TEST_ENV["REDIS_URL"]
        )
        try:
            assert worker.proc.wait(60) == EXIT_CONFIG
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    finally:
        standalone.stop()
    log = worker.log()
    assert "TRANSACTIONS_UNSUPPORTED" in log
    assert "--replSet" in log
