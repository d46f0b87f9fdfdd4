"""``celery -A mes_tasks metrics``: Prometheus metrics over HTTP, read from Redis and MongoDB per scrape."""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import click
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from mes_tasks import db
from mes_tasks.cli.common import ConsoleCommand
from mes_tasks.errors import MesError
from mes_tasks.ops.metrics import DEFAULT_HOST, DEFAULT_PORT, registry_for
from mes_tasks.settings import get_settings


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


def make_metrics_server(registry: CollectorRegistry, host: str, port: int) -> ThreadingWSGIServer:
    """An HTTP server for ``registry`` on ``host:port`` (0: any free port), not serving yet."""
    try:
        server: ThreadingWSGIServer = make_server(
            host, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise MesError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", code="LISTEN_FAILED"
        ) from exc
    return server


@click.command(cls=ConsoleCommand)
@click.option("--host", default=DEFAULT_HOST, show_default=True, envvar="MES_METRICS_HOST", help="Address.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    envvar="MES_METRICS_PORT",
    type=click.IntRange(0, 65535),
)
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on /metrics; each scrape reads Redis and MongoDB (docs/metrics.md)."""
    settings = get_settings()
    db.connect(settings)  # not prepare(): the endpoint starts, and says so, with MongoDB down
    registry = registry_for(db.redis_client(settings, retry=False), settings.key_prefix, settings.partitions)
    server = make_metrics_server(registry, host, port)
    click.echo(f"serving metrics on http://{host}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
