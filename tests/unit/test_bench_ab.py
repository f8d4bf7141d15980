"""bench.ab: two trees compared by the median of per-round ratios (not the ratio of medians)."""

from __future__ import annotations

from bench.ab import paired_ratios


def test_ratios_are_taken_within_each_round_then_their_median() -> None:
    # The machine got twice as fast in round 3: both targets moved, the ratio did not.
    costs = {"new": [90.0, 180.0, 45.0], "old": [100.0, 200.0, 50.0], "haproxy": [40.0, 80.0, 20.0]}
    assert paired_ratios(costs, "new", "old") == 0.9
    assert paired_ratios(costs, "old", "haproxy") == 2.5


def test_a_round_a_target_missed_is_left_out_and_nothing_measured_is_none() -> None:
    costs = {"new": [90.0, 0.0, 100.0], "old": [100.0, 200.0, 100.0], "floor": []}
    assert paired_ratios(costs, "new", "old") == 0.95
    assert paired_ratios(costs, "new", "floor") is None
    assert paired_ratios(costs, "new", "haproxy") is None
