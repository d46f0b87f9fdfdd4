"""Flower credentials that Flower would split at a ',' are refused before anything starts."""

from __future__ import annotations

import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from devtools.devserver import CELERY, free_port
from devtools.stack import flower_credentials
from mes_tasks.errors import ConfigurationError
from mes_tasks.flowerauth import basic_auth, check_basic_auth

SECRET = "s3cret-pa"  # the two halves of a password cut at its ','
REST = "rt2-of-it"
CUT = f"admin:{SECRET},{REST}"
EXIT_CONFIG = 78


def message_of(value: str) -> str:
    with pytest.raises(ConfigurationError) as err:
        check_basic_auth(value)
    return err.value.message


@pytest.mark.parametrize(
    "value", ["admin:long-enough", "admin:with:colons", "a:12345678,b:abcdefgh", "admin:包装包装包装包装"]
)
def test_well_formed_credentials_pass(value: str) -> None:
    check_basic_auth(value)


BAD: list[tuple[str, str]] = [
    (CUT, "entry 2 of 2 (split at ',') has no ':': the password of user 'admin' contains ','"),
    (f"admin:{SECRET}{REST},", "entry 2 of 2 (split at ',') is empty"),
    (f"admin{SECRET}", "entry 1 of 1 (split at ',') has no ':'"),
    (f":{SECRET}", "no user"),
    ("admin:s3cret", "the password of user 'admin' has fewer than 8 characters"),
    (f"admin:{SECRET}, bob:{REST}", "user ' bob' starts or ends with a space"),
]


@pytest.mark.parametrize(("value", "expected"), BAD)
def test_misread_credentials_are_refused_in_one_line_that_names_the_setting_not_the_password(
    value: str, expected: str
) -> None:
    message = message_of(value)
    assert message.startswith("FLOWER_BASIC_AUTH: ") and expected in message
    assert "\n" not in message
    assert not any(part in message for part in (SECRET, REST, "s3cret")), message


def test_one_user_refuses_a_separator_in_the_user_or_a_comma_in_the_password() -> None:
    names = ("MES_FLOWER_USER", "MES_FLOWER_PASSWORD")
    assert basic_auth("admin", "pass:word", *names) == "admin:pass:word"
    for user in ("ad:min", "ad,min", ""):
        with pytest.raises(ConfigurationError, match=r"^MES_FLOWER_USER: "):
            basic_auth(user, "long-enough", *names)
    with pytest.raises(ConfigurationError, match=r"^MES_FLOWER_PASSWORD: .*without ','") as err:
        basic_auth("admin", f"{SECRET},{REST}", *names)
    assert SECRET not in err.value.message and REST not in err.value.message
    with pytest.raises(ConfigurationError, match=r"^MES_FLOWER_PASSWORD: .*fewer than 8"):
        basic_auth("admin", "short", *names)


def test_generated_passwords_never_contain_a_comma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MES_FLOWER_USER", raising=False)
    monkeypatch.delenv("MES_FLOWER_PASSWORD", raising=False)
    user, password, generated = flower_credentials(tmp_path)
    assert generated and "," not in password
    check_basic_auth(f"{user}:{password}")
    url_safe = set(string.ascii_letters + string.digits + "-_")
    assert all(set(secrets.token_urlsafe(18)) <= url_safe for _ in range(1000))


def test_flower_credentials_refuse_a_password_from_the_environment_with_a_comma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MES_FLOWER_PASSWORD", f"{SECRET},{REST}")
    with pytest.raises(ConfigurationError, match=r"^MES_FLOWER_PASSWORD: "):
        flower_credentials(tmp_path)
    monkeypatch.setenv("MES_FLOWER_PASSWORD", "long-enough")
    monkeypatch.setenv("MES_FLOWER_USER", "ad:min")
    with pytest.raises(ConfigurationError, match=r"^MES_FLOWER_USER: "):
        flower_credentials(tmp_path)


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)


def test_flower_refuses_to_start_with_a_password_it_would_split() -> None:
    done = run([*CELERY, "flower", f"--port={free_port()}", "--address=127.0.0.1"], FLOWER_BASIC_AUTH=CUT)
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error [CONFIG_INVALID]: mes_tasks configuration: FLOWER_BASIC_AUTH: ")
    assert SECRET not in done.stderr + done.stdout and REST not in done.stderr + done.stdout


def test_every_celery_process_refuses_it_too() -> None:
    done = run([*CELERY, "inspect", "ping", "--timeout", "0.1"], FLOWER_BASIC_AUTH=CUT)
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "FLOWER_BASIC_AUTH" in done.stderr and SECRET not in done.stderr


def test_make_run_refuses_a_flower_password_with_a_comma_before_starting_anything(tmp_path: Path) -> None:
    var = tmp_path / "var"
    argv = [sys.executable, "-m", "devtools.devserver", "run", "--var", str(var)]
    argv += [f"--{name}-port={free_port()}" for name in ("redis", "mongo", "flower")]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}  # its own stack
    done = subprocess.run(argv, cwd=REPO, env={**env, "MES_FLOWER_PASSWORD": f"{SECRET},{REST}"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().startswith("[stack] cannot start Flower: MES_FLOWER_PASSWORD: ")
    assert SECRET not in done.stderr + done.stdout and "starting" not in done.stdout
    assert not (var / "log").exists()
