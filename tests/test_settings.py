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
        ({"MES_REDIS_TIMEOUT_S": "0"}, "MES_REDIS_TIMEOUT_S"),
        # a silent connection's timeout would outlast the lease before a new one is tried
        ({"MES_REDIS_TIMEOUT_S": "2"}, "more than half of MES_LEASE_TTL_S=3"),
        ({"MES_LOCK_TTL_S": "1", "MES_LEASE_TTL_S": "6", "MES_REDIS_TIMEOUT_S": "1"}, "MES_LOCK_TTL_S=1"),
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


SENTINELS = "sentinel://:s3cret@h1:26379;sentinel://:s3cret@h2:26380;sentinel://:s3cret@h3"


def test_a_sentinel_url_names_the_sentinels_the_database_and_the_master() -> None:
    s = Settings.from_env({"REDIS_URL": f"{SENTINELS}/3?master_name=mymaster"})
    assert s.sentinel is not None
    assert s.sentinel.hosts == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (s.sentinel.master, s.sentinel.password, s.redis_db) == ("mymaster", "s3cret", 3)
    # kombu and Celery read each Sentinel with its credentials and database, and no query
    assert s.redis_transport_url == (
        "sentinel://:s3cret@h1:26379/3;sentinel://:s3cret@h2:26380/3;sentinel://:s3cret@h3:26379/3"
    )


def test_the_master_may_be_named_by_a_setting_instead_of_the_url() -> None:
    s = Settings.from_env({"REDIS_URL": "sentinel://h1;sentinel://h2/2", "MES_REDIS_SENTINEL_MASTER": "m1"})
    assert s.sentinel is not None and (s.sentinel.master, s.redis_db) == ("m1", 2)
    same = {"REDIS_URL": "sentinel://h1/2?master_name=m1", "MES_REDIS_SENTINEL_MASTER": "m1"}
    assert Settings.from_env(same).sentinel is not None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDIS_URL": "sentinel://h1:26379;sentinel://h2:26379/3"}, "names no master"),
        ({"REDIS_URL": "sentinel://h1?master_name=a", "MES_REDIS_SENTINEL_MASTER": "b"}, "name it once"),
        ({"REDIS_URL": "sentinel://h1/1;sentinel://h2/2?master_name=a"}, "different databases"),
        ({"REDIS_URL": "sentinel://:a@h1;sentinel://:b@h2?master_name=m"}, "different credentials"),
        ({"REDIS_URL": "sentinel://h1;redis://h2?master_name=m"}, "is not sentinel://host:port"),
        ({"REDIS_URL": "sentinel://h1:0?master_name=m"}, "port 0"),
        ({"REDIS_URL": "sentinel://h1:abc?master_name=m"}, "could not be cast"),
        ({"REDIS_URL": "sentinel://h1/x?master_name=m"}, "database 'x' is not a number"),
        ({"REDIS_URL": "sentinel://h1?master_name=m&ssl=1"}, "option 'ssl'"),
        ({"REDIS_URL": "sentinel:///3?master_name=m"}, "names no host"),
        ({"REDIS_URL": "redis://h/3", "MES_REDIS_SENTINEL_MASTER": "m"}, "names no Sentinels"),
        ({"REDIS_URL": "redis://h/3", "MES_REDIS_SENTINEL_PASSWORD": "pw"}, "names no Sentinels"),
    ],
)
def test_a_malformed_or_contradictory_sentinel_url_is_refused_in_one_line(
    env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigurationError, match=needle) as err:
        Settings.from_env(env)
    assert "\n" not in str(err.value)


def test_sentinel_passwords_never_appear_in_printable_settings_or_errors() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": f"{SENTINELS}/3",
            "MES_REDIS_SENTINEL_MASTER": "m",
            "MES_REDIS_SENTINEL_PASSWORD": "hunter2",
        }
    )
    shown = str(s.masked())
    assert "s3cret" not in shown and "hunter2" not in shown
    assert mask_url(f"{SENTINELS}/3").count(":***@") == 3
    assert "s3cret" not in mask_secrets(f"connecting to {s.redis_transport_url} failed")
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"REDIS_URL": f"{SENTINELS}:99999/3?master_name=m"})
    assert "s3cret" not in str(err.value)


def test_the_celery_config_gives_broker_and_results_the_master_and_the_sentinels_password() -> None:
    from mes_tasks.config import celery_settings

    s = Settings.from_env(
        {
            "REDIS_URL": f"{SENTINELS}/3?master_name=m",
            "MES_REDIS_SENTINEL_PASSWORD": "pw",
            "MES_CONNECT_TIMEOUT_S": "2",
            "MES_REDIS_TIMEOUT_S": "0.5",
        }
    )
    conf = celery_settings(s)
    assert conf["broker_url"] == conf["result_backend"] == s.redis_transport_url
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "m"
        assert options["sentinel_kwargs"] == {
            "socket_connect_timeout": 2,
            "socket_timeout": 0.5,
            "password": "pw",
        }
    plain = celery_settings(Settings())
    assert "master_name" not in plain["broker_transport_options"]
    assert plain["broker_url"] == Settings().redis_url
