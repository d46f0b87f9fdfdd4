"""The HTTP gateway: ``mes_tasks.api:app`` for any ASGI server, or ``celery -A mes_tasks api``.

``app`` is made on first use (``api.app.create_app``), with the environment's settings and
tokens, so importing this package reads nothing.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from mes_tasks.api.app import create_app

        globals()["app"] = created = create_app()
        return created
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
