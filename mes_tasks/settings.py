"""Settings: read from the environment once, validated, held in one typed object.

Every default lives here, with its unit in its name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pymongo import uri_parser
from redis.connection import parse_url as _redis_url_parts

from mes_tasks.errors import ConfigurationError
from mes_tasks.partitions import MAX_PARTITIONS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/3"  # db 3: mes_tasks's own database
DEFAULT_MONGODB_URI = "mongodb://127.0.0.1:27017/mes"
DEFAULT_KEY_PREFIX = "mes:"
LOCK_TTL_S = 30.0
LOCK_WAIT_S = 10.0
LOCK_LINGER_S = 2.0  # a worker keeps an unused work-order lock (and its epoch) this long; 0: never
LOCK_EXTEND_FRACTION = 1 / 3  # watchdog extends at a third of the TTL unless told otherwise
RETRY_MAX = 8
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 60.0
VISIBILITY_TIMEOUT_S = 600.0
VISIBILITY_SAFETY_FACTOR = 2.0  # "comfortably longer": twice the longest task + countdown
CONNECT_TIMEOUT_S = 5.0
# Any Redis reply may take this long before its connection is taken for silent (a frozen or
# cut-off master keeps it open and answers nothing) and replaced by a new one, which redis-py
# retries the command on. Well inside a lease's TTL: the watchdog's extension that meets a
# silent connection is retried on a new one before the lease expires.
REDIS_TIMEOUT_S = 1.0
REDIS_WAIT_POLL_S = 1.0  # a starting worker whose Redis is unreachable tries again this often
REDIS_WAIT_REPORT_S = 30.0  # and says so this often (the first time at once)
UNACKED_RESTORE_INTERVAL_S = 10.0  # how often a worker sweeps for expired unacked messages
AUDIT_AT = "04:15"  # local time of the nightly audit, after the 01:00-03:00 DST transitions
AUDIT_TIMEZONE = "UTC"
REPORTS_DIR = "var/reports"
REPORT_RETENTION_DAYS = 90
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_RETRIES = 3
OUTBOX_RELAY_INTERVAL_S = 1.0
# A sent update with no outcome after this long, and not held by the broker, is re-sent.
# Short on purpose: the broker holds a message from publish to ack except for the
# milliseconds between BRPOP and kombu's unacked record, and a re-send is a duplicate at worst.
# A message popped by a BRPOP whose reply was lost (a dropped or silent connection) is back
# after this plus a relay interval: with 3 s, 5.1-5.4 s in the partitioned chaos run.
OUTBOX_GRACE_S = 2.0
# A dead active workorder worker on another host is replaced after at most this long (one on
# the same host at once). Short is safe: the fencing epoch, not the lease, protects the counters.
LEASE_TTL_S = 3.0
VERIFY_INTERVAL_S = 30.0
VERIFY_SWEEP = 20
VERIFY_COMPLETE_S = 300.0
# Updates a partition's worker applies in one transaction, at most (1: one at a time); 100
# drained a backlog fastest on the bench (bench/README.md, "Group commit").
GROUP_MAX = 100
GROUP_MAX_LIMIT = 1000  # a MongoDB transaction of this many logs stays far below its limits
NEGATIVE_WAIT_S = 600.0  # a would-go-negative update is retried this long (its count may be late)
DST_WINDOW_HOURS = (1, 3)  # [01:00, 03:00): local times that DST can skip or repeat

ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "mongodb_uri": "MONGODB_URI",
    "key_prefix": "MES_KEY_PREFIX",
    "lock_ttl_s": "MES_LOCK_TTL_S",
    "lock_wait_s": "MES_LOCK_WAIT_S",
    "lock_extend_interval_s": "MES_LOCK_EXTEND_INTERVAL_S",
    "lock_linger_s": "MES_LOCK_LINGER_S",
    "retry_max": "MES_RETRY_MAX",
    "retry_backoff_s": "MES_RETRY_BACKOFF_S",
    "retry_backoff_max_s": "MES_RETRY_BACKOFF_MAX_S",
    "visibility_timeout_s": "MES_VISIBILITY_TIMEOUT_S",
    "connect_timeout_s": "MES_CONNECT_TIMEOUT_S",
    "redis_timeout_s": "MES_REDIS_TIMEOUT_S",
    "unacked_restore_interval_s": "MES_UNACKED_RESTORE_INTERVAL_S",
    "audit_at": "MES_AUDIT_AT",
    "audit_timezone": "MES_AUDIT_TIMEZONE",
    "audit_interval_s": "MES_AUDIT_INTERVAL_S",
    "audit_repair": "MES_AUDIT_REPAIR",
    "reports_dir": "MES_REPORTS_DIR",
    "report_retention_days": "MES_REPORT_RETENTION_DAYS",
    "audit_webhook_url": "AUDIT_WEBHOOK_URL",
    "webhook_timeout_s": "MES_WEBHOOK_TIMEOUT_S",
    "webhook_retries": "MES_WEBHOOK_RETRIES",
    "outbox_relay_interval_s": "MES_OUTBOX_RELAY_INTERVAL_S",
    "outbox_grace_s": "MES_OUTBOX_GRACE_S",
    "journal": "MES_JOURNAL",
    "verify_interval_s": "MES_VERIFY_INTERVAL_S",
    "verify_sweep": "MES_VERIFY_SWEEP",
    "verify_complete_s": "MES_VERIFY_COMPLETE_S",
    "group_max": "MES_GROUP_MAX",
    "lease_ttl_s": "MES_LEASE_TTL_S",
    "negative_wait_s": "MES_NEGATIVE_WAIT_S",
    "flower_url": "MES_FLOWER_URL",
    "partitions": "MES_PARTITIONS",
    "redis_sentinel_master": "MES_REDIS_SENTINEL_MASTER",
    "redis_sentinel_password": "MES_REDIS_SENTINEL_PASSWORD",
}
REDIS_SCHEMES = ("redis", "rediss")  # what both kombu's transport and redis-py's from_url read
SENTINEL_SCHEME = "sentinel"  # kombu's Sentinel transport and Celery's Sentinel result backend
SENTINEL_SEPARATOR = ";"  # between the Sentinels of one REDIS_URL, as kombu and Celery split it
SENTINEL_PORT = 26379  # a Sentinel's port when its URL names none
SENTINEL_MASTER_OPTION = "master_name"  # the one query option a Sentinel REDIS_URL may carry
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")
FLOWER_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Settings:
    """Everything mes_tasks can be told, with validated values."""

    redis_url: str = DEFAULT_REDIS_URL
    mongodb_uri: str = DEFAULT_MONGODB_URI
    key_prefix: str = DEFAULT_KEY_PREFIX
    lock_ttl_s: float = LOCK_TTL_S
    lock_wait_s: float = LOCK_WAIT_S
    lock_extend_interval_s: float = 0.0  # 0: derived, LOCK_EXTEND_FRACTION x lock_ttl_s
    lock_linger_s: float = LOCK_LINGER_S
    retry_max: int = RETRY_MAX
    retry_backoff_s: float = RETRY_BACKOFF_S
    retry_backoff_max_s: float = RETRY_BACKOFF_MAX_S
    visibility_timeout_s: float = VISIBILITY_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    redis_timeout_s: float = REDIS_TIMEOUT_S
    unacked_restore_interval_s: float = UNACKED_RESTORE_INTERVAL_S
    audit_at: str = AUDIT_AT
    audit_timezone: str = AUDIT_TIMEZONE
    audit_interval_s: float = 0.0  # > 0: audit every N seconds instead of nightly
    audit_repair: bool = False  # the scheduled audit repairs what it finds
    reports_dir: str = REPORTS_DIR
    report_retention_days: float = REPORT_RETENTION_DAYS
    audit_webhook_url: str = ""
    webhook_timeout_s: float = WEBHOOK_TIMEOUT_S
    webhook_retries: int = WEBHOOK_RETRIES
    outbox_relay_interval_s: float = OUTBOX_RELAY_INTERVAL_S
    outbox_grace_s: float = OUTBOX_GRACE_S
    journal: bool = True  # record every submission in the outbox before publishing it
    verify_interval_s: float = VERIFY_INTERVAL_S  # continuous verification every N seconds (0: off)
    verify_sweep: int = VERIFY_SWEEP  # work orders whose whole log each pass re-checks, oldest first
    verify_complete_s: float = VERIFY_COMPLETE_S  # an outbox entry this old must have its outcome
    group_max: int = GROUP_MAX  # updates applied together (group commit); 1: one at a time
    lease_ttl_s: float = LEASE_TTL_S
    negative_wait_s: float = NEGATIVE_WAIT_S
    flower_url: str = ""  # Flower's address as doctor reaches it, to check it refuses strangers
    partitions: int = 1  # workorder queues: 1 is the one ``workorder``; N > 1 ``workorder.0``..``.N-1``
    redis_sentinel_master: str = ""  # the master's name, for a sentinel:// REDIS_URL without ?master_name=
    redis_sentinel_password: str = ""  # the Sentinels' own password (``requirepass`` in sentinel.conf)

    def __post_init__(self) -> None:
        if self.lock_extend_interval_s == 0:
            object.__setattr__(self, "lock_extend_interval_s", self.lock_ttl_s * LOCK_EXTEND_FRACTION)
        _check_urls(self)
        _check_positive(self)
        _check_lock_timing(self)
        _check_visibility_timeout(self)
        _check_audit_schedule(self)
        if self.partitions > MAX_PARTITIONS:
            raise ConfigurationError(
                f"MES_PARTITIONS must be at most {MAX_PARTITIONS}, not {self.partitions}"
            )
        if self.group_max > GROUP_MAX_LIMIT:
            raise ConfigurationError(f"MES_GROUP_MAX must be at most {GROUP_MAX_LIMIT}, not {self.group_max}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (see ``ENV_NAMES``).

        Raises:
            ConfigurationError: a value is malformed or contradicts another.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(ENV_NAMES[field.name])
            if raw is not None and raw.strip() != "":
                values[field.name] = _parse(field.name, field.type, raw.strip())
        return cls(**values)  # type: ignore[arg-type]

    @property
    def longest_task_s(self) -> float:
        """Upper bound of one delivery: waiting for the lock, then holding it."""
        return self.lock_wait_s + self.lock_ttl_s

    @property
    def audit_time(self) -> tuple[int, int]:
        """``MES_AUDIT_AT`` as (hour, minute)."""
        hour, minute = self.audit_at.split(":")
        return int(hour), int(minute)

    @property
    def redis_db(self) -> int:
        """Database number in ``REDIS_URL`` (its path, or ``?db=``), 0 when none is given."""
        sentinel = self.sentinel
        if sentinel is not None:
            return sentinel.db
        return int(_parse_redis_url(self.redis_url).get("db", 0))

    @property
    def sentinel(self) -> Sentinel | None:
        """The Sentinels ``REDIS_URL`` names, with the master's name; None for a plain Redis."""
        if urlsplit(self.redis_url).scheme != SENTINEL_SCHEME:
            return None
        return parse_sentinel_url(self.redis_url, self.redis_sentinel_master)

    @property
    def redis_transport_url(self) -> str:
        """``REDIS_URL`` as kombu and Celery read it: a Sentinel URL without its query, every
        Sentinel with the credentials and database (kombu's failover reads them from the next)."""
        sentinel = self.sentinel
        return self.redis_url if sentinel is None else sentinel.transport_url()

    @property
    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to talk to the Sentinels themselves: bounded timeouts, their own password if any."""
        timeouts = {
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": self.redis_timeout_s,
        }
        return timeouts | ({"password": self.redis_sentinel_password} if self.redis_sentinel_password else {})

    @property
    def mongodb_db(self) -> str:
        """Database named in the URI path, ``mes`` when none is given."""
        return urlsplit(self.mongodb_uri).path.lstrip("/") or "mes"

    def masked(self) -> dict[str, object]:
        """Settings as a dict with credentials in URLs masked, safe to print."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["redis_url"] = mask_url(self.redis_url)
        out["mongodb_uri"] = mask_url(self.mongodb_uri)
        out["audit_webhook_url"] = mask_webhook(self.audit_webhook_url)
        out["redis_sentinel_password"] = "***" if self.redis_sentinel_password else ""
        return out


