"""How a stop ends the live tunnels: close 1001 spread over `shutdown_grace`, then what is left.  [asyncio shell]

SPEC part 2: live tunnels get their 1001 "spread evenly over this window (never all at once); whatever
is left at its end is closed".  Spread, because every client that gets its close reconnects, and a
thousand reconnects in one millisecond are the herd that the next instance has to absorb.

- `close_schedule` (pure) says when each tunnel gets its 1001.
- `TunnelClosing.spread` sends them on that schedule, oldest tunnel first; `end` waits for the clients'
  answers until the window ends and a last answer's time after, then closes what is left.
- A second Ctrl-C (`hurried`, set by `Balancer.hurry`) cuts every wait short: what is left gets its
  1001 at once and a last answer's time to answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lb.proxy.deadlines import read_first_if_stalled
from lb.state.context import ProxyContext

log = logging.getLogger(__name__)

# After the grace period, how long the last clients told 1001 may take to answer before TCP close:
# the last 1001 goes at the grace's end (close_schedule), and a mobile client's round trip is a few
# hundred ms.  Only a client that does not answer makes the stop wait it out.
LAST_CLOSE_ANSWER = 1.0
# Seconds: how soon a stop's waits see a second Ctrl-C (`Balancer.hurry`).
HURRY_POLL = 0.1


def close_schedule(count: int, grace: float, phase: float = 1.0) -> list[float]:
    """Seconds after the grace starts at which each of `count` tunnels gets its 1001: one per step of
    `grace / count`, `phase` of the way into it (0 < phase <= 1; one worker of N: (i + 1)/N).

    A lone process closes at the end of each step: a lone tunnel gets its 1001 when the grace ends
    (SPEC: "close tunnels with WebSocket close 1001 after timeouts.shutdown_grace"), N tunnels one
    every grace/N, the last at the end; none at once, so a client still relays for a step at least.
    The last clients then have LAST_CLOSE_ANSWER to answer before whatever is left is closed.
    """
    step = grace / count if count else 0.0
    return [(index + phase) * step for index in range(count)]


class TunnelClosing:
    """One process's live tunnels (`ctx.tunnels`) at its stop; `share` is (index, count) of `workers: N`."""

    def __init__(self, ctx: ProxyContext, share: tuple[int, int]) -> None:
        self._ctx = ctx
        self._share = share
        # Set by a second Ctrl-C (`Balancer.hurry`): what is left of the delay and the grace is not waited for.
        self.hurried = asyncio.Event()

    async def unless_hurried(self, within: float, event: asyncio.Event | None = None) -> None:
        """Wait `within` seconds, or less: until `event` is set, if given, or a second Ctrl-C comes.

        Without an event, a sleep that looks up every HURRY_POLL: the spread waits once per tunnel, most
        waits a fraction of a millisecond, and a task and a waiter each would be paid 50,000 times over a
        grace in which those tunnels still relay.
        """
        loop = asyncio.get_running_loop()
        if event is None:
            until = loop.time() + within
            while not self.hurried.is_set() and (left := until - loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(min(left, HURRY_POLL))
            return
        if within <= 0 or self.hurried.is_set():
            return
        waits = [loop.create_task(self.hurried.wait()), loop.create_task(event.wait())]
        try:
            await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def spread(self, grace: float) -> None:
        """Send live tunnels close 1001 evenly over `grace` (oldest first), then close what is left."""
        loop = asyncio.get_running_loop()
        tunnels = sorted(self._ctx.tunnels, key=lambda t: t.opened_at)
        if not tunnels:
            return
        log.info("closing %d live tunnel(s) with 1001, spread over %gs", len(tunnels), grace)
        start = loop.time()
        # With `workers: N` each worker spreads its own tunnels: worker i's closes fall (i + 1)/N of a
        # step into each step, so that the workers' closes interleave instead of going N at a time.
        index, count = self._share
        schedule = close_schedule(len(tunnels), grace, phase=(index + 1) / count if count > 1 else 1.0)
        for offset, tunnel in zip(schedule, tunnels, strict=True):
            if not self._ctx.tunnels:
                break  # every client left on its own: nothing to spread
            await self.unless_hurried(start + offset - loop.time())
            # Woken past a stall: a gateway's own close frame that came in it is read before our 1001.
            await read_first_if_stalled(loop.time() - (start + offset))
            tunnel.shut_down()
        await self.end(start + grace)

    async def end(self, until: float) -> None:
        """Wait for the tunnels to close until `until` (loop time) and a last answer's time, then close
        what is left.  Hurried (a second Ctrl-C), every tunnel gets its 1001 now (those that joined
        after SIGTERM too), and a last answer's time to answer it, as at a grace's end: cut at once,
        the clients got a TCP close where a close frame was on its way."""
        loop = asyncio.get_running_loop()
        await self._wait_closed(max(0.0, until - loop.time()) + LAST_CLOSE_ANSWER)
        hurried = self.hurried.is_set()
        if hurried and self._ctx.tunnels:
            for tunnel in list(self._ctx.tunnels):
                tunnel.shut_down()  # nothing for one already closing
            await self._wait_closed(LAST_CLOSE_ANSWER, even_hurried=True)
        if self._ctx.tunnels:
            log.info("closing %d tunnel(s) left %s", len(self._ctx.tunnels),
                     "a second after their 1001 (stopping now)" if hurried else "at the end of the grace period")
            for tunnel in list(self._ctx.tunnels):
                if tunnel.cause is None:
                    tunnel.cause = "shutdown"
                tunnel.abort()

    async def _wait_closed(self, within: float, *, even_hurried: bool = False) -> None:
        """Until the last live tunnel closes (lb.proxy.tunnel sets the event), or `within` seconds (less
        once a second Ctrl-C comes, unless `even_hurried`)."""
        ctx = self._ctx
        if not ctx.tunnels:
            return
        ctx.all_tunnels_closed = closed = asyncio.Event()
        if even_hurried:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), within)
        else:
            await self.unless_hurried(within, closed)
        ctx.all_tunnels_closed = None
