"""lb.state.histogram and lb.state.observations: bucket placement, worker sums, error kinds, exposition."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from lb.errors import BadRequest
from lb.state.histogram import LAN_BUCKETS, Histogram
from lb.state.observations import Observations, error_kind
from lb.state.tally import Tally


def test_lan_buckets_span_100us_to_10s() -> None:
    """Buckets are chosen for a LAN: 100 µs .. 10 s."""
    assert LAN_BUCKETS[0] == 0.0001
    assert LAN_BUCKETS[-1] == 10.0


@pytest.mark.parametrize(
    ("value", "first_le"),
    [(0.00005, "0.0001"), (0.0001, "0.0001"), (0.0002, "0.00025"), (1.0, "1.0"), (9.9, "10.0"), (30.0, "+Inf")],
)
def test_value_lands_in_the_first_bucket_it_fits(value: float, first_le: str) -> None:
    """A value equal to a bound counts in that bucket (Prometheus `le`); above the last only in +Inf."""
    histogram = Histogram()
    histogram.observe(value)
    cumulative = histogram.cumulative()
    assert next(le for le, n in cumulative if n == 1) == first_le
    assert cumulative[-1] == ("+Inf", 1)
    assert histogram.count == 1 and histogram.total == value


@st.composite
def _value_and_bounds(draw: st.DrawFn) -> tuple[float, list[float]]:
    """Strictly increasing bounds, and a value: any, or half the time a bound or the float just under or over
    it (`le`: a bound counts in its own bucket, the next float up in the next); any value was a bound in
    10-33% of examples, next to one in none."""
    bounds = sorted(set(draw(st.lists(st.floats(min_value=-1e9, max_value=1e9), min_size=1, max_size=20))))
    near = st.sampled_from(bounds).flatmap(
        lambda bound: st.sampled_from([bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)])
    )
    return draw(st.floats(allow_nan=False) | near), bounds


@given(_value_and_bounds())
def test_each_value_counts_in_the_bucket_bisect_left_names(drawn: tuple[float, list[float]]) -> None:
    """The scan `observe` makes finds the bucket `bisect_left` finds, on any strictly increasing bounds."""
    value, bounds = drawn
    histogram = Histogram(bounds)
    histogram.observe(value)
    expected = [0] * (len(bounds) + 1)
    expected[bisect_left(bounds, value)] = 1
    assert histogram.counts == expected and histogram.count == 1


def test_nan_counts_in_inf_only() -> None:
    histogram = Histogram()
    histogram.observe(float("nan"))
    assert histogram.counts[-1] == 1 and sum(histogram.counts) == 1 and histogram.cumulative()[0] == ("0.0001", 0)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 10**12)), max_size=20))
def test_a_tally_counts_as_a_counter_does(pairs: list[tuple[str, int]]) -> None:
    """Missing keys count 0, `+=` counts on, and `update` adds (the owner sums its workers' tallies with it)."""
    tally: Tally[str] = Tally()
    counter: Counter[str] = Counter()
    for key, count in pairs:
        tally[key] += count
        counter[key] += count
        assert tally["never"] == 0 and "never" not in tally
    assert tally == counter
    tally.update(dict(counter))
    counter.update(dict(counter))
    assert tally == counter and type(tally) is Tally


def test_cumulative_counts_never_decrease() -> None:
    histogram = Histogram()
    for value in (0.0003, 0.0003, 0.02, 4.0, 11.0):
        histogram.observe(value)
    counts = [n for _, n in histogram.cumulative()]
    assert counts == sorted(counts) and counts[-1] == 5


def test_bad_bounds_refused() -> None:
    with pytest.raises(ValueError):
        Histogram([1.0, 0.5])
    with pytest.raises(ValueError):
        Histogram([])


def test_merge_and_snapshot_round_trip() -> None:
    """Workers' histograms sum bucket by bucket; a snapshot survives JSON and comes back equal."""
    a, b = Histogram(), Histogram()
    a.observe(0.001)
    b.observe(0.001)
    b.observe(2.0)
    a.merge(Histogram.from_snapshot(b.snapshot()))
    assert a.count == 3 and a.total == pytest.approx(2.002)
    assert dict(a.cumulative())["0.001"] == 2
    with pytest.raises(ValueError):
        a.merge(Histogram([1.0]))


@pytest.mark.parametrize("snapshot", [None, {}, {"counts": [1], "sum": 0}, {"counts": ["x"], "sum": 1}, 5])
def test_malformed_snapshot_refused(snapshot: object) -> None:
    with pytest.raises(ValueError):
        Histogram.from_snapshot(snapshot)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(111, "refused"), "refused"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "reset"),
        (ConnectionError("backend closed the connection"), "reset"),
        (BadRequest("backend response head too large"), "bad_answer"),
        (OSError(113, "no route to host"), "refused"),
        (None, "bad_answer"),
    ],
)
def test_error_kind(exc: BaseException | None, kind: str) -> None:
    assert error_kind(exc) == kind


class _Export(Collector):
    def __init__(self, observations: Observations) -> None:
        self._observations = observations

    def collect(self):  # type: ignore[no-untyped-def]
        return self._observations.families()


def _scrape(observations: Observations) -> str:
    registry = CollectorRegistry()
    registry.register(_Export(observations))
    return generate_latest(registry).decode()


def test_owner_exports_its_own_and_its_workers_sums() -> None:
    """Health checks (owner) and handshakes (workers) add up; a malformed worker report counts nothing."""
    owner, worker = Observations(), Observations()
    owner.count_health_check("p", "b1", True)
    owner.count_health_check("p", "b1", False)
    worker.observe_handshake("p", 0.002)
    worker.observe_connect("p", "b1", 0.0004)
    worker.count_backend_error("p", "b1", "timeout")
    owner.from_workers = Observations.from_snapshot(worker.snapshot())
    text = _scrape(owner)
    assert 'lb_handshake_duration_seconds_count{pool="p"} 1.0' in text
    assert 'lb_handshake_duration_seconds_bucket{le="0.0025",pool="p"} 1.0' in text
    assert 'lb_backend_connect_duration_seconds_bucket{backend="b1",le="0.0005",pool="p"} 1.0' in text
    assert 'lb_backend_errors_total{backend="b1",kind="timeout",pool="p"} 1.0' in text
    assert 'lb_health_checks_total{backend="b1",pool="p",result="failure"} 1.0' in text
    assert 'lb_health_checks_total{backend="b1",pool="p",result="success"} 1.0' in text
    assert Observations.from_snapshot({"connect": [["only-two", 1]]}).snapshot() == Observations().snapshot()


def test_known_backends_are_exported_at_zero() -> None:
    """Series exist from the first scrape, before any handshake, error or check (rate() and alerts need them)."""
    registry = CollectorRegistry()

    class Known(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return Observations().families([("p", "b1")])

    registry.register(Known())
    text = generate_latest(registry).decode()
    assert 'lb_handshake_duration_seconds_count{pool="p"} 0.0' in text
    assert 'lb_backend_connect_duration_seconds_bucket{backend="b1",le="+Inf",pool="p"} 0.0' in text
    for kind in ("refused", "timeout", "reset", "bad_answer"):
        assert f'lb_backend_errors_total{{backend="b1",kind="{kind}",pool="p"}} 0.0' in text
    assert 'lb_health_checks_total{backend="b1",pool="p",result="failure"} 0.0' in text
