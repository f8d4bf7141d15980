"""lb.proxy.deadlines: deadlines of many connections on a few shared loop timers.

A recording loop stands in for the event loop: its timers run when a test says so, so each test
decides whether a loop timer fires on time or early.  Times are the real monotonic clock's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from lb.proxy.deadlines import GRAIN, STALLED, Deadlines


class _RecordingLoop:
    """call_later that keeps (delay, callback, args) for the test to run; call_soon's callbacks run
    after the timers fire_all fires (`soon` holds them until then)."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[..., object], tuple[Any, ...]]] = []
        self.soon: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> None:
        self.timers.append((delay, callback, args))

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self.soon.append((callback, args))

    def run_soon_once(self) -> None:
        """One turn's worth of call_soon callbacks (those they queue wait for the next)."""
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)

    def fire_all(self) -> None:
        timers, self.timers = self.timers, []
        for _delay, callback, args in timers:
            callback(*args)
        for _ in range(10):
            if not self.soon:
                break
            self.run_soon_once()


def _wheel() -> tuple[Deadlines, _RecordingLoop]:
    loop = _RecordingLoop()
    return Deadlines(loop), loop  # type: ignore[arg-type]


def test_deadlines_in_one_grain_share_one_loop_timer_that_fires_at_its_end() -> None:
    deadlines, loop = _wheel()
    reached: list[int] = []
    now = time.monotonic()
    # Three deadlines in the slice that ends at the next multiple of GRAIN after `now`, or the one after.
    slice_end = (int(now / GRAIN) + 2) * GRAIN
    for number in range(3):
        deadlines.call_later(slice_end - GRAIN / 2 + number * GRAIN / 8 - now, lambda n=number: reached.append(n))
    assert len(loop.timers) == 1 and deadlines.waiting() == 3
    delay, _callback, _args = loop.timers[0]
    # Never early: the timer is for the end of the slice, at most GRAIN after each deadline.
    assert slice_end - now - 0.01 <= delay <= slice_end - now + 0.001
    time.sleep(max(0.0, slice_end - time.monotonic()))
    loop.fire_all()
    assert sorted(reached) == [0, 1, 2] and deadlines.waiting() == 0


def test_deadlines_grains_apart_get_a_timer_each() -> None:
    deadlines, loop = _wheel()
    for delay in (1.0, 1.0 + 2 * GRAIN, 5.0):
        deadlines.call_later(delay, lambda: None)
    assert len(loop.timers) == 3


def _past(grains_ago: int) -> float:
    """A time in the middle of a slice that ended `grains_ago` grains ago (at least one)."""
    return (int(time.monotonic() / GRAIN) - grains_ago) * GRAIN - GRAIN / 2


def test_deadlines_of_alternating_slices_share_their_two_timers() -> None:
    """A handshake places its own deadline and its tunnel's linger in two slices, and the next handshake
    in the same two: one timer each, however they alternate, and each reaches its own."""
    deadlines, loop = _wheel()
    times = {"own": _past(1), "linger": _past(3), "third": _past(5)}
    reached: list[str] = []
    for index in range(6):
        for name, at in times.items():
            if name != "third" or index % 3 == 0:
                deadlines.call_at(at, lambda name=name: reached.append(name))
    assert len(loop.timers) == 3 and deadlines.waiting() == 14
    loop.fire_all()
    assert sorted(reached) == ["linger"] * 6 + ["own"] * 6 + ["third"] * 2 and deadlines.waiting() == 0


