"""SIGTERM's 1001 closes are spread evenly over shutdown_grace (SPEC part 2), never all at once."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.control.tunnel_closing import close_schedule


def test_six_tunnels_over_a_1_5s_grace() -> None:
    assert close_schedule(6, 1.5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])


def test_a_lone_tunnel_gets_its_1001_when_the_grace_ends() -> None:
    """SPEC part 1: SIGTERM closes tunnels with 1001 *after* shutdown_grace; not at once."""
    assert close_schedule(1, 10.0) == [10.0]


def test_no_tunnels_no_schedule() -> None:
    assert close_schedule(0, 10.0) == []


@given(count=st.integers(1, 100_000), grace=st.floats(0.001, 3600))
def test_evenly_spaced_within_the_grace(count: int, grace: float) -> None:
    """Equal gaps of grace/count, the first a step in, the last at the grace's end."""
    schedule = close_schedule(count, grace)
    assert len(schedule) == count and schedule[0] == pytest.approx(grace / count)
    assert schedule[-1] == pytest.approx(grace)
    if count > 1:
        gap = grace / count
        assert schedule[1] - schedule[0] == pytest.approx(gap)
        assert schedule[-1] - schedule[-2] == pytest.approx(gap, rel=1e-6)


def test_workers_schedules_interleave() -> None:
    # workers: 2, 10 tunnels each over 4 s: worker 0 closes half a step into each step, worker 1 at
    # its end, so the two never close a tunnel at the same moment (they did at every step: clients in
    # pairs), and neither closes one at once.
    first = close_schedule(10, 4.0, phase=1 / 2)
    second = close_schedule(10, 4.0, phase=2 / 2)
    merged = sorted(first + second)
    assert min(b - a for a, b in itertools.pairwise(merged)) == pytest.approx(0.2)
    assert min(merged) == pytest.approx(0.2) and max(merged) == pytest.approx(4.0)
