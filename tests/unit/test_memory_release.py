"""When the balancer gives freed heap back to the system (lb.control.memory): after a burst, not per connection."""

from __future__ import annotations

import ctypes
import gc
import platform
import time

import pytest

from lb.control.memory import ReleasePolicy, collection_paused, release_free_memory


def test_nothing_to_release_while_connections_hold_steady() -> None:
    policy = ReleasePolicy(min_drop=256, min_gap=5.0, every=300.0)
    assert [policy.due(1_000, float(t)) for t in range(0, 200)] == [False] * 200


def test_a_burst_that_ends_is_released_once() -> None:
    """1,000 connections come and go: one release once they have fallen by min_drop, and not again."""
    policy = ReleasePolicy(min_drop=256, min_gap=5.0, every=300.0)
    assert not policy.due(0, 0.0)
    assert not policy.due(1_000, 10.0)
    assert not policy.due(900, 11.0), "100 fewer: too little to be worth a release"
    assert policy.due(10, 12.0)
    assert [policy.due(10, 13.0 + t) for t in range(50)] == [False] * 50


def test_releases_after_drops_are_at_least_min_gap_apart() -> None:
    """A storm in waves: the drop right after a release waits out min_gap, then is released."""
    policy = ReleasePolicy(min_drop=256, min_gap=5.0, every=300.0)
    policy.due(1_000, 0.0)
    assert policy.due(0, 6.0)
    policy.due(1_000, 7.0)
    assert not policy.due(0, 8.0), "2 s after the last release"
    assert policy.due(0, 11.0)


def test_slow_churn_is_released_now_and_then() -> None:
    """No drop ever reaches min_drop, but holes build up: a release every `every` seconds."""
    policy = ReleasePolicy(min_drop=256, min_gap=5.0, every=300.0)
    due = [t for t in range(0, 1_000) if policy.due(100 + t % 7, float(t))]
    assert due == [300, 600, 900]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_can_release() -> None:
    assert hasattr(ctypes.CDLL(None), "malloc_trim")
    assert release_free_memory() is True


def test_collection_is_paused_over_the_block_and_left_as_it_was_found() -> None:
    """A reload's parse runs without cyclic collection; after it, collection is as the process had it."""
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        assert not gc.isenabled()
        raise RuntimeError("a parse that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "a caller that runs without collection keeps it off"
    finally:
        gc.enable()


def test_collection_resumes_when_the_block_outlasts_its_limit() -> None:
    """The whole process pauses, so a parse that runs long (a huge file) gets collection back."""
    with collection_paused(limit=0.05):
        assert not gc.isenabled()
        deadline = time.monotonic() + 5
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled(), "collection came back on after the limit, the block still running"
    assert gc.isenabled()


def test_a_block_that_ends_in_time_leaves_no_timer_to_fire_later() -> None:
    """The timer is cancelled at the block's end: it cannot turn on a collection someone disabled since."""
    with collection_paused(limit=0.05):
        pass
    gc.disable()
    try:
        time.sleep(0.15)
        assert not gc.isenabled()
    finally:
        gc.enable()
