"""Input cases shared by the validation and producer tests."""

from __future__ import annotations

from typing import Any

from mes_tasks.validation import MAX_ABS_QUANTITY

GOOD: dict[str, Any] = {"work_order_id": "WO-1", "kind": "output", "quantity": 1}

BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"work_order_id": None}, "MISSING_WORK_ORDER_ID"),
    ({"work_order_id": ""}, "MISSING_WORK_ORDER_ID"),
    ({"work_order_id": "   "}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": {"$ne": None}}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": "WO$1"}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": "WO\x001"}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": "W" * 129}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": 1001}, "INVALID_WORK_ORDER_ID"),
    ({"kind": "scrap"}, "INVALID_KIND"),
    ({"kind": None}, "INVALID_KIND"),
    ({"quantity": 0}, "INVALID_QUANTITY"),
    ({"quantity": 1.0}, "INVALID_QUANTITY"),
    ({"quantity": True}, "INVALID_QUANTITY"),
    ({"quantity": "3"}, "INVALID_QUANTITY"),
    ({"quantity": MAX_ABS_QUANTITY + 1}, "INVALID_QUANTITY"),
    ({"quantity": -MAX_ABS_QUANTITY - 1}, "INVALID_QUANTITY"),
    ({"request_id": ""}, "INVALID_REQUEST_ID"),
    ({"request_id": 7}, "INVALID_REQUEST_ID"),
    ({"request_id": "r\x00"}, "INVALID_REQUEST_ID"),
    ({"context": ["barcode"]}, "INVALID_CONTEXT"),
    ({"context": {"colour": "red"}}, "INVALID_CONTEXT"),
    ({"context": {"$where": "1"}}, "INVALID_CONTEXT"),
    ({"context": {"barcode": 12}}, "INVALID_CONTEXT"),
    ({"context": {"reason": "x" * 513}}, "INVALID_CONTEXT"),
]
