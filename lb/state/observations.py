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

from lb.state.histogram import Histogram
from lb.state.tally import Tally

# The `kind` label of lb_backend_errors_total.
ErrorKind = Literal["refused", "timeout", "reset", "bad_answer"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("refused", "timeout", "reset", "bad_answer")


def error_kind(exc: BaseException | None) -> ErrorKind:
    """What went wrong talking to a backend, as a metric label.

    Args:
        exc: the exception the connect attempt raised (for `BackendConnectError`, its `__cause__`).

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
        self.backend_errors[(pool, backend, kind)] += 1

    def count_health_check(self, pool: str, backend: str, ok: bool) -> None:
        self.health_checks[(pool, backend, "success" if ok else "failure")] += 1

    def forget(self, keep: Callable[[str, str], bool]) -> None:
        """Drop the per-backend series of every (pool, backend) that `keep` refuses (`lb.state.series`).

        Only this process's own; the owner's sum of its workers' reports forgets on its own
        (`lb.control.ipc.StatsAggregate.forget`).  Per-pool histograms stay.
        """
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

    def combined(self) -> Observations:
        """This process's counts plus its workers' (what the owner exports)."""
        total = Observations()
        total.merge(self)
        if self.from_workers is not None:
            total.merge(self.from_workers)
        return total

    # -- export ---------------------------------------------------------------------------------

    def families(self, known: Iterable[tuple[str, str]] = ()) -> Iterator[Metric]:
        """Prometheus metric families for everything recorded here and by the workers.

        Args:
            known: (pool, backend) pairs configured now; their series are exported at zero before
                anything happened, so `rate()` and alerts see them from the first scrape.
        """
        total = self.combined()
        for pool, backend in known:
            total.handshake.setdefault(pool, Histogram())
            total.connect.setdefault((pool, backend), Histogram())
            for kind in ERROR_KINDS:
                total.backend_errors.setdefault((pool, backend, kind), 0)
            for result in ("success", "failure"):
                total.health_checks.setdefault((pool, backend, result), 0)
        handshake = HistogramMetricFamily(
            "lb_handshake_duration_seconds",
            "Handshakes answered by a backend: request head complete to answer head sent, by pool.",
            labels=["pool"],
        )
        for pool, histogram in sorted(total.handshake.items()):
            handshake.add_metric([pool], histogram.cumulative(), histogram.total)
        yield handshake
        connect = HistogramMetricFamily(
            "lb_backend_connect_duration_seconds",
            "Successful backend attempts: TCP connect to the backend's answer head.",
            labels=["pool", "backend"],
        )
        for (pool, backend), histogram in sorted(total.connect.items()):
            connect.add_metric([pool, backend], histogram.cumulative(), histogram.total)
        yield connect
        yield _counter(
            "lb_backend_errors",
            "Failed backend attempts by kind: refused, timeout, reset, bad_answer.",
            ["pool", "backend", "kind"],
            total.backend_errors,
        )
        yield _counter(
            "lb_health_checks",
            "Active health check results per backend (success, failure).",
            ["pool", "backend", "result"],
            total.health_checks,
        )


def _counter(name: str, documentation: str, labels: list[str], counts: Tally[tuple[str, str, str]]) -> Metric:
    """One counter family with a series per key of `counts`, in key order (stable scrape output)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(list(key), n)
    return family
