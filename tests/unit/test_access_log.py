"""Access log: 429s are summarised, not logged one by one (issue 8)."""

from __future__ import annotations

import logging

import pytest

from lb.access_log import RateLimitSummary


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lb.access"]


def test_a_flood_of_429s_is_one_line_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """The first 429 is logged; the next ones are counted and reported once the interval has passed."""
    summary = RateLimitSummary(interval=10.0)
    with caplog.at_level(logging.INFO, logger="lb.access"):
        summary.note("198.51.100.1", 100.0, "r1")
        for i in range(500):
            summary.note("198.51.100.1" if i % 5 else "198.51.100.2", 100.0 + i / 100, f"r{i + 2}")
        assert len(lines(caplog)) == 1
        assert "status=429" in lines(caplog)[0]
        summary.note("198.51.100.3", 111.0, "last")
    logged = lines(caplog)
    assert len(logged) == 3
    assert "event=rate_limited count=500 addresses=2 top_client=198.51.100.1 top_count=400" in logged[1]
    assert "request_id=last" in logged[2]


def test_addresses_remembered_are_bounded() -> None:
    """A flood from many addresses counts them all but remembers at most MAX_ADDRESSES."""
    summary = RateLimitSummary(interval=1e9)
    summary.note("first", 0.0, "r")
    for i in range(5 * RateLimitSummary.MAX_ADDRESSES):
        summary.note(f"10.0.{i // 256}.{i % 256}", 1.0, "r")
    assert summary._count == 5 * RateLimitSummary.MAX_ADDRESSES
    assert len(summary._addresses) == RateLimitSummary.MAX_ADDRESSES
