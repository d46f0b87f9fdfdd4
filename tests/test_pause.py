"""queue pause is durable: honoured by a worker started later, across a restart, and resume never adds a
second workorder consumer."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from conftest import Worker, make_work_orders, wait_until
from mes_tasks.models import QuantityLog
from mes_tasks.ops.status import consumers, pause, resume
from mes_tasks.send.producer import submit_quantity_update
from mes_tasks.settings import get_settings


def _app():  # type: ignore[no-untyped-def]
    from mes_tasks import app

    return app


def test_a_pause_holds_for_a_worker_started_later_and_across_its_restart(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    make_work_orders(["WO-1"])
    assert pause(_app(), redis_client, get_settings()) == []  # no worker yet: recorded all the same
    worker = start_worker()
    submit_quantity_update("WO-1", "input", 2, request_id="held-1")
    worker.wait_for_log("is paused: not consuming it")
    worker.stop()
    again = start_worker()
    again.wait_for_log("took the workorder lease")
    time.sleep(1.5)  # three ticks
    assert QuantityLog.objects.count() == 0 and redis_client.llen("workorder") == 1
    assert "workorder" not in consumers(_app())
    assert resume(_app(), redis_client, get_settings()) == [again.name]
    wait_until(lambda: QuantityLog.objects(request_id="held-1").count() == 1, 30, "the held update")


def test_resume_puts_the_consumer_back_on_the_lease_holder_only_never_on_the_audit_worker(
    redis_client: redis.Redis, start_worker: Callable[..., Worker]
) -> None:
    active = start_worker()
    audit = start_worker(name="audit", queue="audit")
    active.wait_for_log("took the workorder lease")
    assert pause(_app(), redis_client, get_settings()) == [active.name]
    assert resume(_app(), redis_client, get_settings()) == [active.name]
    time.sleep(1.5)
    assert consumers(_app())["workorder"] == [active.name]
    _app().control.add_consumer("workorder", destination=[audit.name], reply=True, timeout=1)
    audit.wait_for_log("not started on workorder: not consuming it")
    wait_until(lambda: consumers(_app())["workorder"] == [active.name], 10, "one workorder consumer")
