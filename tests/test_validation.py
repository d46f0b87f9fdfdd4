"""Bad input is refused with a stable code before anything reaches MongoDB."""

from __future__ import annotations

from typing import Any

import pytest

from cases import BAD_INPUTS, GOOD
from mes_tasks.errors import ValidationError
from mes_tasks.validation import validate_update


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
