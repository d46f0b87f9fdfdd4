"""Producer processes for the end-to-end tests (imported by spawned children, so no conftest)."""

from __future__ import annotations

from typing import Any

from devtools.load import plan as load_plan
from mes_tasks.send.producer import submit_quantity_update


def plan(producers: int, updates: int, work_orders: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """``updates`` updates over ``work_orders`` work orders, dealt round-robin to producers."""
    ids = [f"WO-{n:03d}" for n in range(work_orders)]
    every = load_plan(updates, ids, "load", seed)
    return [every[p::producers] for p in range(producers)]


def send(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [submit_quantity_update(**update) for update in batch]
