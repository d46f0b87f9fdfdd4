"""This deployment's own Celery settings for mes_tasks: edit this file.

mes_tasks derives every Celery setting it needs from the environment (``MES_*``,
``REDIS_URL``, ``MONGODB_URI``: see docs/deployment.md) in ``mes_tasks.config``. Each
lowercase name assigned here replaces the setting of that name, for the workers, beat,
Flower and the operator commands alike.

mes_tasks reads this file by path, never as a module named ``celeryconfig``: from a
checkout (``make run``, the tests) it is the file beside ``mes_tasks/``; the image sets
``MES_CELERY_CONFIG=/app/celeryconfig.py``; any deployment may point
``MES_CELERY_CONFIG`` at its own copy. A host application's own ``celeryconfig`` module
is never read. Serializers other than JSON are refused here as everywhere.

Nothing is overridden by default. For example:

    result_expires = 6 * 3600  # keep task results 6 h instead of 24 h
    worker_hijack_root_logger = False  # the host's logging setup stays in charge
"""
