"""The Celery app (``celery -A mes_tasks``) and the worker's start-up checks."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals

from mes_tasks import db
from mes_tasks.config import EXIT_CONFIG, configure
from mes_tasks.errors import MesError
from mes_tasks.lease import SingleActiveConsumer
from mes_tasks.settings import get_settings
from mes_tasks.worker import ReleaseKeptLocks

log = logging.getLogger(__name__)

app = Celery("mes_tasks", include=["mes_tasks.tasks"])
configure(app)  # from the environment and the deployment's celeryconfig.py (see mes_tasks.config)
app.steps["consumer"].add(SingleActiveConsumer)
app.steps["consumer"].add(ReleaseKeptLocks)


@signals.worker_init.connect
def prepare_worker(**_: Any) -> None:
    """Refuse to start unless MongoDB is reachable, transactional and indexed."""
    try:
        settings = get_settings()
        db.prepare(settings)
    except MesError as exc:
        message = f"mes_tasks: cannot start the worker [{exc.code}]: {exc.message}"
        log.critical(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    log.info("mes_tasks ready: %s", settings.masked())
