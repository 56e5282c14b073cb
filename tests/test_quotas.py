"""Queue tree validation and weighted water-filling fair share (SCHEDULING.md, Queues and Fair share)."""

from __future__ import annotations

import pytest

from quotas import PoolShares, QueueSpec, QuotaError, fair_shares
from tests.factories import queue, queue_tree


def test_guarantees_first_then_weights() -> None:
    t = queue_tree(
        queue("a", quota={"a100": 8}, weight=1), queue("b", quota={"a100": 8}, weight=3), queue("c", weight=1)
    )
    shares = fair_shares(t, "a100", 32, {"a": 24, "b": 24, "c": 8})
    assert shares == pytest.approx({"a": 11.2, "b": 17.6, "c": 3.2})


def test_capped_child_gives_rest_to_others() -> None:
    t = queue_tree(queue("a", weight=1), queue("b", weight=3, limit={"a100": 4}), queue("c", weight=1))
    shares = fair_shares(t, "a100", 32, {"a": 100, "b": 100, "c": 2})
    assert shares == pytest.approx({"a": 26, "b": 4, "c": 2})
    assert sum(shares.values()) == pytest.approx(32)


def test_lost_capacity_scales_guarantees() -> None:
    t = queue_tree(queue("a", quota={"a100": 16}), queue("b", quota={"a100": 16}))
    assert fair_shares(t, "a100", 8, {"a": 16, "b": 16}) == pytest.approx({"a": 4, "b": 4})


def test_hierarchy_and_demand() -> None:
    t = queue_tree(
        queue("ml", quota={"a100": 16}),
        queue("cv", quota={"a100": 16}, limit={"a100": 20}),
        queue("a", "ml", quota={"a100": 8}),
        queue("b", "ml", quota={"a100": 8}),
        queue("c", "cv", quota={"a100": 16}),
    )
    ps = PoolShares(t, "a100", 32)
    ps.add_demand("a", 40)
    ps.add_demand("c", 30)
    assert ps.demand == {"a": 40, "b": 0, "ml": 40, "c": 30, "cv": 20}
    shares = fair_shares(t, "a100", 32, {"a": 40, "c": 30})
    assert shares["ml"] == pytest.approx(16) and shares["cv"] == pytest.approx(16)
    assert shares["a"] == pytest.approx(16) and shares["b"] == 0
    # No demand, no share: idle guarantees are lent, not kept.
    assert fair_shares(t, "a100", 32, {"a": 40})["a"] == pytest.approx(32)


def test_equal_children_get_bit_identical_shares_whatever_the_history() -> None:
    """Two queues of equal weight and demand tie on ratio exactly (the spec then orders them by name): their shares
    are equal to the last bit, both from scratch and after incremental updates that could not move them (12.8 GPUs
    split 3:3 was 6.4000000000000001 and 6.3999999999999995, by which child was filled first)."""
    t = queue_tree(
        queue("q0", weight=2),
        queue("q0b", "q0", weight=3),
        queue("q0c", "q0", weight=3),
        queue("q1", weight=0.5),
        gpus=16,
    )
    fresh = fair_shares(t, "a100", 16, {"q0b": 9, "q0c": 9, "q1": 9})
    assert fresh["q0b"] == fresh["q0c"]
    ps = PoolShares(t, "a100", 16)
    for leaf, d in [("q0c", 12), ("q1", 9), ("q0b", 6)]:
        ps.add_demand(leaf, d)
        ps.shares()
    for leaf, d in [("q0c", -3), ("q0b", 3)]:  # both stay over their share: no split runs again
        ps.add_demand(leaf, d)
    assert ps.shares() == fresh


def test_zero_weights_get_what_weighted_children_leave() -> None:
    t = queue_tree(queue("a", weight=0), queue("b", weight=1, limit={"a100": 8}))
    assert fair_shares(t, "a100", 32, {"a": 100, "b": 100}) == pytest.approx({"a": 24, "b": 8})
    assert fair_shares(t, "a100", 32, {"a": 100, "b": 4}) == pytest.approx({"a": 28, "b": 4})
    t = queue_tree(queue("a", weight=0), queue("b", weight=0))
    assert fair_shares(t, "a100", 32, {"a": 100, "b": 100}) == pytest.approx({"a": 16, "b": 16})


def test_per_pool_weights() -> None:
    t = queue_tree(queue("a", weight={"l4": 3}), queue("b"), gpus={"a100": 8, "l4": 8})
    assert fair_shares(t, "l4", 8, {"a": 8, "b": 8}) == pytest.approx({"a": 6, "b": 2})
    assert fair_shares(t, "a100", 8, {"a": 8, "b": 8}) == pytest.approx({"a": 4, "b": 4})


@pytest.mark.parametrize(
    "specs, needle",
    [
        ([queue("a", quota={"a100": 20}), queue("b", quota={"a100": 20})], "top-level quotas add up to 40"),
        (
            [queue("d", quota={"a100": 8}), queue("a", "d", quota={"a100": 6}), queue("b", "d", quota={"a100": 6})],
            "children's quotas add up to 12 GPUs (a=6, b=6), more than d's quota of 8",
        ),
        ([queue("a", quota={"h100": 1})], "pool 'h100' does not exist"),
        ([queue("a"), queue("a")], "declared twice"),
        ([queue("a", "ghost")], "parent queue 'ghost' does not exist"),
        ([queue("a", "b"), queue("b", "a")], "cycle"),
        ([queue("a", quota={"a100": -1})], "whole number of GPUs >= 0"),
        ([queue("a", weight=-2)], "must be a number >= 0"),
        ([queue("a", quota={"a100": 8}, limit={"a100": 4})], "limit 4 is below the queue's quota 8"),
    ],
)
def test_invalid_trees_are_rejected_with_where_and_what(specs: list[QueueSpec], needle: str) -> None:
    with pytest.raises(QuotaError) as err:
        queue_tree(*specs)
    assert needle in str(err.value)
    assert err.value.problems


def test_branch_is_highest_ancestor_not_shared() -> None:
    t = queue_tree(
        queue("ml", quota={"a100": 16}),
        queue("cv", quota={"a100": 16}),
        queue("a", "ml"),
        queue("b", "ml"),
        queue("c", "cv"),
    )
    assert t.branch(t["a"], t["c"]).name == "ml"
    assert t.branch(t["a"], t["b"]).name == "a"
