"""Bad input is refused with a stable code before anything reaches MongoDB."""

from __future__ import annotations

from typing import Any

import pytest

from mes_tasks.errors import ValidationError
from mes_tasks.validation import MAX_ABS_QUANTITY, validate_update

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


@pytest.mark.parametrize(("override", "code"), BAD_INPUTS)
def test_bad_input_is_refused_with_its_code(override: dict[str, Any], code: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_update(**{**GOOD, **override})
    assert err.value.code == code


def test_good_input_passes_with_context_and_negative_corrections() -> None:
    req = validate_update(
        "WO-1", "input", -5, "scan:BC$1:PACK", {"barcode": "BC$1", "process_name": "包装", "reason": None}
    )
    assert (req.quantity, req.request_id) == (-5, "scan:BC$1:PACK")
    assert req.context == {"barcode": "BC$1", "process_name": "包装"}


LONG = "x" * 5000
QUOTED_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"work_order_id": LONG}, "INVALID_WORK_ORDER_ID"),
    ({"work_order_id": f" {LONG}"}, "INVALID_WORK_ORDER_ID"),
    ({"request_id": LONG}, "INVALID_REQUEST_ID"),
    ({"kind": LONG}, "INVALID_KIND"),
    ({"context": {LONG: "v"}}, "INVALID_CONTEXT"),
    ({"context": {"reason": LONG}}, "INVALID_CONTEXT"),
    ({"context": [LONG]}, "INVALID_CONTEXT"),
]


@pytest.mark.parametrize(("override", "code"), QUOTED_INPUTS)
def test_an_error_message_quotes_only_a_short_prefix_of_the_input(
    override: dict[str, Any], code: str
) -> None:
    with pytest.raises(ValidationError) as err:
        validate_update(**{**GOOD, **override})
    assert err.value.code == code
    assert len(err.value.message) < 300 and "xxxx" in err.value.message


def test_unknown_context_keys_are_named_a_few_at_a_time() -> None:
    with pytest.raises(ValidationError) as err:
        validate_update(**{**GOOD, "context": {f"key{n}": "v" for n in range(500)}})
    assert err.value.message.startswith("unknown context keys 'key0', 'key1', 'key2' and 497 more; allowed:")
