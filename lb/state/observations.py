"""Latency histograms and error/health counters: the recording API, worker sums, Prometheus export.

The data path records with one call each, all O(1), no lock, no I/O:

    ctx.observations.observe_handshake(pool, seconds)           lb_handshake_duration_seconds{pool}
    ctx.observations.observe_connect(pool, backend, seconds)    lb_backend_connect_duration_seconds{pool,backend}
    ctx.observations.count_backend_error(pool, backend, kind)   lb_backend_errors_total{pool,backend,kind}
    ctx.observations.count_health_check(pool, backend, ok)      lb_health_checks_total{pool,backend,result}

`error_kind(exc)` turns what a backend connect raised into the `kind` label.
With `workers: N`, each worker reports `snapshot()` in its stats message and
the owner keeps their sum in `from_workers` (`lb.control.ipc`); `families()`
exports the owner's own observations plus that sum, so nothing is counted twice
and nothing goes backwards when a worker restarts (its last report is kept).

Pure apart from building prometheus-client metric families at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from lb.state.families import in_slices, whole_families
from lb.state.histogram import LAN_BUCKETS, Histogram
from lb.state.tally import Tally, add_one

# The `kind` label of lb_backend_errors_total.
ErrorKind = Literal["refused", "timeout", "reset", "bad_answer"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("refused", "timeout", "reset", "bad_answer")


def error_kind(exc: BaseException | None) -> ErrorKind:
    """What went wrong talking to a backend, as a metric label.

    Args:
        exc: the exception the connect attempt raised.

    Returns:
        "refused" (nothing listens), "timeout" (no connect or no answer in time),
        "reset" (the connection broke), "bad_answer" (anything else: the backend
        answered something that is not an HTTP response head).
    """
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "reset"
    if isinstance(exc, OSError):
        # EHOSTUNREACH, ENETUNREACH and friends: the connect itself failed, like a refusal.
        return "refused"
    return "bad_answer"


@dataclass(slots=True)
class Observations:
    """Everything this module records, for one process; mutated only on the event loop thread."""

    handshake: dict[str, Histogram] = field(default_factory=dict)  # pool
    connect: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # pool, backend
    backend_errors: Tally[tuple[str, str, str]] = field(default_factory=Tally)  # pool, backend, kind
    health_checks: Tally[tuple[str, str, str]] = field(default_factory=Tally)  # pool, backend, result
    # The owner's sum of its workers' reports (None in a single process or a worker).
    from_workers: Observations | None = None

    # -- recording (the data path) --------------------------------------------------------------

    def observe_handshake(self, pool: str, seconds: float) -> None:
        """A handshake (or plain request) answered by a backend: head complete → answer head sent."""
        histogram = self.handshake.get(pool)
        if histogram is None:
            histogram = self.handshake[pool] = Histogram()
        histogram.observe(seconds)

    def observe_connect(self, pool: str, backend: str, seconds: float) -> None:
        """A successful backend attempt: TCP connect → the backend's answer head (timeouts.backend_connect)."""
        key = (pool, backend)
        histogram = self.connect.get(key)
        if histogram is None:
            histogram = self.connect[key] = Histogram()
        histogram.observe(seconds)

    def count_backend_error(self, pool: str, backend: str, kind: ErrorKind) -> None:
        add_one(self.backend_errors, (pool, backend, kind))

    def count_health_check(self, pool: str, backend: str, ok: bool) -> None:
        add_one(self.health_checks, (pool, backend, "success" if ok else "failure"))

    def forget(self, keep: Callable[[str, str], bool], keep_pool: Callable[[str], bool] | None = None) -> None:
        """Drop the per-backend series of every (pool, backend) that `keep` refuses (`lb.state.series`),
        and the per-pool histograms of the pools `keep_pool` refuses (removed long enough ago).

        Only this process's own; the owner's sum of its workers' reports forgets on its own
        (`lb.control.ipc.StatsAggregate.forget`).
        """
        if keep_pool is not None:
            for pool in [pool for pool in self.handshake if not keep_pool(pool)]:
                del self.handshake[pool]
        for key in [key for key in self.connect if not keep(*key)]:
            del self.connect[key]
        for tally in (self.backend_errors, self.health_checks):
            for counted in [counted for counted in tally if not keep(counted[0], counted[1])]:
                del tally[counted]

    # -- workers --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the cumulative counts (a worker's stats report)."""
        return {
            "handshake": {pool: h.snapshot() for pool, h in self.handshake.items()},
            "connect": [[pool, backend, h.snapshot()] for (pool, backend), h in self.connect.items()],
            "backend_errors": [[*key, n] for key, n in self.backend_errors.items()],
            "health_checks": [[*key, n] for key, n in self.health_checks.items()],
        }

    @classmethod
    def from_snapshot(cls, data: Any) -> Observations:
        """The inverse of `snapshot`; anything malformed is dropped (a worker bug must not stop the owner)."""
        observations = cls()
        if not isinstance(data, dict):
            return observations
        try:
            for pool, snap in data.get("handshake", {}).items():
                observations.handshake[str(pool)] = Histogram.from_snapshot(snap)
            for pool, backend, snap in data.get("connect", []):
                observations.connect[(str(pool), str(backend))] = Histogram.from_snapshot(snap)
            for pool, backend, kind, n in data.get("backend_errors", []):
                observations.backend_errors[(str(pool), str(backend), str(kind))] = int(n)
            for pool, backend, result, n in data.get("health_checks", []):
                observations.health_checks[(str(pool), str(backend), str(result))] = int(n)
        except (AttributeError, TypeError, ValueError):
            return cls()
        return observations

    def merge(self, other: Observations) -> None:
        """Add `other`'s counts into this one (its own counts only, not its `from_workers`)."""
        for pool, histogram in other.handshake.items():
            self.handshake.setdefault(pool, Histogram()).merge(histogram)
        for key, histogram in other.connect.items():
            self.connect.setdefault(key, Histogram()).merge(histogram)
        self.backend_errors.update(other.backend_errors)
        self.health_checks.update(other.health_checks)

    # -- export ---------------------------------------------------------------------------------

    def families(self, known: Iterable[tuple[str, str]] = ()) -> Iterator[Metric]:
        """Prometheus metric families for everything recorded here and by the workers, each whole."""
        return whole_families(self.family_slices(known))

    def holds_backend(self, pool: str, backend: str) -> bool:
        """Whether this process or its workers hold any series of `backend` (`forget` drops them all)."""
        sources = (self, self.from_workers) if self.from_workers is not None else (self,)
        return any(
            (pool, backend) in source.connect
            or any((pool, backend, kind) in source.backend_errors for kind in ERROR_KINDS)
            or any((pool, backend, result) in source.health_checks for result in ("success", "failure"))
            for source in sources
        )

    def family_slices(
        self, known: Iterable[tuple[str, str]] = (), departed: Iterable[tuple[str, str]] = ()
    ) -> Iterator[Metric]:
        """The same families, a per-backend one in slices of a few backends (`lb.state.families`).

        Each series is summed over this process and its workers when its slice is built (a histogram
        whole: its buckets, sum and count together), not all at once before the first: adding up
        1,500 histograms in one go held the loop for several ms more.

        Args:
            known: (pool, backend) pairs configured now; their series are exported at zero before
                anything happened, so `rate()` and alerts see them from the first scrape.
            departed: pairs gone from their pool whose series the retention keeps: exported as `known`
                ones are, while any of their series is held when their slice is built.  One forgotten
                since the render listed it (the loop runs between slices) is left out of the body, not
                shown at zero: from N to 0 is a counter going backwards, from N to absent a series
                that ended.
        """
        sources = (self, self.from_workers) if self.from_workers is not None else (self,)
        present = set(known)
        departed = set(departed) - present
        known = [*present, *departed]

        def at_zero(key: tuple[str, str]) -> bool:
            """Whether `key`'s series are exported, at zero where nothing was recorded."""
            return key in present or (key in departed and self.holds_backend(*key))

        def handshake() -> HistogramMetricFamily:
            return HistogramMetricFamily(
                "lb_handshake_duration_seconds",
                "Handshakes answered by a backend: request head complete to answer head sent, by pool.",
                labels=["pool"],
            )

        known_pools = {pool for pool, _ in known}

        def add_handshake(family: HistogramMetricFamily, pool: str) -> None:
            _add_histogram(family, [pool], [source.handshake.get(pool) for source in sources], pool in known_pools)

        def connect() -> HistogramMetricFamily:
            return HistogramMetricFamily(
                "lb_backend_connect_duration_seconds",
                "Successful backend attempts: TCP connect to the backend's answer head.",
                labels=["pool", "backend"],
            )

        def add_connect(family: HistogramMetricFamily, key: tuple[str, str]) -> None:
            _add_histogram(family, list(key), [source.connect.get(key) for source in sources], at_zero(key))

        # Each family's rows are listed (and sorted: a stable scrape output) when its first slice is built.
        pools = sorted({*(pool for source in sources for pool in source.handshake), *(pool for pool, _ in known)})
        yield from in_slices(handshake, pools, add_handshake, _samples(LAN_BUCKETS))
        backends = sorted({*(key for source in sources for key in source.connect), *known})
        yield from in_slices(connect, backends, add_connect, _samples(LAN_BUCKETS))
        yield from _counter(
            "lb_backend_errors",
            "Failed backend attempts by kind: refused, timeout, reset, bad_answer.",
            ["pool", "backend", "kind"],
            [source.backend_errors for source in sources],
            ((pool, backend, kind) for pool, backend in known for kind in ERROR_KINDS),
            at_zero,
        )
        yield from _counter(
            "lb_health_checks",
            "Active health check results per backend (success, failure).",
            ["pool", "backend", "result"],
            [source.health_checks for source in sources],
            ((pool, backend, result) for pool, backend in known for result in ("success", "failure")),
            at_zero,
        )


