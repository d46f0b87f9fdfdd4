"""Shared pieces of the CLI: connections from the app, error handling, output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from mes_tasks import db
from mes_tasks.errors import MesError
from mes_tasks.ledger import Ledger
from mes_tasks.settings import get_settings, mask_secrets

EXIT_ERROR = 2  # 1 is kept for "the command worked and found a problem"
F = TypeVar("F", bound=Callable[..., Any])


def ledger() -> Ledger:
    """Connect to both stores with the environment's settings."""
    settings = get_settings()
    return Ledger(db.prepare(settings), db.redis_client(settings), settings)


def handle_errors(func: F) -> F:
    """Print mes_tasks errors as one line with their code, exit 2; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MesError as exc:
            click.echo(f"error [{exc.code}]: {mask_secrets(exc.message)}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))
