"""`/metrics` renders on the loop the data plane shares: a costly render is reused for a while
(`lb.control.metrics.CostlyScrapes`), so scrapes take a bounded share of the loop whoever asks."""

from __future__ import annotations

from lb.control.metrics import CostlyScrapes


class Clock:
    """A clock each render moves on by the render's cost."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cheap_renders_are_never_reused() -> None:
    """A few backends: every scrape sees the counters as they are."""
    clock, scrapes, renders = Clock(), CostlyScrapes(), []

    def render() -> bytes:
        renders.append(clock.now)
        clock.now += 0.003
        return f"render {len(renders)}".encode()

    bodies = [scrapes.body(render, clock) for _ in range(5)]
    assert bodies == [f"render {n}".encode() for n in range(1, 6)]


def test_a_costly_render_is_reused_for_share_times_its_cost_so_scrapes_take_a_bounded_share() -> None:
    clock, scrapes, renders = Clock(), CostlyScrapes(), []

    def render() -> bytes:
        renders.append(clock.now)
        clock.now += 0.4  # 1,000 backends
        return f"render {len(renders)}".encode()

    assert scrapes.body(render, clock) == b"render 1"
    clock.now += 0.4 * CostlyScrapes.SHARE - 0.001  # just before its reuse ends
    assert scrapes.body(render, clock) == b"render 1"
    clock.now += 0.002
    assert scrapes.body(render, clock) == b"render 2"
    # Hammered back to back for a minute: the loop spends at most 1/(SHARE+1) of it rendering.
    busy, start = 0.0, clock.now
    while clock.now < start + 60:
        before = len(renders)
        scrapes.body(render, clock)
        busy += 0.4 * (len(renders) - before)
        clock.now += 0.001  # the next scraper's request
    assert busy / (clock.now - start) <= 1 / (CostlyScrapes.SHARE + 1) + 0.01


def test_a_render_that_is_cheap_again_is_not_reused() -> None:
    """Backends gone (a reload, DNS): the next scrape after a reuse renders, and is not reused itself."""
    clock, scrapes, costs = Clock(), CostlyScrapes(), [0.4, 0.003, 0.003]

    def render() -> bytes:
        clock.now += costs.pop(0)
        return f"left {len(costs)}".encode()

    assert scrapes.body(render, clock) == b"left 2"
    clock.now += 10
    assert [scrapes.body(render, clock), scrapes.body(render, clock)] == [b"left 1", b"left 0"]
