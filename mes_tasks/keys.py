"""Every Redis key mes_tasks writes, built from one prefix (``MES_KEY_PREFIX``, default ``mes:``).

Key patterns:

    {prefix}lock:{work_order_id}   string, the owner token of the work-order lock; PX = lock TTL
    {prefix}wanted:{work_order_id} string, set (PX 1 s) by a holder waiting for that lock; the
                                   worker keeping it releases it after its current update
    {prefix}lease:owner            string, the process id (``locks.owner_id``) of the last
                                   active ``workorder`` consumer; no TTL
    {prefix}lease:workorder        string, the owner token of the active ``workorder`` consumer;
                                   PX = lease TTL (see ``mes_tasks.lease``)
    {prefix}paused:workorder       set, names of workers whose ``workorder`` consumer
                                   ``queue pause`` cancelled (``queue resume`` restores them)
    {prefix}stats:apply_ms         string, moving average of one update's duration (ms), for
                                   the producer's ``estimated_delay_ms``

The Celery broker's own keys (queue lists such as ``workorder``, ``unacked``,
``unacked_index``, ``_kombu.binding.*``) live in the same Redis database, which
is mes_tasks's own (``REDIS_URL``'s database number, 3 by default).
"""

from __future__ import annotations


def lock_key(prefix: str, work_order_id: str) -> str:
    return f"{prefix}lock:{work_order_id}"


def wanted_key(prefix: str, work_order_id: str) -> str:
    return f"{prefix}wanted:{work_order_id}"


def lease_owner_key(prefix: str) -> str:
    return f"{prefix}lease:owner"


def apply_ms_key(prefix: str) -> str:
    return f"{prefix}stats:apply_ms"


def paused_key(prefix: str) -> str:
    return f"{prefix}paused:workorder"


def lease_key(prefix: str) -> str:
    return f"{prefix}lease:workorder"
