"""The Celery app (``celery -A mes_tasks``) and the worker's start-up checks."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.app.amqp import AMQP

from mes_tasks import db
from mes_tasks.config import EXIT_CONFIG, configure
from mes_tasks.errors import MesError, one_line
from mes_tasks.keys import first_start_key
from mes_tasks.names import RELAY_OUTBOX, VERIFY_COUNTERS
from mes_tasks.settings import REDIS_WAIT_POLL_S, REDIS_WAIT_REPORT_S, get_settings, mask_secrets, mask_url

log = logging.getLogger(__name__)

WORKER_STEPS = (
    "mes_tasks.worker.active:SingleActiveConsumer",  # one consumer per workorder queue, under its lease
    "mes_tasks.worker.state:ReleaseKeptLocks",  # lets go of wanted kept locks, flushes the tally
    "mes_tasks.worker.consumer:BrokerWatchdog",  # back on the broker within about a second
)


class _QuietRelay(logging.Filter):
    """Drop the INFO lines beat and the worker write for every outbox relay run (one a second).

    The relay logs what it did itself when it did something; its failures stay (WARNING and up).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or RELAY_OUTBOX not in record.getMessage()


for _name in ("celery.beat", "celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_name).addFilter(_QuietRelay())

# Beat's periodic internals: the relay (every second) and continuous verification. Operators
# watch updates and audits in Flower; these would bury them, and their health is in the
# metrics (mes_outbox_*, mes_verify_*). Their tasks send no events (``send_events=False``)...
QUIET_TASKS = frozenset({RELAY_OUTBOX, VERIFY_COUNTERS})


class QuietAMQP(AMQP):  # type: ignore[misc]
    """... and no ``task-sent`` event is published for them either (``task_send_sent_event`` is
    on so that Flower sees an update as soon as it is sent)."""

    def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(task_id, name, *args, **kwargs)
        if name in QUIET_TASKS and message.sent_event is not None:
            return message._replace(sent_event=None)
        return message


app = Celery("mes_tasks", include=["mes_tasks.tasks"], amqp=QuietAMQP)
configure(app)  # from the environment and the deployment's celeryconfig.py (see mes_tasks.config)
# The worker's consumer steps, by name: Celery imports them when a worker builds its consumer,
# so a main app that imports this module (to send) never loads the worker's code.
app.steps["consumer"].update(WORKER_STEPS)


@signals.worker_init.connect
def prepare_worker(**_: Any) -> None:
    """Wait for Redis, saying so; refuse to start unless MongoDB is reachable, transactional, indexed.

    Runs before the worker sets up logging, so its lines go to stderr directly, once each.
    """
    settings = get_settings()
    client, url, reported = db.redis_client(settings), mask_url(settings.redis_url), None
    while True:
        try:  # the first start's time stays: the deployment's age, for doctor
            client.set(first_start_key(settings.key_prefix), f"{time.time():.0f}", nx=True)
            break
        except (redis.AuthenticationError, redis.ResponseError) as exc:  # waiting cannot help
            problem = f"REDIS_URL={url} refused mes_tasks: {one_line(mask_secrets(str(exc)))}; fix REDIS_URL"
            print(f"mes_tasks: cannot start the worker [REDIS_REFUSED]: {problem}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if reported is None or time.monotonic() - reported >= REDIS_WAIT_REPORT_S:
                reported = time.monotonic()
                print(f"mes_tasks: waiting for Redis [REDIS_UNAVAILABLE]: REDIS_URL={url} is unreachable "
                      f"({one_line(mask_secrets(str(exc)))}); start Redis or fix REDIS_URL. Retrying every "
                      f"{REDIS_WAIT_POLL_S:g} s, this line every {REDIS_WAIT_REPORT_S:g} s",
                      file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(REDIS_WAIT_POLL_S)
    client.close()
    if reported is not None:
        print("mes_tasks: Redis is reachable; starting", file=sys.stderr, flush=True)
    try:
        db.prepare(settings)
    except MesError as exc:
        message = f"[{exc.code}]: {one_line(mask_secrets(exc.message))}"
        print(f"mes_tasks: cannot start the worker {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    log.info("mes_tasks ready: %s", settings.masked())
