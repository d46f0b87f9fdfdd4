"""A Celery app on mes_tasks's broker without the single-active-consumer step (for the doctor test)."""

from celery import Celery

app = Celery("rogue")
app.config_from_object("celeryconfig")
