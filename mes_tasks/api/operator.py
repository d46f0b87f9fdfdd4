"""The console's commands over HTTP for the operator role, answering the JSON of their ``--json``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def operator_routes(app: FastAPI, operator: Any) -> None:
    """Add the operator routes to ``app``, each behind the ``operator`` dependency."""
