"""The Celery settings the guarantees rest on, as the app actually loads them."""

from __future__ import annotations

from mes_tasks import app
from mes_tasks.tasks import audit_work_orders, update_quantity


def test_updates_are_acknowledged_late_one_at_a_time_and_requeued_if_the_worker_is_lost() -> None:
    # Under the solo pool a kill cannot tell early from late acks (the early ack waits for the
    # blocked event loop), so these are asserted here rather than only end to end.
    assert update_quantity.acks_late is True
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1


def test_only_json_is_accepted_never_pickle() -> None:
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert list(app.conf.result_accept_content) == ["json"]


def test_updates_and_audits_have_their_own_queues() -> None:
    routes = app.conf.task_routes
    assert routes[update_quantity.name] == {"queue": "workorder"}
    assert routes[audit_work_orders.name] == {"queue": "audit"}


def test_the_visibility_timeout_comes_from_the_validated_settings() -> None:
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 12.0  # MES_VISIBILITY_TIMEOUT_S in conftest
    assert options["unacked_restore_interval"] == 1.0


def test_the_nightly_audit_is_scheduled_outside_the_dst_window_by_default() -> None:
    entry = app.conf.beat_schedule["nightly-audit"]
    assert entry["task"] == audit_work_orders.name and entry["options"]["queue"] == "audit"
    schedule = entry["schedule"]
    assert schedule.hour == {4} and schedule.minute == {15}
    assert app.conf.timezone == "UTC"
