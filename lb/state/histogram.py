"""A cheap fixed-bucket histogram for latencies on the request path.  [pure]

`observe` is a short scan of the bounds and two integer/float additions: no lock (everything
runs on one event loop thread), no allocation, no prometheus-client on the hot
path.  Prometheus reads the counts at scrape time (`lb.state.observations`), and
`workers: N` sum them bucket by bucket (`merge`), which is exact because every
worker uses the same bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Seconds, chosen for a LAN: a backend connect on loopback takes ~100 µs, a
# handshake through a healthy gateway a few ms; 10 s is past every default timeout.
LAN_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


class Histogram:
    """Counts per bucket (not cumulative; the exporter accumulates), their sum and total count."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LAN_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be strictly increasing and not empty")
        self.bounds = tuple(bounds)
        # One more slot than bounds: observations above the last bound (+Inf only).
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is at least the value (Prometheus' `le`: a value equal to a
        # bound belongs in that bucket), as `bisect_left` finds it, by a loop from the smallest:
        # latencies land in the first few buckets, and compiled, this is a float compare per bound
        # where a call to bisect is about 700 instructions (twice per handshake).  NaN (no latency
        # is: each is a difference of two clock readings) counts in +Inf, as prometheus_client
        # counts it, where bisect_left put it in the first bucket.
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        counts = self.counts
        counts[index] = counts[index] + 1  # compiled, `+=` on an item took the generic number protocol
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs ending with "+Inf", as the exposition format wants them."""
        running = 0
        out: list[tuple[str, int]] = []
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def merge(self, other: Histogram) -> None:
        """Add `other`'s observations (same bounds) to this one.

        Raises:
            ValueError: the bounds differ (the sum would be meaningless).
        """
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bounds")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy (for the worker → owner stats report)."""
        return {"counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_snapshot(cls, data: Any, bounds: Sequence[float] = LAN_BUCKETS) -> Histogram:
        """The inverse of `snapshot`.

        Raises:
            ValueError: not a snapshot of a histogram with these bounds.
        """
        histogram = cls(bounds)
        try:
            counts = [int(c) for c in data["counts"]]
            total = float(data["sum"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("malformed histogram snapshot") from None
        if len(counts) != len(histogram.counts) or min(counts) < 0:
            raise ValueError("malformed histogram snapshot")
        histogram.counts, histogram.total, histogram.count = counts, total, sum(counts)
        return histogram


def _le(bound: float) -> str:
    # The same spelling prometheus-client uses (floatToGoString): 0.0001, 1.0, 10.0.
    return repr(float(bound))
