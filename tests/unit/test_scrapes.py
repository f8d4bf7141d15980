"""`/metrics` renders on the loop the data plane shares (`lb.control.exposition`): a slice at a time with
the loop running in between, one render shared by every scrape that asks meanwhile, and a costly render
reused for a while, so scrapes take a bounded share of the loop whoever asks.  No socket: the loop runs
the scrapes, a fake clock the costs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from lb.control.exposition import Scrapes


class Clocks:
    """The monotonic clock and this thread's CPU time: a slice moves both on by its cost, and a wait on
    a loaded machine (`waited`) moves the first alone."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 5.0
        self.renders = 0
        self.turns = 0

    def wall(self) -> float:
        return self.now

    def spent(self) -> float:
        return self.cpu

    async def next_turn(self) -> None:
        self.turns += 1
        await asyncio.sleep(0)

    def slices(self, count: int, cost: float, waited: float = 0.0) -> Iterator[Metric]:
        """A render of `count` slices of one family, each costing `cost`; its one sample counts renders."""
        self.renders += 1
        render = self.renders
        for _ in range(count):
            self.cpu += cost
            self.now += cost + waited
            family = CounterMetricFamily("renders", "Renders so far.")
            family.add_metric([], render)
            yield family

    def scrapes(self, count: int, cost: float, waited: float = 0.0) -> Scrapes:
        return Scrapes(lambda: self.slices(count, cost, waited), self.wall, self.spent, self.next_turn)


def render_number(body: bytes) -> int:
    """Which render a body came from (each of its samples says)."""
    numbers = {line.split()[-1] for line in body.decode().splitlines() if line.startswith("renders_total")}
    assert len(numbers) == 1, body
    return int(float(numbers.pop()))


def bodies(scrapes: Scrapes, count: int) -> list[int]:
    async def run() -> list[int]:
        return [render_number(await scrapes.body()) for _ in range(count)]

    return asyncio.run(run())


def test_cheap_renders_are_never_reused() -> None:
    """A few backends: every scrape sees the counters as they are."""
    clocks = Clocks()
    assert bodies(clocks.scrapes(3, 0.001), 5) == [1, 2, 3, 4, 5]


def test_a_cheap_render_slowed_by_a_loaded_machine_is_not_reused() -> None:
    """0.3 s to finish a 3 ms render (other processes had the CPU): its cost is its CPU time."""
    clocks = Clocks()
    assert bodies(clocks.scrapes(3, 0.001, waited=0.1), 3) == [1, 2, 3]


def test_a_render_lets_the_loop_run_between_turns_of_at_most_one_slice_past_the_budget() -> None:
    """400 slices of 1 ms (1,500 backends): no turn holds the loop much past Scrapes.TURN."""
    clocks = Clocks()
    held: list[float] = []
    last = [clocks.now]

    async def next_turn() -> None:
        held.append(clocks.now - last[0])
        await clocks.next_turn()
        last[0] = clocks.now

    scrapes = Scrapes(lambda: clocks.slices(400, 0.001), clocks.wall, clocks.spent, next_turn)
    assert bodies(scrapes, 1) == [1]
    assert clocks.turns >= 400 * 0.001 / (Scrapes.TURN + 0.001) - 1
    assert max(held) <= Scrapes.TURN + 0.001 + 1e-9


