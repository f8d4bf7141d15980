"""SIGTERM's 1001 closes are spread evenly over shutdown_grace (SPEC part 2), never all at once."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.control.balancer import close_schedule


def test_six_tunnels_over_a_1_5s_grace() -> None:
    assert close_schedule(6, 1.5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25])


def test_no_tunnels_no_schedule() -> None:
    assert close_schedule(0, 10.0) == []


@given(count=st.integers(1, 100_000), grace=st.floats(0.001, 3600))
def test_evenly_spaced_within_the_grace(count: int, grace: float) -> None:
    """Equal gaps of grace/count, all inside [0, grace)."""
    schedule = close_schedule(count, grace)
    assert len(schedule) == count and schedule[0] == 0.0 and schedule[-1] < grace
    if count > 1:
        gap = grace / count
        assert schedule[1] - schedule[0] == pytest.approx(gap)
        assert schedule[-1] - schedule[-2] == pytest.approx(gap, rel=1e-6)


def test_workers_schedules_interleave() -> None:
    # workers: 2, 10 tunnels each over 4 s: worker 1 starts half a step after worker 0, so the
    # two never close a tunnel at the same moment (they did at every step: clients in pairs).
    first = close_schedule(10, 4.0, phase=0 / 2)
    second = close_schedule(10, 4.0, phase=1 / 2)
    merged = sorted(first + second)
    assert min(b - a for a, b in itertools.pairwise(merged)) == pytest.approx(0.2)
    assert max(second) < 4.0