@pytest.mark.parametrize("placed_last", [True, False])
def test_a_slice_once_reached_is_never_placed_in_again(placed_last: bool) -> None:
    """A deadline for a slice whose timer has fired (a late placement, on a loop that fell behind) gets
    a slice and a timer of its own: placed in the one reached, it would wait for ever.  Whether that
    slice was the last placed in or the one before."""
    deadlines, loop = _wheel()
    when = _past(1)
    reached: list[str] = []
    deadlines.call_at(when, lambda: reached.append("first"))
    if not placed_last:
        deadlines.call_at(_past(2), lambda: reached.append("other"))  # the first slice is now the one before
    _delay, reach, args = loop.timers[0]
    reach(*args)  # the first slice's end
    loop.run_soon_once()
    loop.run_soon_once()
    assert reached == ["first"]
    deadlines.call_at(when, lambda: reached.append("late"))
    assert len(loop.timers) == 2 + (not placed_last)
    loop.fire_all()
    assert sorted(reached) == sorted(["first", "late"] + ([] if placed_last else ["other"]))
    assert deadlines.waiting() == 0


def test_no_deadline_is_stranded_whatever_the_order_of_placing_cancelling_and_reaching() -> None:
    """Two Deadlines on one loop, and any interleaving of placing (in slices already ended, so that each
    reach runs them), cancelling, firing slice timers in any order and the stalled path's hops: every
    deadline not cancelled runs once (and none twice), and while it waits, its slice is one still to be reached
    (in `_slices`, or handed to a hop to come), never one reached already.  300 seeded interleavings
    (the clock decides which reaches take the stalled path, so hypothesis could not replay one)."""
    for seed in range(300):
        _interleave(random.Random(seed), seed)


def _interleave(rng: random.Random, seed: int) -> None:
    loop = _RecordingLoop()
    wheels = [Deadlines(loop), Deadlines(loop)]  # type: ignore[arg-type]
    runs: dict[int, int] = {}
    placed = []
    for step in range(rng.randint(5, 80)):
        op = rng.random()
        if op < 0.5:
            index = len(placed)
            placed.append(rng.choice(wheels).call_at(
                _past(rng.randint(1, 6)), lambda index=index: runs.__setitem__(index, runs.get(index, 0) + 1)))
        elif op < 0.6 and placed:
            rng.choice(placed).cancel()
        elif op < 0.85 and loop.timers:
            _delay, reach, args = loop.timers.pop(rng.randrange(len(loop.timers)))
            reach(*args)
        elif loop.soon:
            loop.run_soon_once()
        to_come = [owners for wheel in wheels for owners in wheel._slices.values()]
        to_come += [args[0] for _callback, args in loop.soon if args]
        for deadline in placed:
            assert deadline._slice is None or any(deadline._slice is owners for owners in to_come), (seed, step)
    for _ in range(50):
        if not loop.timers and not loop.soon:
            break
        loop.fire_all()
    for index, deadline in enumerate(placed):
        # Once, or never if cancelled (a cancel may also come after its run, and changes nothing then).
        assert runs.get(index, 0) == 1 or (index not in runs and deadline.cancelled()), (seed, index)
    assert all(wheel.waiting() == 0 for wheel in wheels), seed


def test_a_cancelled_deadline_never_runs_and_is_let_go_at_once() -> None:
    deadlines, loop = _wheel()
    ran: list[str] = []
    kept = deadlines.call_later(0.0, lambda: ran.append("kept"))
    dropped = deadlines.call_later(0.0, lambda: ran.append("dropped"))
    dropped.cancel()
    dropped.cancel()  # twice: nothing more happens
    assert dropped.cancelled() and not kept.cancelled() and deadlines.waiting() == 1
    time.sleep(GRAIN)
    loop.fire_all()
    assert ran == ["kept"] and not kept.cancelled()  # as asyncio.TimerHandle: run is not cancelled
    kept.cancel()  # after it ran: harmless
    assert deadlines.waiting() == 0


