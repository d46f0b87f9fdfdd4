"""The full local stack of ``make run``, in the foreground.

Redis (AOF) and SecantusDB with their data under ``var/`` (unless ``REDIS_URL`` /
``MONGODB_URI`` point elsewhere), then the ``workorder`` worker, the ``audit`` worker,
beat, Flower (basic auth), the metrics endpoint and the HTTP gateway (bearer tokens). Each process's
output goes to the terminal with a name
prefix and to ``var/log/<name>.log``. A process that exits is restarted, with a back-off, as
compose's restart policy does. Ctrl-C stops them all, then the servers.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devtools.devserver import (
    DEV_REDIS_DB,
    STOP_TIMEOUT_S,
    Service,
    api_argv,
    beat_argv,
    flower_argv,
    metrics_argv,
    mongo_service,
    port_open,
    redis_service,
    secantus_uri,
    worker_argv,
)
from devtools.process import Child
from mes_tasks.api.access import TOKENS_ENV, parse_pairs
from mes_tasks.errors import ConfigurationError
from mes_tasks.flowerauth import basic_auth
from mes_tasks.settings import mask_url

SIGINT_GRACE_S = 5.0  # time for children to react to the terminal's own Ctrl-C
SUPERVISE_POLL_S = 0.2
# An exited child is restarted after 1 s, then 2, 4, ... up to 30 s while it keeps exiting;
# one that ran for a minute starts over at 1 s.
RESTART_DELAY_MIN_S = 1.0
RESTART_DELAY_MAX_S = 30.0
RESTART_RESET_S = 60.0
FLOWER_USER = "admin"
PASSWORD_FILE = "flower-password"
ENV_FILE = "stack.env"
TOKENS_FILE = "api-tokens"
STACK_SETTINGS = (
    "REDIS_URL", "MONGODB_URI", "MES_REPORTS_DIR", "MES_FLOWER_URL", "MES_API_URL", "MES_API_TOKENS",
)  # fmt: skip


@dataclass(frozen=True)
class Ports:
    """Where the stack's servers listen."""

    redis: int
    mongo: int
    flower: int
    metrics: int
    api: int


def flower_credentials(var: Path) -> tuple[str, str, bool]:
    """(user, password, generated): from the environment, else a password made once under ``var/``.

    Raises:
        ConfigurationError: Flower would misread the user or the password.
    """
    user = os.environ.get("MES_FLOWER_USER") or FLOWER_USER
    password = os.environ.get("MES_FLOWER_PASSWORD")
    path = var / PASSWORD_FILE
    if password:
        source, generated = "MES_FLOWER_PASSWORD", False
    elif path.exists():
        password, source, generated = path.read_text().strip(), str(path), False
    else:
        password, source, generated = secrets.token_urlsafe(18), "the generated password", True
    basic_auth(user, password, "MES_FLOWER_USER", source)
    if generated:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(password + "\n")
    return user, password, generated


def api_tokens(var: Path) -> str:
    """``MES_API_TOKENS`` from the environment, else a producer and an operator token made once
    under ``var/`` (readable by its owner only).

    Raises:
        ConfigurationError: a malformed token in the environment.
    """
    given = os.environ.get(TOKENS_ENV, "").strip()
    path = var / TOKENS_FILE
    if given:
        parse_pairs(given, TOKENS_ENV)
        return given
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(f"producer:{secrets.token_hex(24)} operator:{secrets.token_hex(24)}\n")
    return path.read_text().strip()


def run_stack(var: Path, ports: Ports) -> int:
    var = var.resolve()
    try:
        user, password, generated = flower_credentials(var)
    except ConfigurationError as exc:
        raise SystemExit(f"[stack] cannot start Flower: {exc.message}") from None
    try:
        tokens = api_tokens(var)
    except ConfigurationError as exc:
        raise SystemExit(f"[stack] cannot start the HTTP gateway: {exc.message}") from None
    (var / "log").mkdir(parents=True, exist_ok=True)
    env, services = _services(var, ports.redis, ports.mongo)
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    env.setdefault("MES_FLOWER_URL", f"http://127.0.0.1:{ports.flower}")  # doctor probes it
    env["MES_API_TOKENS"] = tokens
    env.setdefault("MES_API_URL", f"http://127.0.0.1:{ports.api}")
    children: list[Child] = []
    try:
        for svc in services:
            if port_open(svc.port):
                raise SystemExit(f"port {svc.port} for {svc.name} is taken: is another `make run` running?")
            print(f"[stack] starting {svc.name} on 127.0.0.1:{svc.port} (data in {var})", flush=True)
            svc.start()
        for name, argv in _processes(var, ports):
            children.append(Child(name, argv, var / "log" / f"{name}.log", env=env, echo=True).start())
        write_env_file(var, env)
        _print_access(env, ports, user, password if generated else None, var)
        return _wait(children)
    finally:
        _stop_children(children)
        for svc in reversed(services):
            print(f"[stack] stopping {svc.name}", flush=True)
            svc.stop()