def _samples(bounds: tuple[float, ...]) -> int:
    """Samples one histogram series writes: a bucket per bound, +Inf, sum and count."""
    return len(bounds) + 3


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], parts: list[Histogram | None], known: bool
) -> None:
    """One series: the sum of `parts` (this process's and its workers'; None: nothing recorded there).
    Nothing recorded anywhere, and not `known` (forgotten since the render listed it): no series."""
    present = [part for part in parts if part is not None]
    if not present and not known:
        return
    if len(present) == 1:
        histogram = present[0]
    else:
        histogram = Histogram()
        for part in present:
            histogram.merge(part)
    family.add_metric(labels, histogram.cumulative(), histogram.total)


def _counter(
    name: str, documentation: str, labels: list[str], sources: list[Tally[tuple[str, str, str]]],
    zeros: Iterable[tuple[str, str, str]], at_zero: Callable[[tuple[str, str]], bool],
) -> Iterator[CounterMetricFamily]:
    """One counter family with a series per key of `sources` and `zeros`, in key order (stable scrape
    output), in slices; each series the sum over `sources`, read when its slice is built."""

    def make() -> CounterMetricFamily:
        return CounterMetricFamily(name, documentation, labels=labels)

    def add(family: CounterMetricFamily, key: tuple[str, str, str]) -> None:
        counts = [source[key] for source in sources if key in source]
        if counts or at_zero(key[:2]):  # else forgotten since the render listed it: no series (not 0)
            family.add_metric(list(key), sum(counts))

    yield from in_slices(make, sorted({*(key for source in sources for key in source), *zeros}), add)
