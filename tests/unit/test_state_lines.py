"""lb.control.state_lines: a flapping backend's state changes are counted past a bucket of lines, and said."""

from __future__ import annotations

from lb.control.state_lines import STATE_LINES_AT_ONCE, STATE_LINES_PER_SECOND, StateLines

KEY = ("gateways", "gw-1")


def test_a_backend_s_changes_get_lines_up_to_its_bucket_then_are_counted_and_said_with_the_next() -> None:
    lines = StateLines()
    taken = [lines.take(KEY, 100.0 + i * 0.25) for i in range(20)]  # a change at every probe, 250 ms apart
    assert taken[: int(STATE_LINES_AT_ONCE)] == [0] * int(STATE_LINES_AT_ONCE)
    assert all(t is None for t in taken[int(STATE_LINES_AT_ONCE):])
    assert lines.take(("gateways", "gw-2"), 105.0) == 0, "another backend has a bucket of its own"
    # A line refills every 1 / STATE_LINES_PER_SECOND seconds: the next change then says what was counted.
    later = 105.0 + 1 / STATE_LINES_PER_SECOND
    assert lines.take(KEY, later) == 20 - int(STATE_LINES_AT_ONCE)


def test_counted_changes_are_said_once_the_bucket_allows_even_without_another_change() -> None:
    lines = StateLines()
    for i in range(12):  # 10 ms apart: the bucket refills next to nothing meanwhile
        lines.take(KEY, 10.0 + i * 0.01)
    assert lines.due(10.2) == [], "the bucket is empty"
    refilled = 10.11 + 1 / STATE_LINES_PER_SECOND + 0.1
    assert lines.due(refilled) == [(KEY, 12 - int(STATE_LINES_AT_ONCE))]
    assert lines.due(refilled + 1) == [], "said once"


def test_a_backend_quiet_long_enough_is_forgotten() -> None:
    lines = StateLines()
    lines.take(KEY, 0.0)
    lines.due(1.0)
    assert KEY in lines._backends
    lines.due(1.0 + STATE_LINES_AT_ONCE / STATE_LINES_PER_SECOND + 1)
    assert KEY not in lines._backends
