"""The lease step's parts, each on its own, against the test Redis: the share, a hand-over."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import redis
from kombu import Connection

from mes_tasks.apply.owners import owner_id
from mes_tasks.keys import handed_key, lease_key, lease_owner_key
from mes_tasks.settings import Settings
from mes_tasks.worker.handover import HandOver, handed_entries
from mes_tasks.worker.lease import Slots
from mes_tasks.worker.sharing import ORPHAN_GRACE_S, Roster, Seen, Share, View

PREFIX = "mes:"
ELSEWHERE = "elsewhere:1:abc123"  # a live worker on another host


def _dead_owner() -> str:
    """The owner id of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:dead00"


def test_the_share_counts_a_lease_whose_holder_ended_on_this_host_as_free(redis_client: redis.Redis) -> None:
    redis_client.set(lease_key(PREFIX, "workorder.0"), f"{_dead_owner()}/token", px=60_000)
    redis_client.set(lease_key(PREFIX, "workorder.1"), f"{ELSEWHERE}/token", px=60_000)
    seen = Share(Roster(redis_client, PREFIX), ttl_s=3.0, partitions=2).look(tick=1)
    assert seen.view.queues == ("workorder.0", "workorder.1") and seen.view.automatic == (owner_id(),)
    assert seen.holders == {"workorder.0": None, "workorder.1": ELSEWHERE}


def test_a_free_queue_with_messages_waiting_is_taken_above_share_only_once_it_had_no_holder_for_the_grace(
    redis_client: redis.Redis,
) -> None:
    me, queues = owner_id(), ("workorder.0", "workorder.1", "workorder.2")
    holders: dict[str, str | None] = {"workorder.0": me, "workorder.1": ELSEWHERE, "workorder.2": None}
    seen = Seen(View(queues, share=1, automatic=(me, ELSEWHERE)), holders, waiting={"workorder.2"})
    share = Share(Roster(redis_client, PREFIX), ttl_s=3.0, partitions=3)
    assert share.moves(seen, held=["workorder.0"]).take == []  # both at their share: not yet
    share.free_since["workorder.2"] -= ORPHAN_GRACE_S  # first seen free a grace ago
    assert share.moves(seen, held=["workorder.0"]).take == ["workorder.2"]


class _Consumer:
    """What a hand-over asks of Celery's consumer: its broker connection and queues."""

    def __init__(self, connection: Any, *queues: str) -> None:
        self.connection = connection
        self.task_consumer = SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues])
        self.cancelled: list[str] = []

    def cancel_task_queue(self, queue: str) -> None:
        self.cancelled.append(queue)


def test_a_hand_over_notes_the_retry_still_held_which_is_restored_once_its_worker_no_longer_holds_it(
    redis_client: redis.Redis, settings: Settings
) -> None:
    slot = Slots(redis_client, PREFIX, 3.0)["workorder.1"]
    assert slot.lease.try_acquire()
    slot.active = True
    redis_client.set(lease_owner_key(PREFIX, "workorder.1"), owner_id())
    hand_over = HandOver(redis_client, PREFIX)
    with Connection(settings.redis_transport_url) as conn:
        channel = conn.default_channel
        channel.queue_declare("workorder.1")
        channel.basic_publish(channel.prepare_message("x"), exchange="", routing_key="workorder.1")
        tag = channel.basic_get("workorder.1", no_ack=False).delivery_tag  # a retry on its countdown
        consumer = _Consumer(conn, "workorder.1")
        hand_over.give(consumer, slot)
        assert consumer.cancelled == ["workorder.1"] and not slot.active
        assert redis_client.get(lease_key(PREFIX, "workorder.1")) is None
        assert redis_client.get(lease_owner_key(PREFIX, "workorder.1")) is None  # a hand-over, not a death
        assert [(t, e.queue, e.holder) for t, e in handed_entries(redis_client, PREFIX).items()] == [
            (tag, "workorder.1", owner_id())
        ]
        hand_over.restore_due(consumer, held=[])
        assert redis_client.llen("workorder.1") == 0  # still held here
        channel.qos.restore_at_shutdown = False  # its connection is lost
    with Connection(settings.redis_transport_url) as conn:
        hand_over.restore_due(_Consumer(conn), held=[])
    assert redis_client.llen("workorder.1") == 1 and redis_client.hlen(handed_key(PREFIX)) == 0
