"""``celery -A mes_tasks ...`` subcommands, registered through the ``celery.commands`` entry points."""
