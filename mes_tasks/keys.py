"""Every Redis key mes_tasks writes, built from one prefix (``MES_KEY_PREFIX``, default ``mes:``).

Key patterns:

    {prefix}lock:{work_order_id}   string, the owner token of the work-order lock; PX = lock TTL
    {prefix}wanted:{work_order_id} string, set (PX 1 s) by a holder waiting for that lock; the
                                   worker keeping it releases it after its current update
    {prefix}lease:owner            string, the process id (``locks.owner_id``) of the last
                                   active ``workorder`` consumer; no TTL
    {prefix}lease:workorder        string, the owner token of the active ``workorder`` consumer;
                                   PX = lease TTL (see ``mes_tasks.worker.lease``)
    {prefix}pause:workorder        string, JSON ``{"at": ...}`` while ``queue pause`` is in force;
                                   every ``workorder`` worker honours it at start, take-over
                                   and every tick; ``queue resume`` deletes it; no TTL
    {prefix}lease:workorder.{i}    with MES_PARTITIONS > 1: the lease of partition i (and of a
    {prefix}lease:workorder.{i}:owner  leftover queue), its last holder's process id, and
    {prefix}pause:workorder.{i}    its own pause (``pause:workorder`` pauses them all)
    {prefix}members:workorder      hash, owner id -> JSON ``{"until": epoch ms its membership
                                   expires, "n": its MES_PARTITIONS, "pinned": [queues]}``
                                   (a bare epoch ms from an older release): every worker's
                                   shared view of the queues (``sharing``)
    {prefix}handed:workorder       hash, kombu delivery tag -> JSON ``[queue, owner id, delivered
                                   at]``: a message (a retry on its countdown) that a worker still
                                   held of a partition it handed over; restored by that worker once
                                   it no longer holds it, or by the partition's holder once that
                                   worker is dead; no TTL (see ``mes_tasks.worker.handover``)
    {prefix}sessions               hash, ``<owner_id>|<lsid hex>`` -> epoch seconds: the MongoDB
                                   sessions a ``workorder`` worker runs transactions in; its
                                   successor ends them (``killSessions``, see ``sessions``)
    {prefix}negwait:{request_id}   string, epoch seconds of the first time the update would have
                                   taken a counter below zero; EX = 2 x MES_NEGATIVE_WAIT_S
    {prefix}sent                   sorted set, request id -> epoch seconds it was sent: added by
                                   ``submit_quantity_update(s)`` (and so the gateway) once the
                                   broker took an update whose request id the caller gave, trimmed
                                   to the last ``SENT_MARK_S`` (600 s) at each addition; EX = 600 s.
                                   The gateway looks a request id up in the log only when it is
                                   in it. One key, so that no scan of the keyspace grows with it
    {prefix}stats:unrecorded       string, submissions queued without an outbox record
                                   (MongoDB down at the producer)
    {prefix}stats:apply_ms         string, moving average of one update's duration (ms), for
                                   the producer's ``estimated_delay_ms``
    {prefix}stats:updates          hash, the worker's outcome counters: ``applied``,
                                   ``duplicate``, ``retried:<CODE>``, ``dead_lettered:<CODE>``;
                                   read by ``metrics``; no TTL
    {prefix}stats:lease_takeovers  string, how many times a worker took the workorder lease
    {prefix}stats:apply_ms_hist    hash, the duration of each applied or duplicate update: one
                                   field per histogram bucket (its upper bound in ms, or
                                   ``+Inf``) -> updates in that bucket, and ``sum`` -> total ms;
                                   read by ``metrics``; no TTL
    {prefix}deployment:started     string, epoch seconds of the first worker start (SET NX at
                                   every start, so the first stays): the deployment's age, for
                                   ``doctor``'s "no audit yet" on a new stack; no TTL

The Celery broker's own keys (queue lists such as ``workorder``, ``unacked``,
``unacked_index``, ``_kombu.binding.*``) live in the same Redis database, which
is mes_tasks's own (``REDIS_URL``'s database number, 3 by default).
"""

from __future__ import annotations

from mes_tasks.names import WORKORDER_QUEUE


def lock_key(prefix: str, work_order_id: str) -> str:
    return f"{prefix}lock:{work_order_id}"


def wanted_key(prefix: str, work_order_id: str) -> str:
    return f"{prefix}wanted:{work_order_id}"


def lease_owner_key(prefix: str, queue: str = WORKORDER_QUEUE) -> str:
    """``lease:owner`` for ``workorder``; ``lease:workorder.{i}:owner`` for a partition."""
    return f"{prefix}lease:owner" if queue == WORKORDER_QUEUE else f"{prefix}lease:{queue}:owner"


def handed_key(prefix: str) -> str:
    return f"{prefix}handed:{WORKORDER_QUEUE}"


def apply_ms_key(prefix: str) -> str:
    return f"{prefix}stats:apply_ms"


def take_key(prefix: str, nonce: str) -> str:
    """The delivery tags one group took from its queue, until they are acknowledged (``worker.waiting``)."""
    return f"{prefix}group:take:{nonce}"


def pause_key(prefix: str, queue: str = WORKORDER_QUEUE) -> str:
    """``pause:workorder`` pauses every workorder queue; ``pause:workorder.{i}`` one partition."""
    return f"{prefix}pause:{queue}"


def sessions_key(prefix: str) -> str:
    return f"{prefix}sessions"


def negative_wait_key(prefix: str, request_id: str) -> str:
    return f"{prefix}negwait:{request_id}"


def sent_key(prefix: str) -> str:
    return f"{prefix}sent"


def unrecorded_key(prefix: str) -> str:
    return f"{prefix}stats:unrecorded"


def lease_key(prefix: str, queue: str = WORKORDER_QUEUE) -> str:
    return f"{prefix}lease:{queue}"


def members_key(prefix: str) -> str:
    return f"{prefix}members:workorder"


def update_counts_key(prefix: str) -> str:
    return f"{prefix}stats:updates"


def apply_histogram_key(prefix: str) -> str:
    return f"{prefix}stats:apply_ms_hist"


def http_counts_key(prefix: str) -> str:
    return f"{prefix}stats:http"


def http_histogram_key(prefix: str) -> str:
    return f"{prefix}stats:http_ms_hist"


def takeovers_key(prefix: str) -> str:
    return f"{prefix}stats:lease_takeovers"


def first_start_key(prefix: str) -> str:
    return f"{prefix}deployment:started"