def _services(var: Path, redis_port: int, mongo_port: int) -> tuple[dict[str, str], list[Service]]:
    env = dict(os.environ)
    services = []
    if env.get("REDIS_URL"):
        print("[stack] REDIS_URL is set in your environment: using it, not starting Redis", flush=True)
    else:
        services.append(redis_service(var / "redis", redis_port, var / "log" / "redis.log"))
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/{DEV_REDIS_DB}"
    if env.get("MONGODB_URI"):
        print("[stack] MONGODB_URI is set in your environment: using it, not starting SecantusDB", flush=True)
    else:
        services.append(mongo_service(var / "mongo", mongo_port, var / "log" / "mongo.log"))
        env["MONGODB_URI"] = secantus_uri(mongo_port, "mes")
    env.setdefault("MES_REPORTS_DIR", str(var / "reports"))
    return env, services


def _processes(var: Path, ports: Ports) -> list[tuple[str, list[str]]]:
    return [
        ("workorder", worker_argv("workorder", "workorder")),
        ("audit", worker_argv("audit", "audit")),
        ("beat", beat_argv(var / "celerybeat-schedule")),
        ("flower", flower_argv(ports.flower)),
        ("metrics", metrics_argv(ports.metrics)),
        ("api", api_argv(ports.api)),
    ]


def write_env_file(var: Path, env: dict[str, str]) -> Path:
    """The stack's settings as a shell file (``make shell`` sources it); readable by its owner only."""
    path = var / ENV_FILE
    lines = [
        "# Written by `make run`: the settings of the stack running from this directory.",
        "[ -f ~/.bashrc ] && . ~/.bashrc",
        *(f"export {name}={shlex.quote(env[name])}" for name in STACK_SETTINGS if env.get(name)),
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        'PS1="(mes_tasks) $PS1"',
    ]
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def _print_access(env: dict[str, str], ports: Ports, user: str, new_password: str | None, var: Path) -> None:
    print(f"[stack] this stack's settings are in {var / ENV_FILE}; for the operator commands:", flush=True)
    print("  make shell    (then: celery -A mes_tasks queue status)", flush=True)
    print(f"  Redis {mask_url(env['REDIS_URL'])}, MongoDB {mask_url(env['MONGODB_URI'])}", flush=True)
    print(f"[stack] Flower: http://127.0.0.1:{ports.flower}/ (user {user})", flush=True)
    print(f"[stack] metrics: http://127.0.0.1:{ports.metrics}/metrics", flush=True)
    print(
        f"[stack] HTTP gateway: {env['MES_API_URL']}/ (tokens: MES_API_TOKENS in {var / ENV_FILE})",
        flush=True,
    )
    if new_password is not None:
        print(
            f"[stack] generated Flower password (kept in {var / PASSWORD_FILE}): {new_password}", flush=True
        )


class _Stop(Exception):
    """SIGINT or SIGTERM reached the stack."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def _wait(children: list[Child]) -> int:
    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _supervise(children)
    except _Stop as stop:
        print("[stack] stopping (warm shutdown)", flush=True)
        # The terminal's Ctrl-C reaches every child (a second SIGINT would be a worker's cold
        # shutdown); a SIGTERM, or a SIGINT sent to us alone, must be passed on.
        if stop.signum == signal.SIGTERM:
            _signal_all(children, signal.SIGTERM)
    return 0


def _supervise(children: list[Child]) -> None:
    """Restart a child that exits, as compose's ``restart: unless-stopped`` does, until a stop."""
    restarts = {c.name: _Restarts(started=time.monotonic()) for c in children}
    while True:
        now = time.monotonic()
        for child in children:
            state = restarts[child.name]
            if child.alive():
                continue
            if state.due is None:
                state.due = now + state.next_delay(now)
                print(f"[stack] {child.name} exited with {child.returncode}; "
                      f"restarting it in {state.due - now:.0f} s", flush=True)  # fmt: skip
            elif now >= state.due:
                child.start()
                state.started, state.due = now, None
        time.sleep(SUPERVISE_POLL_S)


@dataclass
class _Restarts:
    """One child's restart back-off: doubling from the shortest delay, reset by a long run."""

    started: float
    delay_s: float = RESTART_DELAY_MIN_S
    due: float | None = None

    def next_delay(self, now: float) -> float:
        if now - self.started >= RESTART_RESET_S:
            self.delay_s = RESTART_DELAY_MIN_S
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, RESTART_DELAY_MAX_S)
        return delay


def _stop_children(children: list[Child]) -> None:
    deadline = time.monotonic() + SIGINT_GRACE_S
    while time.monotonic() < deadline and any(c.alive() for c in children):
        time.sleep(0.1)
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        child.wait(max(0.1, deadline - time.monotonic()))


def _signal_all(children: list[Child], signum: int) -> None:
    for child in children:
        child.signal(signum)
