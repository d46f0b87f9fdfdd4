"""docker-compose.yml, checked without Docker: what matters for exactly-once counting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO
from devtools.devserver import api_argv, beat_argv, flower_argv, worker_argv


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def cli_of(argv: list[str]) -> list[str]:
    return ["celery", *argv[3:]]  # drop "python -m celery"


def test_redis_persists_with_aof_and_never_evicts(compose: dict[str, Any]) -> None:
    command = services(compose)["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services(compose)["redis"]["volumes"])


def test_mongo_is_a_replica_set_initiated_by_its_healthcheck(compose: dict[str, Any]) -> None:
    mongo = services(compose)["mongo"]
    assert "--replSet" in mongo["command"]
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"])
    uri = services(compose)["workorder"]["environment"]["MONGODB_URI"]
    assert "replicaSet=rs0" in uri


def test_exactly_one_solo_worker_consumes_workorder(compose: dict[str, Any]) -> None:
    on_workorder = [
        name
        for name, svc in services(compose).items()
        if "worker" in svc.get("command", [])
        and svc["command"][svc["command"].index("-Q") + 1] == "workorder"
    ]
    assert on_workorder == ["workorder"]
    worker = services(compose)["workorder"]
    assert worker["deploy"]["replicas"] == 1
    assert worker["command"][worker["command"].index("-P") + 1] == "solo"


def test_the_processes_run_the_same_commands_as_make_run(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert svc["workorder"]["command"] == cli_of(worker_argv("workorder", "workorder"))
    assert svc["audit"]["command"] == cli_of(worker_argv("audit", "audit"))
    assert svc["beat"]["command"] == cli_of(beat_argv(Path("/var/lib/mes/beat/celerybeat-schedule")))
    assert svc["flower"]["command"] == cli_of(flower_argv(5555, "0.0.0.0"))


def test_the_gateway_runs_as_make_run_starts_it_with_tokens_from_the_environment_and_a_healthcheck(
    compose: dict[str, Any],
) -> None:
    api = services(compose)["api"]
    assert api["command"] == cli_of(api_argv(8000, "0.0.0.0", 2))
    assert api["environment"]["MES_API_TOKENS"].startswith("${MES_API_TOKENS:?")
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])
    assert "/health" in " ".join(api["healthcheck"]["test"])


def test_flower_requires_auth_from_the_environment(compose: dict[str, Any]) -> None:
    flower = services(compose)["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_every_service_has_a_restart_policy_and_data_has_volumes(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        assert svc.get("restart") == "unless-stopped", name
    assert {"redis-data", "mongo-data", "reports", "beat-data"} <= set(compose["volumes"])
    for name in ("redis", "mongo", "workorder", "audit", "flower"):
        assert "healthcheck" in services(compose)[name], name


def test_the_image_installs_the_package_and_runs_unprivileged() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c requirements.lock ." in dockerfile and "USER mes" in dockerfile


def test_the_metrics_service_serves_on_all_interfaces_of_its_container_only(compose: dict[str, Any]) -> None:
    metrics = services(compose)["metrics"]
    assert metrics["command"] == [
        "celery",
        "-A",
        "mes_tasks",
        "metrics",
        "--host",
        "0.0.0.0",
        "--port",
        "9808",
    ]
    assert metrics["ports"] == ["127.0.0.1:9808:9808"]
    assert "profiles" not in metrics and "healthcheck" in metrics


def test_prometheus_and_grafana_are_an_optional_profile_fed_from_deploy(compose: dict[str, Any]) -> None:
    svc = services(compose)
    for name in ("prometheus", "grafana"):
        assert svc[name]["profiles"] == ["monitoring"], name
        assert all(p.startswith("127.0.0.1:") for p in svc[name]["ports"]), name
        for volume in svc[name]["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith("./") or (REPO / source).exists(), volume
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["metrics:9808"]
    # The config names its rule file relative to itself: the directory is mounted whole.
    assert "./deploy/prometheus:/etc/prometheus:ro" in svc["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["prometheus"]["command"]
    assert all((REPO / "deploy/prometheus" / rules).is_file() for rules in config["rule_files"])
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])
