"""The exposition in slices (`lb.state.families`, `lb.control.exposition.SlicedRender`): joined, the slices
are byte for byte what `generate_latest` gives for whole families, and a body built while the state moves
between slices is still consistent (a histogram's buckets monotone, its count its +Inf bucket) and never
older than the body before it."""

from __future__ import annotations

import random
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from lb.control.exposition import SlicedCollector, SlicedRegistry, SlicedRender
from lb.state.families import SAMPLES_PER_SLICE, in_slices, whole_families
from lb.state.observations import ERROR_KINDS, Observations

label_values = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)


def render_all(slices: Iterator[Metric]) -> bytes:
    render = SlicedRender(slices)
    while not render.advance(lambda: 0.0, -1.0):  # one slice per turn
        pass
    return render.body()


class Fixed(SlicedCollector):
    def __init__(self, families: list[tuple[str, list[tuple[str, int]], int]]) -> None:
        self._families = families

    def collect_slices(self) -> Iterator[Metric]:
        for name, rows, per_row in self._families:
            def add(family: CounterMetricFamily, row: tuple[str, int], per_row: int = per_row) -> None:
                for i in range(per_row):
                    family.add_metric([row[0], str(i)], row[1])

            yield from in_slices(
                lambda name=name: CounterMetricFamily(name, "Help with \\ and\nnewline.", labels=["k", "i"]),
                rows, add, per_row,
            )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(label_values, st.integers(0, 2**53)), max_size=40),
            st.integers(1, 2 * SAMPLES_PER_SLICE),
        ),
        max_size=4,
    )
)
def test_slices_joined_are_what_generate_latest_gives_for_whole_families(
    families: list[tuple[list[tuple[str, int]], int]],
) -> None:
    named = [(f"family_{n}", rows, per_row) for n, (rows, per_row) in enumerate(families)]
    collector = Fixed(named)
    registry = SlicedRegistry()
    registry.register(collector)
    assert render_all(registry.collect_slices()) == generate_latest(registry)
    # An empty family is still one slice (its HELP and TYPE), and slices never split a row.
    for (name, rows, per_row), whole in zip(named, whole_families(collector.collect_slices()), strict=True):
        assert whole.name == name and len(whole.samples) == len(rows) * per_row


def _mutate(observations: Observations, rng: random.Random, backends: list[tuple[str, str]]) -> None:
    for _ in range(rng.randint(0, 5)):
        pool, backend = rng.choice(backends)
        observations.observe_connect(pool, backend, rng.choice([0.00005, 0.0003, 0.002, 0.3, 20.0]))
        observations.observe_handshake(pool, rng.random())
        observations.count_backend_error(pool, backend, rng.choice(ERROR_KINDS))
        observations.count_health_check(pool, backend, rng.random() < 0.5)


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.booleans(), st.randoms(use_true_random=False))
def test_a_body_built_while_the_state_moves_is_consistent_and_never_older_than_the_last(
    count: int, workers: bool, rng: random.Random
) -> None:
    """The owner of workers too (its own counts plus its workers' sum, added up slice by slice)."""
    backends = [("p", f"b{i}") for i in range(count)]
    observations = Observations()
    if workers:
        observations.from_workers = Observations()

    class Moving(SlicedCollector):
        def collect_slices(self) -> Iterator[Metric]:
            for family in observations.family_slices(backends):
                yield family
                _mutate(rng.choice([observations, observations.from_workers or observations]), rng, backends)

    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for _ in range(3):
        samples = _samples(render_all(Moving().collect_slices()))
        buckets: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
        for (name, labels), value in samples.items():
            assert value >= last.get((name, labels), 0.0), (name, labels)  # every one a counter or bucket
            if name.endswith("_count"):
                inf = (name.removesuffix("_count") + "_bucket", tuple(sorted((*labels, ("le", "+Inf")))))
                assert samples[inf] == value
            if name.endswith("_bucket"):
                series = tuple(kv for kv in labels if kv[0] != "le")
                buckets.setdefault((name, series), []).append((float(dict(labels)["le"]), value))
        for series_buckets in buckets.values():
            counts = [value for _, value in sorted(series_buckets)]
            assert counts == sorted(counts)
        last = samples
