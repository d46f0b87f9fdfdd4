"""Shared pieces of the CLI: the stores a command works on, one-line errors, confirmation, output.

Every error a command can meet ends as one line on stderr, ``error [CODE]: message``, and
exit code 2 (1 is kept for "the command worked and found a problem"); with ``--json`` the
same error is also printed on stdout as ``{"error": {"code": ..., "message": ...}}``.
click raises usage errors and ``Abort`` while parsing, before a command's own code runs,
so the groups and commands catch them themselves (``ConsoleGroup``, ``ConsoleCommand``):
celery hands each plugin group its arguments through ``make_context`` and ``invoke``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
from kombu.exceptions import OperationalError

from mes_tasks import db
from mes_tasks.errors import MesError
from mes_tasks.ops.stores import Stores as Stores  # what a command works on, shared with the gateway
from mes_tasks.ops.stores import stores as stores
from mes_tasks.settings import mask_secrets

EXIT_ERROR = 2  # 1 is kept for "the command worked and found a problem"
MAX_MESSAGE_CHARS = 500  # of an unexpected error's text
JSON_META = "mes_tasks.json"  # ctx.meta (shared by the whole context tree): --json was given
F = TypeVar("F", bound=Callable[..., Any])


def fail(code: str, message: str, as_json: bool = False) -> NoReturn:
    """Print one error line (and its JSON object with ``--json``), exit 2."""
    text = " ".join(mask_secrets(message).split())
    if as_json:
        echo_json({"error": {"code": code, "message": text}})
    click.echo(f"error [{code}]: {text}", err=True)
    sys.exit(EXIT_ERROR)


def _fail_on(exc: BaseException, as_json: bool) -> NoReturn:
    if isinstance(exc, MesError):
        fail(exc.code, exc.message, as_json)
    if isinstance(exc, click.UsageError):
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        fail("USAGE", f"{where}{exc.format_message()} (see --help)", as_json)
    if isinstance(exc, click.Abort):
        fail("ABORTED", "not confirmed; nothing was changed (--yes skips the question)", as_json)
    if isinstance(exc, OperationalError):  # kombu's: the broker could not be reached
        fail("REDIS_UNAVAILABLE", f"the broker is unreachable: {exc}", as_json)
    if isinstance(exc, click.ClickException):
        fail("COMMAND_FAILED", exc.format_message(), as_json)
    fail("INTERNAL_ERROR", f"{type(exc).__name__}: {str(exc)[:MAX_MESSAGE_CHARS]}", as_json)


def _wants_json(ctx: click.Context | None, args: Sequence[str] = ()) -> bool:
    return bool(ctx is not None and ctx.meta.get(JSON_META)) or "--json" in args


class _OneLineErrors(click.Command):
    """Usage errors, aborted confirmations and mes_tasks errors as one line, exit 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        as_json = _wants_json(parent, args)  # before parsing: click consumes ``args``
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a bare group: click prints its help
        except (click.UsageError, click.Abort) as exc:
            _fail_on(exc, as_json)
        if ctx.params.get("as_json"):
            ctx.meta[JSON_META] = True
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with db.mongo_errors(), db.redis_errors():
                return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # never a traceback for the operator
            _fail_on(exc, _wants_json(ctx))


class ConsoleCommand(_OneLineErrors, click.Command):
    """A mes_tasks command: every error one line (see the module docstring)."""


class ConsoleGroup(_OneLineErrors, click.Group):
    """A mes_tasks group whose subcommands are ``ConsoleCommand``s."""

    command_class = ConsoleCommand


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def yes_option(func: F) -> F:
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(func)


def confirm(question: str, yes: bool) -> None:
    """Ask on stderr (stdout stays for ``--json``) unless ``--yes``; no answer is a no.

    Raises:
        click.Abort: not confirmed (shown as ``error [ABORTED]``).
    """
    if yes:
        return
    try:
        click.confirm(question, abort=True, err=True)
    except click.Abort:
        if not sys.stdin.isatty():  # no echoed answer ended the prompt's line
            click.echo(err=True)
        raise


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
