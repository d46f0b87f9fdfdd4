"""mes_tasks's Celery configuration: built from ``Settings``, then the deployment's own file.

``celery_settings`` derives every Celery setting mes_tasks needs from the environment
(see ``mes_tasks.settings``). The deployment may override any of them in its own Python
file, the top-level ``celeryconfig.py`` of a checkout or of the image: every lowercase
name it assigns replaces the setting of that name. The file is found by path, never
imported as a module named ``celeryconfig``, so a host application's own module of that
name is neither shadowed nor read:

* ``MES_CELERY_CONFIG=/path/to/file.py``: that file (an empty value: no file);
* otherwise the ``celeryconfig.py`` beside the ``mes_tasks`` package, if there is one
  (a checkout or an editable install); an installed wheel has none.

Only JSON crosses the wire whatever the file says: an override that admits another
serializer is refused.
"""

from __future__ import annotations

import os
import runpy
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from celery.schedules import crontab

from mes_tasks.errors import ConfigurationError
from mes_tasks.flowerauth import check_basic_auth
from mes_tasks.names import (
    AUDIT_QUEUE,
    AUDIT_WORK_ORDERS,
    RELAY_OUTBOX,
    UPDATE_QUANTITY,
    VERIFY_COUNTERS,
    WORKORDER_QUEUE,
)
from mes_tasks.settings import Settings, get_settings

CONFIG_ENV = "MES_CELERY_CONFIG"
CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "celeryconfig.py"
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h
JSON_ONLY = ("task_serializer", "result_serializer", "accept_content", "result_accept_content")


def celery_settings(s: Settings) -> dict[str, Any]:
    """Every Celery setting mes_tasks relies on, for these settings."""
    return {
        "broker_url": s.redis_transport_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a lost broker is retried every second, forever
        "broker_transport_options": {
            "visibility_timeout": s.visibility_timeout_s,
            "unacked_restore_interval": s.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": s.connect_timeout_s,
            # Bounds every blocking read (the ack, a restore, an event, a reconnect's handshake):
            # a master that stops answering without closing the connection (frozen, or cut off)
            # is an error within seconds, and the consumer reconnects, through the Sentinels
            # when REDIS_URL names them; without it, a wait for TCP, which can take hours.
            "socket_timeout": s.redis_timeout_s,
            "health_check_interval": 30,
            **sentinel_options(s),
        },
        "result_backend": s.redis_transport_url,
        # Bounded: with Redis down, a .delay() that subscribes to its result (and a worker
        # storing one) gives up within about a second instead of Celery's 20 retries of one
        # second; the update's outcome is its QuantityLog or FailedUpdate, not its result.
        "result_backend_transport_options": {
            "socket_connect_timeout": s.connect_timeout_s,
            "retry_policy": {
                "max_retries": 2,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.3,
            },
            **sentinel_options(s),
        },
        "redis_socket_timeout": s.redis_timeout_s,  # Celery's default is 120 s
        "result_expires": 24 * 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_routes": {
            UPDATE_QUANTITY: {"queue": WORKORDER_QUEUE},
            AUDIT_WORK_ORDERS: {"queue": AUDIT_QUEUE},
            RELAY_OUTBOX: {"queue": AUDIT_QUEUE},
        },
        "task_acks_late": True,
        "task_acks_on_failure": True,  # dead-lettered first, so a final failure is never lost
        "task_acks_on_timeout": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_consumer": "mes_tasks.worker.consumer:Consumer",
        # Beat evaluates the crontab in this zone; messages stay in UTC.
        "timezone": s.audit_timezone,
        "enable_utc": True,
        "beat_schedule": {
            "nightly-audit": {
                "task": AUDIT_WORK_ORDERS,
                "schedule": (
                    timedelta(seconds=s.audit_interval_s)
                    if s.audit_interval_s
                    else crontab(hour=s.audit_time[0], minute=s.audit_time[1])
                ),
                "options": {"queue": AUDIT_QUEUE, "expires": 12 * 3600},
            },
            "outbox-relay": {
                "task": RELAY_OUTBOX,
                "schedule": timedelta(seconds=s.outbox_relay_interval_s),
                "options": {"queue": AUDIT_QUEUE, "expires": s.outbox_relay_interval_s},
            },
            **(
                {
                    "continuous-verify": {
                        "task": VERIFY_COUNTERS,
                        "schedule": timedelta(seconds=s.verify_interval_s),
                        "options": {"queue": AUDIT_QUEUE, "expires": s.verify_interval_s},
                    }
                }
                if s.verify_interval_s
                else {}
            ),
        },
    }


def sentinel_options(s: Settings) -> dict[str, Any]:
    """The transport options kombu's and Celery's Sentinel support need: the master's name, and
    how to talk to the Sentinels (bounded timeouts, their own password); none for a plain Redis."""
    sentinel = s.sentinel
    if sentinel is None:
        return {}
    return {"master_name": sentinel.master, "sentinel_kwargs": s.sentinel_kwargs}


def deployment_file() -> Path | None:
    """The deployment's own settings file, if any (see the module docstring)."""
    named = os.environ.get(CONFIG_ENV)
    if named is not None:
        if not named:
            return None
        path = Path(named)
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_ENV}={named}: no such file")
        return path
    return CHECKOUT_CONFIG if CHECKOUT_CONFIG.is_file() else None


def overrides(path: Path) -> dict[str, Any]:
    """The lowercase names ``path`` assigns (modules and imports it uses are left out)."""
    try:
        names = runpy.run_path(str(path), run_name="mes_tasks_deployment_config")
    except Exception as exc:
        raise ConfigurationError(f"{path}: {type(exc).__name__}: {exc}") from exc
    chosen = {
        k: v
        for k, v in names.items()
        if k.islower() and not k.startswith("_") and not callable(v) and type(v).__name__ != "module"
    }
    for name in JSON_ONLY:
        value = chosen.get(name)
        if value is not None and value not in ("json", ["json"], ("json",), {"json"}):
            raise ConfigurationError(f"{path}: {name} = {value!r}: mes_tasks accepts JSON only")
    return chosen


def configuration() -> dict[str, Any]:
    """The whole configuration: derived settings, then the deployment file's overrides.

    Raises:
        ConfigurationError: a setting, the Flower credentials or the file is invalid.
    """
    s = get_settings()
    if os.environ.get("FLOWER_BASIC_AUTH"):  # Flower would misread it silently: refuse it here
        check_basic_auth(os.environ["FLOWER_BASIC_AUTH"])
    conf = celery_settings(s)
    path = deployment_file()
    if path is not None:
        conf.update(overrides(path))
    return conf


def configure(app: Celery) -> None:
    """Give ``app`` its configuration.

    Under the ``celery`` command an invalid configuration is one line and exit 78 (a
    traceback would bury it); imported by a host application, it raises.
    """
    try:
        conf = configuration()
    except ConfigurationError as exc:
        if not _is_celery_command():
            raise
        print(f"error [{exc.code}]: mes_tasks configuration: {exc.message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    app.config_from_object(conf)


def _is_celery_command() -> bool:
    """``celery ...`` or ``python -m celery ...`` (argv[0] is then ``.../celery/__main__.py``)."""
    return "celery" in Path(sys.argv[0]).parts[-2:]
