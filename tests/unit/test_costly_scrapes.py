"""`/metrics` renders on the loop the data plane shares: a costly render is reused for a while
(`lb.control.metrics.CostlyScrapes`), so scrapes take a bounded share of the loop whoever asks."""

from __future__ import annotations

from collections.abc import Callable

from lb.control.metrics import CostlyScrapes


class Clocks:
    """The monotonic clock and this thread's CPU time: a render moves both on by its cost, and a wait
    on a loaded machine moves the first alone."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 5.0

    def wall(self) -> float:
        return self.now

    def spent(self) -> float:
        return self.cpu

    def renderer(self, costs: list[float], waited: float = 0.0) -> Callable[[], bytes]:
        """A render that costs each of `costs` in turn (CPU and wall), plus `waited` of wall time alone."""
        done = []

        def render() -> bytes:
            cost = costs[min(len(done), len(costs) - 1)]
            self.cpu += cost
            self.now += cost + waited
            done.append(cost)
            return f"render {len(done)}".encode()

        return render

    def body(self, scrapes: CostlyScrapes, render: Callable[[], bytes]) -> bytes:
        return scrapes.body(render, self.wall, self.spent)


def test_cheap_renders_are_never_reused() -> None:
    """A few backends: every scrape sees the counters as they are."""
    clocks, scrapes = Clocks(), CostlyScrapes()
    render = clocks.renderer([0.003])
    assert [clocks.body(scrapes, render) for _ in range(5)] == [f"render {n}".encode() for n in range(1, 6)]


def test_a_cheap_render_slowed_by_a_loaded_machine_is_not_reused() -> None:
    """0.3 s to finish a 3 ms render (other processes had the CPU): its cost is its CPU time."""
    clocks, scrapes = Clocks(), CostlyScrapes()
    render = clocks.renderer([0.003], waited=0.3)
    assert [clocks.body(scrapes, render) for _ in range(3)] == [b"render 1", b"render 2", b"render 3"]


def test_a_costly_render_is_reused_for_share_times_its_cost_so_scrapes_take_a_bounded_share() -> None:
    clocks, scrapes = Clocks(), CostlyScrapes()
    render = clocks.renderer([0.4])  # 1,000 backends
    assert clocks.body(scrapes, render) == b"render 1"
    clocks.now += 0.4 * CostlyScrapes.SHARE - 0.001  # just before its reuse ends
    assert clocks.body(scrapes, render) == b"render 1"
    clocks.now += 0.002
    assert clocks.body(scrapes, render) == b"render 2"
    # Hammered back to back for a minute: the loop spends at most 1/(SHARE+1) of it rendering.
    start, spent = clocks.now, clocks.cpu
    while clocks.now < start + 60:
        clocks.body(scrapes, render)
        clocks.now += 0.001  # the next scraper's request
    assert (clocks.cpu - spent) / (clocks.now - start) <= 1 / (CostlyScrapes.SHARE + 1) + 0.01


def test_a_render_that_is_cheap_again_is_not_reused() -> None:
    """Backends gone (a reload, DNS): the next scrape after a reuse renders, and is not reused itself."""
    clocks, scrapes = Clocks(), CostlyScrapes()
    render = clocks.renderer([0.4, 0.003, 0.003])
    assert clocks.body(scrapes, render) == b"render 1"
    clocks.now += 10
    assert [clocks.body(scrapes, render), clocks.body(scrapes, render)] == [b"render 2", b"render 3"]


def test_a_costly_render_slowed_by_a_loaded_machine_is_reused_for_share_times_what_the_loop_waited() -> None:
    """0.4 s of CPU that took 1 s to finish held the loop 1 s: reused for 10 s, so the share still holds."""
    clocks, scrapes = Clocks(), CostlyScrapes()
    render = clocks.renderer([0.4], waited=0.6)
    assert clocks.body(scrapes, render) == b"render 1"
    clocks.now += 1.0 * CostlyScrapes.SHARE - 0.001
    assert clocks.body(scrapes, render) == b"render 1"
    clocks.now += 0.002
    assert clocks.body(scrapes, render) == b"render 2"