class Sentinel(NamedTuple):
    """A ``sentinel://`` ``REDIS_URL``, read: the Sentinels, the master's name, how to reach the master."""

    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None

    def transport_url(self) -> str:
        """One ``sentinel://[user:password@]host:port/db`` per Sentinel, ``;``-separated."""
        creds = ""
        if self.password is not None or self.username is not None:
            creds = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return SENTINEL_SEPARATOR.join(
            f"{SENTINEL_SCHEME}://{creds}{f'[{h}]' if ':' in h else h}:{p}/{self.db}" for h, p in self.hosts
        )


def mask_url(url: str) -> str:
    """Replace the password (or a lone username-as-token) in a URL with ``***``.

    A Sentinel URL has one per Sentinel.
    """
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        return SENTINEL_SEPARATOR.join(_mask_one(part) for part in url.split(SENTINEL_SEPARATOR))
    return _mask_one(url)


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    creds, _, host = parts.netloc.rpartition("@")
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def mask_webhook(url: str) -> str:
    """Webhook URLs carry their secret in the path: show only scheme and host."""
    if not url:
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/***"


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Mask the credentials of every URL inside free text (error messages, logs)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)


def _parse(name: str, kind: object, raw: str) -> object:
    env_name = ENV_NAMES[name]
    if kind in (bool, "bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{env_name}={raw!r} is not a boolean; use 1/0, true/false")
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
    except ValueError:
        what = "a whole number" if kind in (int, "int") else "a number"
        raise ConfigurationError(f"{env_name}={raw!r} is not {what}; set it to {what} or unset it") from None
    return raw


def _check_urls(s: Settings) -> None:
    _check_redis_url(s)
    _check_mongodb_uri(s.mongodb_uri)
    flower = urlsplit(s.flower_url)
    if s.flower_url and (flower.scheme not in FLOWER_SCHEMES or not flower.hostname):
        raise ConfigurationError(
            f"MES_FLOWER_URL={mask_url(s.flower_url)} must be http://host:port or https://host:port "
            "(Flower's address as seen from where doctor runs), or unset"
        )
    if not s.key_prefix:
        raise ConfigurationError("MES_KEY_PREFIX must not be empty; the default is 'mes:'")


def _parse_redis_url(url: str) -> dict[str, Any]:
    """redis-py's reading of a URL: the keyword arguments of its connection."""
    parts: dict[str, Any] = _redis_url_parts(url)  # type: ignore[no-untyped-call]
    return parts


def _check_redis_url(s: Settings) -> None:
    """A URL both kombu and redis-py read as meant: redis-py ignores a database it cannot parse."""
    url = s.redis_url
    shown = f"REDIS_URL={mask_url(url)}"
    fix = f"write it as redis://[:password@]host:port/db, e.g. {DEFAULT_REDIS_URL}"
    parts = urlsplit(url)
    if parts.scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url, s.redis_sentinel_master)
        return
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{shown} must start with redis://, rediss:// or sentinel:// (Sentinels); {fix}"
        )
    for name in ("redis_sentinel_master", "redis_sentinel_password"):
        if getattr(s, name):
            raise ConfigurationError(
                f"{ENV_NAMES[name]} is set but REDIS_URL={mask_url(url)} names no Sentinels; "
                "write REDIS_URL as sentinel://host:26379;sentinel://host2:26379/db or unset it"
            )
    try:
        _parse_redis_url(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{shown}: {mask_secrets(str(exc))}; {fix}") from None
    if not parts.hostname:
        raise ConfigurationError(f"{shown} names no host; {fix}")
    if port == 0:
        raise ConfigurationError(f"{shown}: port 0 is not a port; {fix}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigurationError(f"{shown}: database {database!r} is not a number 0, 1, 2, ...; {fix}")


SENTINEL_FIX = (
    "write it as sentinel://[:password@]host:26379;sentinel://host2:26379;.../db?master_name=NAME "
    "(or set MES_REDIS_SENTINEL_MASTER=NAME instead of ?master_name=)"
)


def parse_sentinel_url(url: str, master_setting: str = "") -> Sentinel:
    """Read a ``sentinel://`` URL; the database, credentials and master name may be on any Sentinel.

    Raises:
        ConfigurationError: a Sentinel is malformed, two disagree, or no master is named.
    """
    shown = f"REDIS_URL={mask_url(url)}"
    hosts: list[tuple[str, int]] = []
    said: dict[str, set[Any]] = {"db": set(), "creds": set(), "master": set()}
    for part in url.split(SENTINEL_SEPARATOR):
        hosts.append(_sentinel_host(part.strip(), shown, said))
    for what, values in said.items():
        if len(values) > 1:
            raise ConfigurationError(f"{shown}: its Sentinels name different {_WHAT[what]}; {SENTINEL_FIX}")
    master = next(iter(said["master"]), "")
    if master and master_setting and master != master_setting:
        raise ConfigurationError(
            f"{shown} names master {master!r} but MES_REDIS_SENTINEL_MASTER={master_setting!r}; "
            "name it once, in the URL or in the setting"
        )
    if not (master or master_setting):
        raise ConfigurationError(f"{shown} names no master; {SENTINEL_FIX}")
    username, password = next(iter(said["creds"]), (None, None))
    return Sentinel(
        tuple(hosts), master or master_setting, int(next(iter(said["db"]), 0)), username, password
    )


_WHAT = {"db": "databases", "creds": "credentials", "master": "masters"}


def _sentinel_host(part: str, shown: str, said: dict[str, set[Any]]) -> tuple[str, int]:
    parts = urlsplit(part)
    if parts.scheme != SENTINEL_SCHEME:
        raise ConfigurationError(f"{shown}: {mask_url(part)!r} is not sentinel://host:port; {SENTINEL_FIX}")
    try:
        port = SENTINEL_PORT if parts.port is None else parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{shown}: {mask_secrets(str(exc))}; {SENTINEL_FIX}") from None
    if port == 0:
        raise ConfigurationError(f"{shown}: port 0 is not a port; {SENTINEL_FIX}")
    if not parts.hostname:
        raise ConfigurationError(f"{shown}: a Sentinel names no host; {SENTINEL_FIX}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigurationError(
            f"{shown}: database {database!r} is not a number 0, 1, 2, ...; {SENTINEL_FIX}"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {SENTINEL_MASTER_OPTION})
    if unknown:
        raise ConfigurationError(f"{shown}: option {unknown[0]!r} is not read here; {SENTINEL_FIX}")
    said["db"].update([database] if database else [])
    creds = tuple(None if c is None else unquote(c) for c in (parts.username, parts.password))
    said["creds"].update([creds] if "@" in parts.netloc else [])
    said["master"].update(name for name in query.get(SENTINEL_MASTER_OPTION, []) if name)
    return parts.hostname, port


def _check_mongodb_uri(uri: str) -> None:
    shown = f"MONGODB_URI={mask_url(uri)}"
    fix = "write it as mongodb://[user:password@]host:port/database?replicaSet=name"
    parts = urlsplit(uri)
    if parts.scheme not in MONGODB_SCHEMES:
        raise ConfigurationError(f"{shown} must start with mongodb:// or mongodb+srv://; {fix}")
    if parts.scheme == "mongodb+srv":  # parsing it in full would query DNS: that is the client's job
        if not parts.hostname or parts.port is not None:
            raise ConfigurationError(f"{shown}: mongodb+srv:// takes one host name and no port")
        return
    try:  # an option the client would only warn about and then ignore is refused too
        uri_parser.parse_uri(uri)
    except Exception as exc:  # pymongo's InvalidURI, ConfigurationError and ValueError
        raise ConfigurationError(f"{shown}: {_reason(exc)}; {fix}") from None


def _reason(exc: Exception) -> str:
    """pymongo's reason without its hints to read the docstring."""
    text = mask_secrets(str(exc)).split(". Hint")[0].replace(" Refer to docstring.", "")
    return text.rstrip(". ")


def _check_positive(s: Settings) -> None:
    for name in (
        "lock_ttl_s",
        "lock_wait_s",
        "lock_extend_interval_s",
        "retry_backoff_s",
        "unacked_restore_interval_s",
        "outbox_relay_interval_s",
        "outbox_grace_s",
        "lease_ttl_s",
        "redis_timeout_s",
        "partitions",
        "verify_complete_s",
        "group_max",
    ):
        if getattr(s, name) <= 0:
            raise ConfigurationError(f"{ENV_NAMES[name]} must be greater than zero")
    for name in (
        "retry_max",
        "lock_linger_s",
        "retry_backoff_max_s",
        "connect_timeout_s",
        "audit_interval_s",
        "report_retention_days",
        "webhook_timeout_s",
        "webhook_retries",
        "negative_wait_s",
        "verify_interval_s",
        "verify_sweep",
    ):
        if getattr(s, name) < 0:
            raise ConfigurationError(f"{ENV_NAMES[name]} must not be negative")


def _check_lock_timing(s: Settings) -> None:
    if s.lock_ttl_s + 1e-9 < 3 * s.lock_extend_interval_s:
        raise ConfigurationError(
            f"MES_LOCK_TTL_S={s.lock_ttl_s:g} is shorter than three watchdog intervals "
            f"(3 x MES_LOCK_EXTEND_INTERVAL_S={s.lock_extend_interval_s:g}); a single slow "
            "extension would lose the lock. Raise MES_LOCK_TTL_S or lower "
            "MES_LOCK_EXTEND_INTERVAL_S (it defaults to a third of the TTL)."
        )
    for name in ("lease_ttl_s", "lock_ttl_s"):
        if s.redis_timeout_s > getattr(s, name) / 2:
            raise ConfigurationError(
                f"MES_REDIS_TIMEOUT_S={s.redis_timeout_s:g} is more than half of "
                f"{ENV_NAMES[name]}={getattr(s, name):g}: an extension that meets a silent "
                "connection would lose the lease or lock before a new connection is tried. "
                "Lower MES_REDIS_TIMEOUT_S or raise the TTL."
            )


def _check_visibility_timeout(s: Settings) -> None:
    needed = VISIBILITY_SAFETY_FACTOR * (s.longest_task_s + s.retry_backoff_max_s)
    if s.visibility_timeout_s < needed:
        raise ConfigurationError(
            f"MES_VISIBILITY_TIMEOUT_S={s.visibility_timeout_s:g} is too short: an "
            "unacknowledged task would be redelivered while still running or waiting "
            f"for its retry. It must be at least {VISIBILITY_SAFETY_FACTOR:g} x "
            f"(MES_LOCK_WAIT_S + MES_LOCK_TTL_S + MES_RETRY_BACKOFF_MAX_S) = {needed:g}; "
            "raise it or lower those settings."
        )


def _check_audit_schedule(s: Settings) -> None:
    try:
        zone = ZoneInfo(s.audit_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"MES_AUDIT_TIMEZONE={s.audit_timezone!r} is not a known time zone; use an IANA name "
            "such as Europe/Berlin or Asia/Shanghai"
        ) from None
    if not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", s.audit_at):
        raise ConfigurationError(f"MES_AUDIT_AT={s.audit_at!r} must be a 24-hour time HH:MM, e.g. 04:15")
    start, end = DST_WINDOW_HOURS
    if _observes_dst(zone) and start <= s.audit_time[0] < end:
        raise ConfigurationError(
            f"MES_AUDIT_AT={s.audit_at} falls in the {start:02d}:00-{end:02d}:00 window that daylight-"
            f"saving changes in {s.audit_timezone} skip or repeat, so the audit could run twice or "
            "not at all; choose a time outside it (the default is 04:15)"
        )


def _observes_dst(zone: ZoneInfo) -> bool:
    year = datetime.now().year
    offsets = {datetime(year, month, 1, 12, tzinfo=zone).utcoffset() for month in (1, 7)}
    return len(offsets) > 1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
