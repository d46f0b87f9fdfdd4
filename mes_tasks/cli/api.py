"""``celery -A mes_tasks api``: the HTTP gateway, with the settings and tokens every command reads."""

from __future__ import annotations

import click

from mes_tasks.api.access import access_from_env
from mes_tasks.cli.common import ConsoleCommand
from mes_tasks.settings import get_settings

DEFAULT_PORT = 8000


@click.command(cls=ConsoleCommand)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one)."
)
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Gateway processes; each sends on its own broker connections.")  # fmt: skip
def api(host: str, port: int, workers: int) -> None:
    """Run the HTTP gateway (mes_tasks.api:app): the producer's and the console's API over HTTP.

    Tokens come from MES_API_TOKENS or MES_API_TOKENS_FILE (never from the command line);
    without one it refuses to start, unless MES_API_AUTH=proxy.
    """
    import uvicorn  # only this command needs the server

    get_settings()
    access_from_env()  # a missing or malformed token: one line, before the server starts
    where = f"http://{host}:{port}"
    click.echo(f"mes_tasks gateway on {where} ({workers} process(es)); GET /health, /openapi.json", err=True)
    uvicorn.run("mes_tasks.api:app", host=host, port=port, workers=workers, server_header=False,
                log_level="info", timeout_graceful_shutdown=5)  # fmt: skip
