"""Deadlines on shared loop timers: one timer per GRAIN of time, however many connections wait.

Nearly every deadline the data plane sets is never reached: a handshake's ends with the handshake,
a millisecond after it began, and a tunnel's linger after a client's hang-up ends when the backend
hangs up too.  Under uvloop a loop timer costs about 4,000 instructions to arm and cancel (a
TimerHandle, a libuv timer, a heap insert and a deferred close): 2-3 % of a handshake each, and a
handshake whose client hangs up armed two.  Here a deadline joins the set of its slice (the GRAIN
of time it falls in), whose one loop timer fires at the slice's end, and cancelling it is a set
discard.  So a deadline is reached up to GRAIN late and never early: timeouts of seconds do not
notice, and a reconnect storm's thousands of handshakes share a few dozen timers.

Times are on the events' clock, `time.monotonic` (as `lb.proxy.server` stamps them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Final

GRAIN: Final = 0.05  # seconds: how late a deadline may be reached
STALLED: Final = 0.1  # a slice reached this late: the loop was stalled, and reads what came first

log: Final = logging.getLogger("lb.proxy")
_now: Final = time.monotonic  # a C static for compiled code (as lb.proxy.server._now)


async def read_first_if_stalled(late: float) -> None:
    """After a wait that ended `late` seconds past its time: more than STALLED, and the event loop was
    stalled (the process stopped or starved of CPU, a paused VM), so it acts on what its sockets received
    meanwhile before the caller judges or closes anything by the clock.  Two turns, as `Deadlines._reach`
    hops: asyncio queues a look's I/O callbacks after the first, uvloop looks after it.  Judged at once,
    a tunnel whose client spoke during the stall was closed as idle, and a gateway's own close frame lost
    to a 1001 or a drain's 1012."""
    if late > STALLED:
        await asyncio.sleep(0)
        await asyncio.sleep(0)


async def sleep_reading_first(seconds: float) -> None:
    """`asyncio.sleep(seconds)`, then `read_first_if_stalled` by how late it woke: for a paced loop
    (the idle sweep, a drain's closes) that judges or closes tunnels by the clock each time it wakes."""
    due = _now() + seconds
    await asyncio.sleep(seconds)
    await read_first_if_stalled(_now() - due)


class Deadline:
    """One deadline: its callback runs once the clock has passed `when`, unless cancelled first.
    `cancel()` and `cancelled()` as an asyncio.TimerHandle's."""

    __slots__ = ("_callback", "_cancelled", "_slice", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        # Let go of once run or cancelled, as asyncio's handles do: its owner usually holds the deadline
        # (a connection, a tunnel's end), and a bound method of the owner kept here would make a cycle
        # that only the collector frees.
        self._callback: Callable[[], object] | None = callback
        self._cancelled = False
        self._slice: set[Deadline] | None = None  # the slice it waits in (Deadlines._place)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._callback = None
            owners = self._slice
            if owners is not None:
                self._slice = None
                owners.discard(self)  # so a cancelled deadline holds nothing until its slice ends

    def cancelled(self) -> bool:
        return self._cancelled


class Deadlines:
    """The deadlines of one event loop, GRAIN of time to a loop timer."""

    __slots__ = ("_recent", "_recent_number", "_slices", "_used", "_used_number", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slices: dict[int, set[Deadline]] = {}  # slice number (its end, in GRAINs) → its deadlines
        # The two slices placed in last (number, set; -1 and None for none), the last first: a handshake
        # places its deadlines in two (its own, its tunnel's linger), and the handshakes of the same GRAIN
        # in the same two.  Found here, a slice costs no dict lookup, for which its number, past what
        # small ints are kept for, is made an int object and hashed (some 350 instructions a deadline).
        # A slice leaves both when it is reached (`_reach`): one reached must never be placed in again.
        self._recent_number = -1
        self._recent: set[Deadline] | None = None
        self._used_number = -1
        self._used: set[Deadline] | None = None

    def call_later(self, delay: float, callback: Callable[[], object]) -> Deadline:
        """`callback()` once `delay` seconds have passed, up to GRAIN later (as loop.call_later)."""
        return self.call_at(_now() + delay, callback)

    def call_at(self, when: float, callback: Callable[[], object]) -> Deadline:
        """`callback()` once the clock (time.monotonic, the loop's) reads `when`, up to GRAIN later (as
        loop.call_at): for a caller that has just read the clock, which costs a call and a float."""
        deadline = Deadline(when, callback)
        self._place(deadline)
        return deadline

    def waiting(self) -> int:
        """How many deadlines wait (O(slices)).  Not `__len__`: an empty Deadlines would then be false,
        and `deadlines or Deadlines(loop)` would make a new one whenever none waited."""
        return sum(len(owners) for owners in self._slices.values())

    def _place(self, deadline: Deadline) -> None:
        number = math.ceil(deadline.when / GRAIN)
        owners = self._recent
        if number != self._recent_number or owners is None:
            if number == self._used_number and self._used is not None:
                owners = self._used
            else:
                owners = self._slices.get(number)
                if owners is None:
                    owners = self._slices[number] = set()
                    self.loop.call_later(max(0.0, number * GRAIN - _now()), self._reach, number)
            self._used_number, self._used = self._recent_number, self._recent
            self._recent_number, self._recent = number, owners
        deadline._slice = owners
        owners.add(deadline)

    def _reach(self, number: int) -> None:
        """The slice's end: every deadline in it that is still waiting is reached (one callback's
        error is logged, and the rest still run: a deadline missed is a connection never closed).

        Reached more than STALLED late, the event loop was stalled (the process stopped or starved of
        CPU, a paused VM): what its sockets received meanwhile is read first, and only the deadlines
        it did not end are reached.  A backend's 101 that came 0.3 s into a 1 s `backend_connect`
        while the balancer was stopped for 1.5 s was a 502, and a failed handshake counted against
        a healthy gateway (`fall` of them in flight took it down), because the loop runs the timers
        due before it looks at its sockets again; HAProxy reads what came before it judges a timeout.
        """
        owners = self._slices.pop(number, None)
        if number == self._recent_number:
            self._recent_number, self._recent = -1, None
        if number == self._used_number:
            self._used_number, self._used = -1, None
        if not owners:
            return
        if _now() - number * GRAIN > STALLED:
            self.loop.call_soon(self._after_a_look, owners)
            return
        self._expire(owners)

    def _after_a_look(self, owners: set[Deadline]) -> None:
        # This first hop runs before the loop's next look at its sockets has been acted on (asyncio
        # queues that look's I/O callbacks after it; uvloop looks after it): the second hop, queued
        # from here, runs after them under both.
        self.loop.call_soon(self._expire, owners)

    def _expire(self, owners: set[Deadline]) -> None:
        if not owners:
            return
        now = _now()
        # A copy: a callback may cancel another deadline of this slice (the tunnel's two ends).
        for deadline in list(owners):
            callback = deadline._callback
            if callback is None:  # cancelled by a callback before it
                continue
            deadline._slice = None
            if deadline.when > now:
                # The loop's clock is coarser than ours (libuv's is cached per iteration, in ms),
                # so its timer may fire a little early: the deadline waits on, in its next slice.
                self._place(deadline)
                continue
            deadline._callback = None
            try:
                callback()
            except Exception:
                log.exception("a deadline's callback failed")
