"""Partitions of the ``workorder`` queue: per-work-order serial, across-work-order parallel.

``MES_PARTITIONS=N`` (default 1). With N = 1 there is one queue, ``workorder``, exactly
as without partitions. With N > 1 an update goes to ``workorder.{i}`` where

    i = partition_of(work_order_id, N) = CRC-32 (zlib, IEEE) of the id's UTF-8 bytes mod N

which is stable across processes, machines and languages (never Python's ``hash()``), so
the updates of one work order stay in one partition, in order. Each partition has one
active consumer under its own lease (see ``lease``).

While N changes, a work order's updates may sit in two partitions and be applied by two
workers in either order; its lock, its fencing epoch and the request id keep every count
exact. The queues outside the current N (``workorder`` itself, or ``workorder.{i}`` for
i >= N) are *leftovers*: workers drain them too, until they are empty.
"""

from __future__ import annotations

import zlib

from mes_tasks.names import WORKORDER_QUEUE

SEP = "."
MAX_PARTITIONS = 64  # the largest MES_PARTITIONS: each one a queue, a lease and a consumer to watch


def partition_of(work_order_id: str, partitions: int) -> int:
    """The partition of a work order: CRC-32 of its UTF-8 bytes, modulo ``partitions``."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return zlib.crc32(work_order_id.encode("utf-8")) % partitions


def queue_of(index: int) -> str:
    return f"{WORKORDER_QUEUE}{SEP}{index}"


def queue_names(partitions: int) -> list[str]:
    """The workorder queues for ``partitions``: ``["workorder"]`` for 1."""
    return [WORKORDER_QUEUE] if partitions == 1 else [queue_of(i) for i in range(partitions)]


def queue_for(work_order_id: str, partitions: int) -> str:
    """The queue an update of ``work_order_id`` goes to."""
    return WORKORDER_QUEUE if partitions == 1 else queue_of(partition_of(work_order_id, partitions))


def every_queue() -> list[str]:
    """Every name a workorder queue can have, whatever N was: where leftovers may wait."""
    return [WORKORDER_QUEUE, *(queue_of(i) for i in range(MAX_PARTITIONS))]


def is_workorder_queue(name: str) -> bool:
    """``workorder`` or ``workorder.{i}``."""
    if name == WORKORDER_QUEUE:
        return True
    base, sep, index = name.partition(SEP)
    return base == WORKORDER_QUEUE and sep == SEP and index.isdigit() and int(index) < MAX_PARTITIONS


def index_of(name: str) -> int | None:
    """The partition number of ``workorder.{i}``; None for ``workorder`` itself."""
    return int(name.partition(SEP)[2]) if name != WORKORDER_QUEUE and is_workorder_queue(name) else None
