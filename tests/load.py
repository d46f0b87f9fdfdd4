"""Producer processes for the end-to-end tests (imported by spawned children, so no conftest)."""

from __future__ import annotations

import random
from typing import Any

from mes_tasks.producer import submit_quantity_update


def plan(producers: int, updates: int, work_orders: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """``updates`` updates over ``work_orders`` work orders, dealt round-robin to producers."""
    rng = random.Random(seed)
    batches: list[list[dict[str, Any]]] = [[] for _ in range(producers)]
    for i in range(updates):
        batches[i % producers].append(
            {
                "work_order_id": f"WO-{rng.randrange(work_orders):03d}",
                "kind": rng.choice(["input", "output"]),
                "quantity": rng.randint(1, 9),
                "request_id": f"load:{i}",
                "context": {"barcode": f"BC{i}", "source": "TEST"},
            }
        )
    return batches


def send(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [submit_quantity_update(**update) for update in batch]
