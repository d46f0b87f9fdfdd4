"""A Celery app on mes_tasks's broker without the single-active-consumer step (for the doctor test)."""

from celery import Celery

from mes_tasks.config import configuration

app = Celery("rogue")
app.config_from_object(configuration())