@pytest.mark.parametrize("finish", ["cancelled", "reached"])
def test_a_deadline_done_with_holds_its_callback_no_more(finish: str) -> None:
    """As asyncio's TimerHandle: cancelled or reached, a deadline lets go of its callback, so an owner
    that keeps its deadline (a connection, a tunnel's end) is freed by reference counting, not left in
    a cycle (owner → deadline → bound method → owner) for the collector."""

    class Owner:
        def __init__(self, deadlines: Deadlines) -> None:
            self.deadline = deadlines.call_later(0.0, self.expire)

        def expire(self) -> None:
            pass

    deadlines, loop = _wheel()
    gc.disable()
    try:
        owner = Owner(deadlines)
        gone = weakref.ref(owner)
        if finish == "cancelled":
            owner.deadline.cancel()
        else:
            time.sleep(GRAIN)
            loop.fire_all()
        del owner
        assert gone() is None
    finally:
        gc.enable()


def test_a_timer_that_fires_early_leaves_its_deadlines_waiting() -> None:
    """libuv's clock is cached per loop iteration, so its timer may fire a little before our clock
    has passed a deadline: the deadline then waits on, on a timer of its own slice's end again."""
    deadlines, loop = _wheel()
    ran: list[str] = []
    deadlines.call_later(30.0, lambda: ran.append("late"))
    loop.fire_all()  # 30 s early
    assert ran == [] and deadlines.waiting() == 1
    (delay, _callback, _args), = loop.timers
    assert 29.0 < delay <= 30.0 + GRAIN


def test_a_callback_may_cancel_another_deadline_of_its_slice() -> None:
    """The tunnel's two ends: one deadline reached may end what the other was waiting for."""
    deadlines, loop = _wheel()
    ran: list[str] = []
    handles: dict[str, Any] = {}

    def first() -> None:
        ran.append("first")
        handles["second"].cancel()

    def second() -> None:
        ran.append("second")
        handles["first"].cancel()

    handles["first"] = deadlines.call_later(0.0, first)
    handles["second"] = deadlines.call_later(0.0, second)
    time.sleep(GRAIN)
    loop.fire_all()
    assert ran in (["first"], ["second"]) and deadlines.waiting() == 0


def test_one_failing_callback_is_logged_and_the_rest_of_its_slice_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    deadlines, loop = _wheel()
    ran: list[int] = []

    def fail() -> None:
        raise RuntimeError("boom")

    deadlines.call_later(0.0, fail)
    for number in range(3):
        deadlines.call_later(0.0, lambda n=number: ran.append(n))
    time.sleep(GRAIN)
    with caplog.at_level(logging.ERROR, logger="lb.proxy"):
        loop.fire_all()
    assert sorted(ran) == [0, 1, 2]
    assert any("deadline" in record.getMessage() and record.exc_info for record in caplog.records)


def test_on_a_real_loop_a_deadline_is_reached_after_its_time_and_within_a_grain_or_so() -> None:
    async def scenario() -> tuple[float, float]:
        deadlines = Deadlines(asyncio.get_running_loop())
        reached = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        deadlines.call_later(0.12, lambda: reached.set_result(time.monotonic()))
        return start, await asyncio.wait_for(reached, 5)

    start, at = asyncio.run(scenario())
    assert 0.12 <= at - start < 0.12 + GRAIN + 0.25  # the slack: a loaded CI machine's scheduling


def test_a_slice_reached_after_a_stall_lets_the_loop_read_its_sockets_before_its_deadlines() -> None:
    """Reached more than STALLED late (the process was stopped), a slice's deadlines wait two turns of
    call_soon: what the loop reads meanwhile (a backend's answer that came in time) ends theirs."""
    deadlines, loop = _wheel()
    ran: list[str] = []
    answered = deadlines.call_later(0.0, lambda: ran.append("answered"))
    deadlines.call_later(0.0, lambda: ran.append("silent"))
    time.sleep(STALLED + GRAIN + 0.05)
    timers, loop.timers = loop.timers, []
    for _delay, callback, args in timers:
        callback(*args)
    loop.run_soon_once()
    assert ran == [], "no deadline is reached before the loop has looked at its sockets"
    answered.cancel()  # what the look found: the answer, which ends that handshake's deadline
    loop.run_soon_once()
    assert ran == ["silent"] and deadlines.waiting() == 0

