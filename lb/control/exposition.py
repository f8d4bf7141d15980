"""/metrics on the event loop the data plane shares: rendered a slice at a time, shared, and reused when costly.

`generate_latest` builds the whole exposition in one call.  At 1,500 backends (a connect-latency
histogram, error kinds, health checks and states per backend: 51,000 lines) that call held the loop
for 0.35-0.5 s, and every handshake of the process (of the owner's health checks and state pushes,
with `workers: N`) waited behind it.  Here:

- The collectors yield their per-backend families in slices of a few backends
  (`lb.state.families`); `SlicedRegistry.collect_slices` hands them out in the order `collect` would.
- `SlicedRender` builds and renders slices until a turn's budget (`Scrapes.TURN`) is spent, and the
  render lets the loop run before the next turn.  Each slice is rendered by prometheus_client's own
  `generate_latest` (so the text is what it always was); a slice after the first of its family
  drops the HELP and TYPE lines, and the joined body is byte for byte what `generate_latest` gives
  for the same state.
- `Scrapes` runs one render at a time: a scrape that arrives while one is under way waits for that
  one's body rather than starting another (two renders interleaved would cost twice and could show
  a counter older in the later body).  A render that cost `COSTLY` CPU or more is served again for
  `SHARE` times the loop time it took (what `CostlyScrapes` did before), so scrapes take a bounded
  share of the loop, whoever asks how often.

The state may change between slices: each series is read whole within one slice (a histogram's
buckets, sum and count together), and every family's series come from one read of the state per
slice, so a body is consistent series by series, and since renders never overlap, a counter in a
later body is never older than in an earlier one.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from typing import ClassVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from lb.state.families import whole_families


class SlicedCollector(Collector):
    """A collector whose large families come in slices (`lb.state.families`); `collect` joins them."""

    @abstractmethod
    def collect_slices(self) -> Iterator[Metric]:
        """Every family, a large one as consecutive slices of the same name, read as each is built."""

    def collect(self) -> Iterator[Metric]:
        return whole_families(self.collect_slices())


class SlicedRegistry(CollectorRegistry):
    """A registry that also hands out its families in slices, in the order `collect` gives them whole."""

    def __init__(self) -> None:
        super().__init__()
        self._in_order: list[Collector] = []  # as registered: the order `collect` goes through them

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._in_order.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._in_order.remove(collector)

    def collect_slices(self) -> Iterator[Metric]:
        for collector in list(self._in_order):
            yield from collector.collect_slices() if isinstance(collector, SlicedCollector) else collector.collect()


class _OneFamily(Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


def render_slice(family: Metric, continues: bool) -> bytes:
    """One slice in the text format, by `generate_latest`; without HELP and TYPE if it `continues` its family.

    HELP and TYPE are the first two lines (`generate_latest` escapes a newline in the help).  Our
    families have no `_created`/`_gsum` samples, the only ones rendered after the family's others.
    """
    text = generate_latest(_OneFamily(family))
    return text.split(b"\n", 2)[2] if continues else text


class SlicedRender:
    """One exposition being built from `slices`, turn by turn: slices until the turn's time is up."""

    __slots__ = ("_family", "_parts", "_slices")

    def __init__(self, slices: Iterator[Metric]) -> None:
        self._slices = slices
        self._parts: list[bytes] = []
        self._family: str | None = None  # the name of the last slice rendered

    def advance(self, clock: Callable[[], float], until: float) -> bool:
        """Build and render slices until `clock()` reaches `until` (one at least) or none is left.

        Returns:
            True once every slice is rendered (`body()` is then the whole exposition).
        """
        for family in self._slices:  # building a slice reads the state it shows
            self._parts.append(render_slice(family, continues=family.name == self._family))
            self._family = family.name
            if clock() >= until:
                return False
        return True

    def body(self) -> bytes:
        return b"".join(self._parts)


async def _next_turn() -> None:
    await asyncio.sleep(0)  # everything ready to run on the loop runs before the render goes on


class Scrapes:
    """The /metrics body: one sliced render at a time, shared by concurrent scrapes; a costly one reused.

    The cost of a render is the CPU time of its turns, not its wall time: on a loaded machine a
    cheap render may take long to finish, and that is no reason to serve old counters.  A cheaper
    render than `COSTLY` (a few backends: about 1 ms) is never reused, so every scrape of a small
    pool sees the counters as they are.  A costly one is served again until `SHARE` times the loop
    time its turns took has passed after it ended: scrapes then take at most 1/(SHARE+1) of the
    loop, back to back or not.
    """

    COSTLY: ClassVar[float] = 0.05  # seconds of CPU: about 250 backends
    SHARE: ClassVar[int] = 10
    # Seconds of loop a render takes per turn before it lets the loop run: a slice is 1-3 ms, so a
    # turn holds the loop for a few ms.  Short, because a handshake needs several turns of the loop
    # (accept, read, connect, answer) and waits up to a turn of the render at each: with 5 ms turns a
    # client saw 18 ms.  Each turn costs the render one pass of the loop, tens of µs.
    TURN: ClassVar[float] = 0.002

    __slots__ = ("_before", "_body", "_clock", "_cpu", "_next_turn", "_rendering", "_slices", "_until")

    def __init__(
        self, slices: Callable[[], Iterator[Metric]], clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time, next_turn: Callable[[], Awaitable[None]] = _next_turn,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`slices` gives every family in slices (`SlicedRegistry.collect_slices`); `clock` tells when
        (monotonic), `cpu` what a turn cost (this thread's CPU time), `next_turn` lets the loop run;
        `before` is awaited before a render reads anything (the workers' fresh counts)."""
        self._before = before
        self._slices = slices
        self._clock = clock
        self._cpu = cpu
        self._next_turn = next_turn
        self._body = b""
        self._until = -math.inf
        self._rendering: asyncio.Future[bytes] | None = None

    async def body(self) -> bytes:
        """The body to answer with: the render under way, else the last while it may be reused, else a new one."""
        if self._rendering is None:
            if self._clock() < self._until:
                return self._body
            self._rendering = asyncio.ensure_future(self._render())
            self._rendering.add_done_callback(_retrieve)
        # Shielded: a scraper that goes away must not cancel the render the others wait for.
        return await asyncio.shield(self._rendering)

    async def _render(self) -> bytes:
        try:
            if self._before is not None:
                await self._before()
            render = SlicedRender(self._slices())
            held = spent = 0.0  # loop time and CPU time of the turns
            while True:
                started, cpu_started = self._clock(), self._cpu()
                finished = render.advance(self._clock, started + self.TURN)
                ended = self._clock()
                held += ended - started
                spent += self._cpu() - cpu_started
                if finished:
                    break
                await self._next_turn()
            body = render.body()
            self._body, self._until = (body, ended + held * self.SHARE) if spent >= self.COSTLY else (b"", -math.inf)
            return body
        finally:
            self._rendering = None


def _retrieve(future: asyncio.Future[bytes]) -> None:
    """Every scraper gone before a render failed: its error is theirs, not the loop's to log as unretrieved."""
    if not future.cancelled():
        future.exception()
