"""mes_tasks: exactly-once work-order quantity updates on Celery, Redis and MongoDB."""

from mes_tasks.app import app

__all__ = ["app"]
