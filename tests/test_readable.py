"""An update reads as work order, kind, quantity and request id where operators look (Flower, logs)."""

from __future__ import annotations

import json

import redis

from mes_tasks.names import WORKORDER_QUEUE
from mes_tasks.tasks import update_quantity


def queued_headers(client: redis.Redis) -> dict[str, object]:
    raw = client.lindex(WORKORDER_QUEUE, 0)
    assert raw is not None, "nothing was queued"
    headers: dict[str, object] = json.loads(raw)["headers"]
    return headers


def test_a_queued_update_carries_its_work_order_kind_quantity_and_request_id_for_flower(
    redis_client: redis.Redis,
) -> None:
    update_quantity.delay("WO-7", "output", 5, request_id="scan:BC1:PACK", context={"operator_id": "U1"})
    headers = queued_headers(redis_client)
    assert headers["argsrepr"] == "'WO-7' 'output' +5"
    assert headers["kwargsrepr"] == "request_id='scan:BC1:PACK'"  # never the context


def test_a_correction_and_an_oversized_id_are_shown_signed_and_cut(redis_client: redis.Redis) -> None:
    update_quantity.delay(kind="input", quantity=-2, work_order_id="W" * 100, request_id="r")
    headers = queued_headers(redis_client)
    assert headers["argsrepr"] == f"'{'W' * 40}'…(100 chars) 'input' -2"


def test_a_retry_the_task_sends_itself_reads_the_same(redis_client: redis.Redis) -> None:
    update_quantity.apply_async(("WO-7", "input", 3), {"request_id": "r9"}, retries=1)  # as Task.retry sends
    headers = queued_headers(redis_client)
    assert (headers["argsrepr"], headers["kwargsrepr"]) == ("'WO-7' 'input' +3", "request_id='r9'")
