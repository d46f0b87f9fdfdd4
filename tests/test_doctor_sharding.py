"""doctor's sharding checks: the decision from hello and config documents, and a real replica set."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import MongoClient, monitoring

from mes_tasks import db
from mes_tasks.ops.doctor import (
    FAIL,
    INFO,
    OK,
    WARN,
    Check,
    Context,
    check_sharding,
    sharding_checks,
    unique_indexes,
)
from mes_tasks.settings import Settings

MONGOS_HELLO = {"isWritablePrimary": True, "msg": "isdbgrid", "maxWireVersion": 25}
TODAY = unique_indexes()  # the unique indexes the models create now
BY_ORDER: dict[str, list[tuple[str, ...]]] = {
    **TODAY,
    "quantity_logs": [("work_order_id", "request_id")],  # a unique index per work order
}


def tracked(name: str, key: dict[str, Any], unique: bool = False, **extra: Any) -> dict[str, Any]:
    """A ``config.collections`` document as a mongos returns it."""
    return {"_id": f"mes.{name}", "key": key, "unique": unique, "lastmodEpoch": "…", **extra}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def statuses(checks: list[Check]) -> set[str]:
    return {c.status for c in checks}


# -- the decision, from plain documents -----------------------------------------------------


def test_the_unique_indexes_are_read_from_the_models() -> None:
    assert TODAY["quantity_logs"] == [("request_id",)]
    assert TODAY["failed_updates"] == [("request_id",)]
    assert TODAY["outbox"] == [("job_id",)]
    assert TODAY["work_orders"] == TODAY["audit_reports"] == []


def test_a_replica_set_is_not_sharded_and_that_is_all_it_says() -> None:
    hello = {"isWritablePrimary": True, "setName": "rs0"}
    assert sharding_checks(hello, {}, set(), TODAY) == [Check(OK, "sharding", "not sharded: replica set rs0")]


def test_a_cluster_with_every_collection_unsharded_keeps_transactions_on_one_shard() -> None:
    checks = sharding_checks(MONGOS_HELLO, {}, set(), TODAY)
    assert statuses(checks) == {OK, INFO}
    assert "quantity_logs unsharded" in by_name(checks)["sharding"].detail
    assert by_name(checks)["sharded transactions"].status == OK


def test_logs_keyed_by_work_order_fail_while_the_request_id_index_is_global() -> None:
    layout = {"quantity_logs": tracked("quantity_logs", {"work_order_id": 1})}
    check = by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))["shard key quantity_logs"]
    assert check.status == FAIL
    assert "unique index on request_id is impossible" in check.detail
    assert "{request_id: 1}" in check.fix


def test_logs_keyed_by_request_id_keep_the_index_but_warn_of_cross_shard_commits() -> None:
    layout = {
        "work_orders": tracked("work_orders", {"_id": "hashed"}),
        "quantity_logs": tracked("quantity_logs", {"request_id": 1}, unique=True),
    }
    checks = by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))
    assert FAIL not in statuses(list(checks.values()))
    assert "{request_id: 1} unique" in checks["sharding"].detail
    assert checks["sharded transactions"].status == WARN
    assert "two-phase commit" in checks["sharded transactions"].detail


def test_logs_sharded_while_work_orders_are_not_still_commit_across_shards() -> None:
    layout = {"quantity_logs": tracked("quantity_logs", {"request_id": "hashed"})}
    checks = by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))
    assert "shard key quantity_logs" not in checks  # a hashed key is a field-name prefix of the index
    assert checks["sharded transactions"].status == WARN


def test_work_orders_on_any_key_but_id_fail() -> None:
    layout = {"work_orders": tracked("work_orders", {"plant": 1, "_id": 1})}
    check = by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))["shard key work_orders"]
    assert check.status == FAIL
    assert "by _id alone" in check.detail
    assert "{_id: 1}" in check.fix


@pytest.mark.parametrize(("key", "fails"), [({"job_id": "hashed"}, False), ({"created_at": 1}, True)])
def test_the_outbox_may_be_sharded_on_its_job_id_only(key: dict[str, Any], fails: bool) -> None:
    layout = {"outbox": tracked("outbox", key)}
    assert ("shard key outbox" in by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))) is fails


def test_both_keyed_by_work_order_and_zoned_commit_on_one_shard_once_the_index_is_per_work_order() -> None:
    layout = {
        "work_orders": tracked("work_orders", {"_id": 1}),
        "quantity_logs": tracked("quantity_logs", {"work_order_id": 1, "request_id": 1}, unique=True),
    }
    zoned = {"work_orders", "quantity_logs"}
    assert statuses(sharding_checks(MONGOS_HELLO, layout, zoned, BY_ORDER)) == {OK, INFO}
    unzoned = by_name(sharding_checks(MONGOS_HELLO, layout, set(), BY_ORDER))["sharded transactions"]
    assert unzoned.status == WARN and "not zoned" in unzoned.detail
    today = by_name(sharding_checks(MONGOS_HELLO, layout, zoned, TODAY))
    assert today["shard key quantity_logs"].status == FAIL  # the models still make request_id unique


def test_a_moved_collection_is_unsharded_and_only_worth_knowing() -> None:
    layout = {"quantity_logs": tracked("quantity_logs", {"_id": 1}, unsplittable=True)}
    checks = by_name(sharding_checks(MONGOS_HELLO, layout, set(), TODAY))
    assert "quantity_logs unsharded (moved)" in checks["sharding"].detail
    assert checks["sharded transactions"].status == INFO
    assert statuses(list(checks.values())) == {INFO}


# -- a real replica set ---------------------------------------------------------------------


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_on_a_replica_set_the_check_is_ok_and_costs_one_command(settings: Settings, mongo: db.Mongo) -> None:
    commands = Commands()
    client: db.Mongo = MongoClient(settings.mongodb_uri, event_listeners=[commands])
    try:
        checks = check_sharding(Context(settings, None, mongo=client))  # type: ignore[arg-type]
        sent = list(commands.names)  # closing the client sends endSessions
    finally:
        client.close()
    assert [(c.status, c.name) for c in checks] == [(OK, "sharding")]
    assert checks[0].detail.startswith("not sharded: replica set ")
    assert sent == ["hello"]


def test_without_a_prepared_client_the_check_uses_the_connection_that_answered(
    settings: Settings, mongo: db.Mongo
) -> None:
    checks = check_sharding(Context(settings, None))  # type: ignore[arg-type]
    assert [(c.status, c.name) for c in checks] == [(OK, "sharding")]
