"""Metric families built a slice at a time, and slices joined back into whole families.  [pure]

A family with a series per backend is large (at 1,500 backends the connect-latency histogram has
28,500 samples), and building and rendering it in one go held the event loop for a tenth of a
second or more.  So the collectors yield such a family as consecutive *slices*: `Metric` objects
with the same name, type and help, each holding the series of a few backends, read from the live
state when the slice is built.  `lb.control.exposition` renders them one by one and lets the loop
run in between; `whole_families` joins them again for anything that wants whole families
(`CollectorRegistry.collect`, `generate_latest`).

A slice never splits one series (a histogram's buckets, sum and count are read together), so a
histogram stays consistent however the state moves between slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from prometheus_client.core import Metric

# About how many samples one slice holds: at a few µs to build and a few µs to render each, a
# slice costs the loop about 1-3 ms.
SAMPLES_PER_SLICE = 250

Row = TypeVar("Row")
Family = TypeVar("Family", bound=Metric)


def in_slices(
    make: Callable[[], Family], rows: Sequence[Row], add: Callable[[Family, Row], None], samples_per_row: int = 1
) -> Iterator[Family]:
    """The family `make()` builds, `add` putting each row's series in, yielded a slice of rows at a time.

    Args:
        make: a new, empty family (the same name, type and help every call).
        rows: what the series are read from, one row per series group (a backend, usually).
        add: adds one row's series to a slice; it reads the live state, when the slice is built.
        samples_per_row: how many samples `add` writes per row (a histogram: its buckets + sum + count).

    Returns:
        Consecutive slices of one family; at least one, so a family without series still shows its
        HELP and TYPE as before.
    """
    per_slice = max(1, SAMPLES_PER_SLICE // max(1, samples_per_row))
    for start in range(0, max(len(rows), 1), per_slice):
        family = make()
        for row in rows[start : start + per_slice]:
            add(family, row)
        yield family


def whole_families(slices: Iterable[Metric]) -> Iterator[Metric]:
    """Consecutive slices of one family (the same name) joined into one family, in order."""
    current: Metric | None = None
    for part in slices:
        if current is not None and part.name == current.name:
            current.samples.extend(part.samples)
            continue
        if current is not None:
            yield current
        current = part
    if current is not None:
        yield current
