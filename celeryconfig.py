"""Celery settings for mes_tasks, derived from the environment (see mes_tasks.settings)."""

import os
import sys
from datetime import timedelta

from celery.schedules import crontab

from mes_tasks.errors import ConfigurationError
from mes_tasks.flowerauth import check_basic_auth
from mes_tasks.names import AUDIT_QUEUE, AUDIT_WORK_ORDERS, RELAY_OUTBOX, UPDATE_QUANTITY, WORKORDER_QUEUE
from mes_tasks.settings import get_settings

try:
    _s = get_settings()
    if os.environ.get("FLOWER_BASIC_AUTH"):  # Flower would misread it silently: refuse it here
        check_basic_auth(os.environ["FLOWER_BASIC_AUTH"])
except ConfigurationError as _exc:
    if "celery" in sys.argv[0]:  # the celery CLI: one clear line instead of a traceback
        print(f"mes_tasks: invalid configuration [{_exc.code}]: {_exc.message}", file=sys.stderr)
        sys.exit(78)  # EX_CONFIG
    raise

broker_url = _s.redis_url
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # a lost broker is retried every second, for as long as it takes
broker_transport_options = {
    "visibility_timeout": _s.visibility_timeout_s,
    "unacked_restore_interval": _s.unacked_restore_interval_s,
    "unacked_restore_throttle": 1,
    "socket_connect_timeout": _s.connect_timeout_s,
    "health_check_interval": 30,
}
result_backend = _s.redis_url
# Bounded: with Redis down, a .delay() that subscribes to its result (and a worker storing
# one) gives up within about a second instead of Celery's 20 retries of one second; the
# update's outcome is its QuantityLog or FailedUpdate, not its result.
result_backend_transport_options = {
    "socket_connect_timeout": _s.connect_timeout_s,
    "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.3},
}
result_expires = 24 * 3600

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_routes = {
    UPDATE_QUANTITY: {"queue": WORKORDER_QUEUE},
    AUDIT_WORK_ORDERS: {"queue": AUDIT_QUEUE},
    RELAY_OUTBOX: {"queue": AUDIT_QUEUE},
}
task_acks_late = True
task_acks_on_failure = True  # dead-lettered first, so a final failure is never lost
task_acks_on_timeout = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
worker_send_task_events = True
task_send_sent_event = True

# Beat evaluates the crontab in this zone; messages stay in UTC.
timezone = _s.audit_timezone
enable_utc = True
beat_schedule = {
    "nightly-audit": {
        "task": AUDIT_WORK_ORDERS,
        "schedule": (
            timedelta(seconds=_s.audit_interval_s)
            if _s.audit_interval_s
            else crontab(hour=_s.audit_time[0], minute=_s.audit_time[1])
        ),
        "options": {"queue": AUDIT_QUEUE, "expires": 12 * 3600},
    },
    "outbox-relay": {
        "task": RELAY_OUTBOX,
        "schedule": timedelta(seconds=_s.outbox_relay_interval_s),
        "options": {"queue": AUDIT_QUEUE, "expires": _s.outbox_relay_interval_s},
    },
}
