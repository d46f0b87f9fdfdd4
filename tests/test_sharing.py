"""Partition sharing: every worker derives one view, whatever its own MES_PARTITIONS."""

from __future__ import annotations

from mes_tasks.worker.sharing import Member, decode, plan, ring, view_of

UNTIL = 10**13
Q = [f"workorder.{i}" for i in range(4)]


def member(owner: str, n: int | None, *pinned: str) -> Member:
    return Member(owner, UNTIL, n, tuple(pinned))


def test_a_mixed_fleet_shares_the_union_of_its_members_queues() -> None:
    view = view_of([member("b", 2), member("a", 4)], busy=[])
    assert view.queues == tuple(Q) and view.share == 2 and view.automatic == ("a", "b")


def test_a_worker_joining_on_a_larger_n_takes_the_new_queues_and_the_old_holder_keeps_its_own() -> None:
    view = view_of([member("b", 2), member("a", 4)], busy=["workorder.1"])
    holders = {"workorder.0": "b", "workorder.1": "b", "workorder.2": None, "workorder.3": None}
    b = plan(view, "b", holders, set(), ring(view.queues, "b", ["workorder.0", "workorder.1"]))
    assert b.give is None and b.take == []
    a = plan(view, "a", holders, set(), ring(view.queues, "a", []))
    assert sorted(a.take) == ["workorder.2", "workorder.3"]


def test_a_worker_joining_on_a_smaller_n_gets_half_while_the_old_n_still_has_a_member() -> None:
    view = view_of([member("b", 4), member("a", 2)], busy=[])
    holders: dict[str, str | None] = dict.fromkeys(Q, "b")
    b = plan(view, "b", holders, set(), ring(view.queues, "b", Q))
    assert b.give is not None and b.take == []
    holders[b.give] = None
    a = plan(view, "a", holders, set(), ring(view.queues, "a", []))
    assert a.take == [b.give]


def test_nobody_hands_over_when_no_other_worker_is_below_its_share() -> None:
    view = view_of([member("b", 4), member("a", 4)], busy=[])
    holders = {"workorder.0": "b", "workorder.1": "b", "workorder.2": "b", "workorder.3": "a"}
    view_one_member = view_of([member("b", 4)], busy=[])
    assert plan(view_one_member, "b", holders, set(), Q).give is None
    assert plan(view, "b", holders, set(), Q).give == "workorder.2"  # a holds 1 < share 2
    holders["workorder.2"] = "a"
    assert plan(view, "b", holders, set(), Q).give is None


def test_a_pinned_workers_queue_leaves_the_view_of_the_automatic_ones() -> None:
    view = view_of([member("a", 4), member("p", 4, "workorder.3")], busy=["workorder.3"])
    assert view.queues == tuple(Q[:3]) and view.automatic == ("a",) and view.share == 3


def test_a_busy_leftover_of_no_members_n_is_shared_and_an_empty_one_is_not() -> None:
    assert view_of([member("a", 2)], busy=["workorder.3", "workorder"]).queues == (
        "workorder",
        "workorder.0",
        "workorder.1",
        "workorder.3",
    )
    assert view_of([member("a", 2)], busy=[]).queues == ("workorder.0", "workorder.1")


def test_an_orphaned_queue_with_messages_is_taken_even_above_share() -> None:
    view = view_of([member("a", 2), member("b", 2)], busy=[])
    holders = {"workorder.0": "a", "workorder.1": None}
    assert plan(view, "a", holders, set(), view.queues).take == []
    assert plan(view, "a", holders, {"workorder.1"}, view.queues).take == ["workorder.1"]


def test_one_partition_keeps_one_active_worker_and_standbys() -> None:
    view = view_of([member("a", 1), member("b", 1)], busy=[])
    assert view.queues == ("workorder",) and view.share == 1
    assert plan(view, "b", {"workorder": "a"}, set(), view.queues).take == []
    assert plan(view, "b", {"workorder": None}, set(), view.queues).take == ["workorder"]


def test_members_entries_round_trip_and_an_older_bare_expiry_still_counts() -> None:
    m = member("a", 4, "workorder.2")
    assert decode("a", m.encode()) == m
    assert decode("x", "1700000000000") == Member("x", 1700000000000)
    assert decode("x", "not json") is None
    assert decode("x", '{"until": 5, "pinned": ["nope"], "n": 0}') == Member("x", 5)
