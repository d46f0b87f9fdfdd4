"""The one load-plan generator: the updates the demo, the chaos run and the tests send.

``scans`` yields updates without end: each a new request (``{prefix}:{i}``) on a random
work order and counter, except that a ``dup_share`` of them repeat an earlier update
exactly (the same request id: counted once) and a ``bad_share`` are malformed in one
field (refused at the call site, or dead-lettered for a missing work order).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

KINDS = ("input", "output")
MALFORMED: tuple[dict[str, Any], ...] = ({"quantity": 0}, {"work_order_id": "MISSING-WO"}, {"kind": "scrap"})


def scans(
    rng: random.Random,
    work_orders: Sequence[str],
    prefix: str,
    *,
    dup_share: float = 0.0,
    bad_share: float = 0.0,
    max_quantity: int = 9,
    source: str = "TEST",
) -> Iterator[dict[str, Any]]:
    """Updates as ``submit_quantity_update``'s keyword arguments, without end."""
    sent: list[dict[str, Any]] = []
    i = 0
    while True:
        roll = rng.random()
        if sent and roll < dup_share:
            yield dict(rng.choice(sent))
        else:
            update: dict[str, Any] = {
                "work_order_id": rng.choice(work_orders),
                "kind": rng.choice(KINDS),
                "quantity": rng.randint(1, max_quantity),
                "request_id": f"{prefix}:{i}",
                "context": {"barcode": f"BC-{prefix}-{i}", "source": source},
            }
            if roll < dup_share + bad_share:
                update.update(rng.choice(MALFORMED))
            sent.append(update)
            yield dict(update)
        i += 1


def plan(
    count: int, work_orders: Sequence[str], prefix: str, seed: int, **options: Any
) -> list[dict[str, Any]]:
    """The first ``count`` of ``scans`` for this seed: the same plan every time."""
    return list(islice(scans(random.Random(seed), work_orders, prefix, **options), count))