def test_scrapes_that_arrive_during_a_render_share_it() -> None:
    """Two (or five) scrapes at once, and one arriving mid-render: one render, one body for all."""
    clocks = Clocks()
    scrapes = clocks.scrapes(40, 0.001)  # cheap (50 ms of CPU is the threshold): never reused after it ends

    async def run() -> list[int]:
        first = [asyncio.ensure_future(scrapes.body()) for _ in range(5)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the render is under way
        late = asyncio.ensure_future(scrapes.body())
        return [render_number(body) for body in await asyncio.gather(*first, late)]

    assert asyncio.run(run()) == [1] * 6
    assert clocks.renders == 1
    assert bodies(scrapes, 1) == [2]  # once it has ended, the next scrape renders


def test_a_scraper_that_goes_away_does_not_stop_the_render_the_others_wait_for() -> None:
    clocks = Clocks()
    scrapes = clocks.scrapes(40, 0.001)

    async def run() -> int:
        leaving = asyncio.ensure_future(scrapes.body())
        staying = asyncio.ensure_future(scrapes.body())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        leaving.cancel()
        return render_number(await staying)

    assert asyncio.run(run()) == 1
    assert clocks.renders == 1


def test_a_failed_render_fails_its_scrapes_and_the_next_scrape_renders_again() -> None:
    clocks = Clocks()
    calls = []

    def slices() -> Iterator[Metric]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a collector bug")
        return clocks.slices(2, 0.001)

    scrapes = Scrapes(slices, clocks.wall, clocks.spent, clocks.next_turn)

    async def run() -> int:
        try:
            await scrapes.body()
        except RuntimeError:
            pass
        else:
            raise AssertionError("the render's error reached no scraper")
        return render_number(await scrapes.body())

    assert asyncio.run(run()) == 1


def test_a_costly_render_is_reused_for_share_times_its_loop_time_so_scrapes_take_a_bounded_share() -> None:
    """400 ms of CPU (1,500 backends): served again for SHARE times the loop time its turns took."""
    clocks = Clocks()
    scrapes = clocks.scrapes(400, 0.001)

    async def run() -> None:
        assert render_number(await scrapes.body()) == 1
        clocks.now += 0.4 * Scrapes.SHARE - 0.001  # just before its reuse ends
        assert render_number(await scrapes.body()) == 1
        clocks.now += 0.002
        assert render_number(await scrapes.body()) == 2
        # Hammered back to back for a minute: the loop spends at most 1/(SHARE+1) of it rendering.
        start, spent = clocks.now, clocks.cpu
        while clocks.now < start + 60:
            await scrapes.body()
            clocks.now += 0.001  # the next scraper's request
        assert (clocks.cpu - spent) / (clocks.now - start) <= 1 / (Scrapes.SHARE + 1) + 0.01

    asyncio.run(run())


def test_a_render_that_is_cheap_again_is_not_reused() -> None:
    """Backends gone (a reload, DNS): the next scrape after a reuse renders, and is not reused itself."""
    clocks = Clocks()
    costs = iter([0.001, 0.00001, 0.00001])

    def slices() -> Iterator[Metric]:
        return clocks.slices(400, next(costs))

    scrapes = Scrapes(slices, clocks.wall, clocks.spent, clocks.next_turn)

    async def run() -> list[int]:
        first = render_number(await scrapes.body())
        clocks.now += 10
        return [first, render_number(await scrapes.body()), render_number(await scrapes.body())]

    assert asyncio.run(run()) == [1, 2, 3]


def test_a_costly_render_slowed_by_a_loaded_machine_is_reused_for_share_times_what_the_loop_waited() -> None:
    """0.4 s of CPU whose turns took 1 s held the loop 1 s: reused for 10 s, so the share still holds."""
    clocks = Clocks()
    scrapes = clocks.scrapes(400, 0.001, waited=0.0015)

    async def run() -> list[int]:
        seen = [render_number(await scrapes.body())]
        clocks.now += 1.0 * Scrapes.SHARE - 0.001
        seen.append(render_number(await scrapes.body()))
        clocks.now += 0.002
        seen.append(render_number(await scrapes.body()))
        return seen

    assert asyncio.run(run()) == [1, 1, 2]


def test_a_render_reads_after_its_before_hook_and_concurrent_scrapes_share_one_wait() -> None:
    """`before` (the workers' fresh counts) is awaited once per render, before any slice reads the state;
    scrapes that come while it waits share it and the render."""
    clocks = Clocks()
    order: list[str] = []

    async def before() -> None:
        order.append("before")
        await asyncio.sleep(0.01)  # the workers answering
        order.append("answered")

    def slices() -> Iterator[Metric]:
        order.append("read")
        return clocks.slices(1, 0.001)

    scrapes = Scrapes(slices, clocks.wall, clocks.spent, clocks.next_turn, before=before)

    async def run() -> list[int]:
        return [render_number(body) for body in await asyncio.gather(*(scrapes.body() for _ in range(3)))]

    assert asyncio.run(run()) == [1, 1, 1]
    assert order == ["before", "answered", "read"]
