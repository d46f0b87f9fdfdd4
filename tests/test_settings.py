"""Settings are read once, validated, and contradictions stop start-up with a fix."""

from __future__ import annotations

import pytest

from mes_tasks.errors import ConfigurationError
from mes_tasks.settings import Settings, mask_secrets, mask_url


def test_defaults_are_consistent() -> None:
    s = Settings()
    assert s.lock_extend_interval_s == pytest.approx(s.lock_ttl_s / 3)
    assert s.redis_url.endswith("/3")


def test_watchdog_interval_follows_a_changed_ttl() -> None:
    s = Settings.from_env({"MES_LOCK_TTL_S": "3", "MES_VISIBILITY_TIMEOUT_S": "200"})
    assert s.lock_extend_interval_s == pytest.approx(1.0)


def test_a_ttl_shorter_than_three_watchdog_intervals_is_refused_with_a_fix() -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"MES_LOCK_TTL_S": "5", "MES_LOCK_EXTEND_INTERVAL_S": "2"})
    assert "MES_LOCK_TTL_S" in str(err.value)
    assert "lower MES_LOCK_EXTEND_INTERVAL_S" in str(err.value)


def test_a_visibility_timeout_not_comfortably_longer_than_task_plus_countdown_is_refused() -> None:
    # longest task 10 + 30, countdown 60: needs 2 x 100 = 200
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"MES_VISIBILITY_TIMEOUT_S": "150"})
    assert "MES_VISIBILITY_TIMEOUT_S=150" in str(err.value)
    assert "at least 2 x" in str(err.value)
    Settings.from_env({"MES_VISIBILITY_TIMEOUT_S": "200"})


def test_a_malformed_number_names_its_variable() -> None:
    with pytest.raises(ConfigurationError, match="MES_RETRY_MAX='many'"):
        Settings.from_env({"MES_RETRY_MAX": "many"})


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"MONGODB_URI": "postgres://x"}, "MONGODB_URI"),
        ({"MES_LOCK_WAIT_S": "0"}, "MES_LOCK_WAIT_S"),
        ({"MES_RETRY_MAX": "-1"}, "MES_RETRY_MAX"),
    ],
)
def test_invalid_values_are_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        Settings.from_env(env)


def test_credentials_never_appear_in_printable_settings() -> None:
    s = Settings(
        redis_url="redis://:s3cret@redis:6379/3",
        mongodb_uri="mongodb://mes:hunter2@mongo:27017/mes?replicaSet=rs0",
    )
    shown = str(s.masked())
    assert "s3cret" not in shown and "hunter2" not in shown
    assert mask_url("mongodb://mes:hunter2@mongo/mes") == "mongodb://mes:***@mongo/mes"


def test_credentials_are_masked_inside_free_text() -> None:
    text = "Error connecting to redis://user:pw@host:6379/3 and mongodb://a:b@h/x"
    assert mask_secrets(text) == "Error connecting to redis://***@host:6379/3 and mongodb://***@h/x"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:99999/3"}, "Port out of range"),
        ({"REDIS_URL": "redis://127.0.0.1:abc/3"}, "REDIS_URL=redis://127.0.0.1:abc/3"),
        ({"REDIS_URL": "redis://127.0.0.1:0/3"}, "port 0"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/x"}, "database 'x' is not a number"),
        ({"REDIS_URL": "redis:///3"}, "names no host"),
        ({"MONGODB_URI": "mongodb://127.0.0.1:99999/mes"}, "Port must be an integer"),
        ({"MONGODB_URI": "mongodb://"}, "at least one hostname"),
        ({"MONGODB_URI": "mongodb://h/mes?retryWrites=maybe"}, "retrywrites"),
        ({"MONGODB_URI": "mongodb+srv://h:27017/mes"}, "no port"),
        ({"MES_FLOWER_URL": "ftp://flower"}, "MES_FLOWER_URL"),
    ],
)
def test_malformed_urls_are_refused_with_the_variable_and_a_fix(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle) as err:
        Settings.from_env(env)
    assert "\n" not in str(err.value)


def test_a_url_password_never_appears_in_its_error() -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"REDIS_URL": "redis://:hunter2@h:99999/3"})
    assert "hunter2" not in str(err.value) and "redis://:***@h:99999/3" in str(err.value)


def test_well_formed_urls_are_accepted() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "rediss://:pw@redis.example:6380/2?db=5",
            "MONGODB_URI": "mongodb+srv://u:p@c.example/mes",
        }
    )
    assert s.redis_db == 5 and s.mongodb_db == "mes"
    assert Settings.from_env({"REDIS_URL": "redis://h:6379"}).redis_db == 0
