"""Prometheus exposition: one registry, lb_* metrics read from live state at scrape time.

Nothing on the per-message or per-handshake path touches prometheus-client:
handlers bump plain integers (`context.Stats`, `pool.BackendStatus`, tunnel
byte counts) and this collector turns them into metric families when scraped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import get_args

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lb import __version__
from lb.affinity.carriers import MAX_SEALS
from lb.affinity.codec import INVALID_REASONS
from lb.affinity.decision import DecisionReason
from lb.config.model import DEFAULT_BACKLOG, Config
from lb.control.exposition import SlicedCollector, SlicedRegistry
from lb.errors import RequestRejected
from lb.state.context import BackendCounts, ProxyContext
from lb.state.families import Family, in_slices
from lb.state.pool import BackendState, BackendStatus

_NONE_COUNTED = BackendCounts()  # a backend that has answered nothing yet
# lb_affinity_decisions_total's results, each exported from 0 for every configured pool: Prometheus'
# rate()/increase() count nothing of the value a series is born with, so a first redispatch storm (a
# gateway dies) would be missing from the dashboard's redispatch rate and from LbRedispatchSpike.
# Read from the type, so that a result added there is exported from 0 too.
DECISION_RESULTS: tuple[DecisionReason, ...] = get_args(DecisionReason)


def _answered_statuses() -> tuple[int, ...]:
    """Every status the balancer answers itself: each `RequestRejected`'s, and the bare 500 of a bug."""
    statuses: set[int] = {500}
    kinds: list[type[RequestRejected]] = [RequestRejected]
    while kinds:
        kind = kinds.pop()
        statuses.add(kind.status)
        kinds.extend(kind.__subclasses__())
    return tuple(sorted(statuses))


# lb_rejected_requests_total's statuses, each exported from 0, for the same reason as the decisions: the
# first 502 or 503 storm after a start (LbHandshakeErrorRatio, the dashboard's refusals) would not
# show.  Read from the error tree, so that a status added there is exported from 0 too.
ANSWERED_STATUSES: tuple[int, ...] = _answered_statuses()


@dataclasses.dataclass
class ReloadResults:
    """What SIGHUP reloads came to: `lb_config_reloads_total{result}`, and whether the last one applied
    (`lb_config_last_reload_successful`: LbConfigReloadFailed clears on the reload that fixes it, where
    a window over the failure counter kept it on for that window after the fix)."""

    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    last_ok: bool = True  # no reload yet: the process runs the file it started with

    def succeeded(self) -> None:
        self.counts["success"] += 1
        self.last_ok = True

    def failed(self, *, latest: bool = True) -> None:
        """The file was refused, or (workers: N) a worker could not apply what the owner applied; `latest`
        False: a worker's late report of a reload before the last, which is counted but says nothing of
        the last."""
        self.counts["failure"] += 1
        if latest:
            self.last_ok = False


def config_hash(config: Config) -> str:
    """A short digest of the effective configuration: replicas whose hashes differ run different configs.

    The repr of the frozen dataclasses covers every key with its default filled in, so two files that
    differ only in comments or key order hash alike.  `workers: auto` is hashed as written, not as the
    number it came to on this machine: replicas on nodes of different sizes run the same config.  A
    listener's default `backlog` (max(net.core.somaxconn, 4096), which differs between hosts) is hashed
    as DEFAULT_BACKLOG: as any key left at its default, it hashes like the same key written at it.
    12 hex digits: a label, not a security boundary.
    """
    if config.workers_auto:
        config = dataclasses.replace(config, workers=0)
    if any(listener.backlog_default for listener in config.listeners):
        listeners = tuple(
            dataclasses.replace(listener, backlog=DEFAULT_BACKLOG) if listener.backlog_default else listener
            for listener in config.listeners
        )
        config = dataclasses.replace(config, listeners=listeners)
    return hashlib.sha256(repr(config).encode()).hexdigest()[:12]


Retired = Callable[[], list[tuple[str, BackendStatus]]]  # backends gone from their pool, tunnels still live
Departed = Callable[[], Iterable[tuple[str, str]]]  # (pool, backend) gone, its series still kept (lb.state.series)


class LbCollector(SlicedCollector):
    """The lb_* families, read from the live state; a per-backend family comes in slices."""

    def __init__(
        self, get_context: Callable[[], ProxyContext], reloads: Callable[[], ReloadResults] | None = None,
        retired: Retired | None = None, departed: Departed | None = None,
    ) -> None:
        self._get_context = get_context
        self._reloads = reloads
        self._retired = retired
        self._departed = departed
        self._hashed: tuple[Config, str] | None = None

    def _config_hash(self, config: Config) -> str:
        if self._hashed is None or self._hashed[0] is not config:
            self._hashed = (config, config_hash(config))
        return self._hashed[1]

    def collect_slices(self) -> Iterator[Metric]:
        ctx = self._get_context()
        build = GaugeMetricFamily(
            "lb_build_info", "Always 1: the running version and a hash of its effective configuration.",
            labels=["version", "config_hash"],
        )
        build.add_metric([__version__, self._config_hash(ctx.config)], 1)
        yield build
        if self._reloads is not None:
            reloads = CounterMetricFamily(
                "lb_config_reloads", "Configuration reloads (SIGHUP) by result.", labels=["result"]
            )
            results = self._reloads()
            for result in ("success", "failure"):
                reloads.add_metric([result], results.counts.get(result, 0))
            yield reloads
            last = GaugeMetricFamily(
                "lb_config_last_reload_successful",
                "1 when the last SIGHUP reload applied everywhere (or none has run yet), 0 when it failed.",
            )
            last.add_metric([], 1 if results.last_ok else 0)
            yield last
        retired = self._retired() if self._retired is not None else []
        in_pools = [(pool.name, backend_id) for pool in ctx.pools.values() for backend_id in pool.backends]
        # Departed backends the retention keeps (a reload, DNS) export their last counts until it forgets
        # them (README: kept for the last max(16, static + max_backends) to leave each pool).
        present = dict.fromkeys([*in_pools, *((name, backend.id) for name, backend in retired)])
        # Not present, though the retention's view may lag a pool's by a moment: each series once.
        departed = [key for key in (self._departed() if self._departed else ()) if key not in present]
        yield from self._backends(ctx, retired, departed)
        clients = GaugeMetricFamily(
            "lb_client_connections",
            "Client connections now (handshakes in flight, TLS and PROXY included, and live tunnels), "
            "as limits.max_connections counts them.",
        )
        clients.add_metric([], ctx.client_connections())
        yield clients
        limit = GaugeMetricFamily("lb_client_connections_limit", "limits.max_connections: 503 beyond it.")
        limit.add_metric([], ctx.config.limits.max_connections)
        yield limit
        stats = ctx.stats
        handshakes = CounterMetricFamily(
            "lb_handshakes", "Handshakes and requests relayed, by backend and outcome.",
            labels=["pool", "backend", "outcome"],
        )
        for (pool, backend, outcome), count in stats.handshakes.items():
            handshakes.add_metric([pool, backend, outcome], count)
        yield handshakes
        decisions = CounterMetricFamily(
            "lb_affinity_decisions", "Affinity decisions by result (hit, new, redispatch, invalid).",
            labels=["pool", "result"],
        )
        # Summed over every backend ever counted: one whose series were forgotten still counts here.
        decided = stats.pool_decisions()
        series: dict[tuple[str, str], None] = dict.fromkeys(
            (pool, result) for pool in ctx.config.pools for result in DECISION_RESULTS
        )
        series.update(dict.fromkeys(decided))
        for pool, result in series:
            decisions.add_metric([pool, result], decided.get((pool, result), 0))
        yield decisions
        invalid = CounterMetricFamily(
            "lb_affinity_invalid_tokens", "Affinity tokens treated as absent, by reason.", labels=["reason"]
        )
        # Every reason from 0: rate() counts nothing of the value a series is born with.
        for reason in dict.fromkeys([*INVALID_REASONS, *stats.invalid_tokens]):
            invalid.add_metric([reason], stats.invalid_tokens.get(reason, 0))
        yield invalid
        unsealed = CounterMetricFamily(
            "lb_affinity_unsealed_cookies",
            "Rewrite mode: backend cookie values passed through unsealed: too large to seal, or past the "
            f"first {MAX_SEALS} of one answer.",
            labels=["pool"],
        )
        for pool, count in stats.unsealed_cookies.items():
            unsealed.add_metric([pool], count)
        yield unsealed
        rejected = CounterMetricFamily(
            "lb_rejected_requests", "Requests the balancer answered itself, by status.", labels=["status"]
        )
        answered: dict[int, int] = dict.fromkeys(ANSWERED_STATUSES, 0)
        answered.update(stats.rejected)
        for status, count in answered.items():
            rejected.add_metric([str(status)], count)
        yield rejected
        relayed = CounterMetricFamily(
            "lb_bytes_relayed", "Bytes relayed after the handshake head, by direction.", labels=["direction"]
        )
        bytes_in, bytes_out = ctx.bytes_relayed()
        relayed.add_metric(["client_to_backend"], bytes_in)
        relayed.add_metric(["backend_to_client"], bytes_out)
        yield relayed
        closed = CounterMetricFamily("lb_tunnels_closed", "Tunnels that have ended.")
        closed.add_metric([], stats.tunnels_closed)
        yield closed
        tls = CounterMetricFamily(
            "lb_tls_handshake_failures",
            "TLS handshakes that failed or timed out (plain HTTP or garbage on a TLS port, a client that "
            "rejects the certificate, one that never finishes, a TCP connect closed without a byte: an L4 "
            "balancer's or a tcpSocket probe's check).",
        )
        tls.add_metric([], stats.tls_failures)
        yield tls
        shed = CounterMetricFamily(
            "lb_connections_shed",
            "Connections to a TLS or PROXY-protocol listener closed as accepted, without an answer: past "
            "limits.max_connections and the overflow that still gets a 503.",
        )
        shed.add_metric([], stats.shed)
        yield shed
        ended = CounterMetricFamily(
            "lb_tunnel_closes",
            "Tunnels the balancer ended, by cause (shutdown, drain, idle, backend_lost; worker_exit: a worker "
            "that died, with workers: N) and how: with a close frame, or at TCP level when none could be "
            "delivered in time.",
            labels=["cause", "ended_with"],
        )
        for (cause, ended_with), count in stats.balancer_closes.items():
            ended.add_metric([cause, ended_with], count)
        yield ended
        # Latency histograms, backend errors and health checks (lb.state.observations), workers summed.
        yield from ctx.observations.family_slices(present, departed)

    @staticmethod
    def _backends(
        ctx: ProxyContext, retired: list[tuple[str, BackendStatus]], departed: list[tuple[str, str]]
    ) -> Iterator[Metric]:
        """Per backend, in slices of a few backends (`lb.state.families`); one removed from its pool
        (reload, DNS) counts on while its tunnels run, as /status shows it, so that
        lb_active_connections sums to the live tunnels; it has no state.  A `departed` one (gone, no
        tunnel, its series still kept) shows its counters only.  Each slice reads the backends as
        they are when it is built."""
        in_pools = [(pool.name, backend) for pool in ctx.pools.values() for backend in pool.backends.values()]
        live = [*in_pools, *retired]
        yield from in_slices(_family(GaugeMetricFamily, *_ACTIVE), live, _add_active)
        yield from in_slices(_family(GaugeMetricFamily, *_UP), in_pools, _add_up)  # a retired one has no health
        yield from in_slices(_family(GaugeMetricFamily, *_STATE), in_pools, _add_states, len(BackendState))
        # The per-backend counters /status shows, under the same names (lb ctl status, the dashboard);
        # counted once per body, as /status counts them.
        counts = ctx.stats.backend_counts()
        # A departed backend forgotten since the render began (its counts and its observations go
        # together) is left out, not shown at 0: a counter going backwards.  Its counts, once read
        # here, are this body's to the end.
        observations = ctx.observations
        keys = [
            *((pool, backend.id) for pool, backend in live),
            *(key for key in departed if key in counts or observations.holds_backend(*key)),
        ]
        for attribute, described in _BACKEND_COUNTERS.items():
            yield from in_slices(_family(CounterMetricFamily, *described), keys, _counted(counts, attribute))


# (name, help, labels) of the per-backend families.
_Described = tuple[str, str, list[str]]
_ACTIVE: _Described = (
    "lb_active_connections", "Live tunnels and in-flight handshakes per backend.", ["pool", "backend"]
)
_UP: _Described = ("lb_backend_up", "1 if the backend passes health checks.", ["pool", "backend"])
_STATE: _Described = ("lb_backend_state", "1 for the backend's current state.", ["pool", "backend", "state"])
_BACKEND_COUNTERS: dict[str, _Described] = {
    "handshakes": (
        "lb_backend_handshakes", "Handshakes and requests answered by the backend.", ["pool", "backend"]
    ),
    "affinity_hits": (
        "lb_backend_affinity_hits", "Handshakes whose token pinned them here.", ["pool", "backend"]
    ),
    "redispatches": (
        "lb_backend_redispatches", "Handshakes sent here because their pinned backend could not take them.",
        ["pool", "backend"],
    ),
}


def _family(kind: Callable[..., Family], name: str, documentation: str, labels: list[str]) -> Callable[[], Family]:
    """A maker of empty slices of one family (`in_slices`)."""
    return lambda: kind(name, documentation, labels=labels)


def _add_active(family: GaugeMetricFamily, row: tuple[str, BackendStatus]) -> None:
    pool, backend = row
    family.add_metric([pool, backend.id], backend.connections)


def _add_up(family: GaugeMetricFamily, row: tuple[str, BackendStatus]) -> None:
    pool, backend = row
    family.add_metric([pool, backend.id], 1 if backend.healthy else 0)


def _add_states(family: GaugeMetricFamily, row: tuple[str, BackendStatus]) -> None:
    pool, backend = row
    for candidate in BackendState:
        family.add_metric([pool, backend.id, candidate.value], 1 if backend.state is candidate else 0)


def _counted(
    counts: Mapping[tuple[str, str], BackendCounts], attribute: str
) -> Callable[[CounterMetricFamily, tuple[str, str]], None]:
    def add(family: CounterMetricFamily, key: tuple[str, str]) -> None:
        family.add_metric(list(key), getattr(counts.get(key, _NONE_COUNTED), attribute))

    return add


def _process_samples(pid: int | str) -> dict[str, float]:
    """process_* sample name → value for one process, read from /proc (empty once it is gone)."""
    values: dict[str, float] = {}
    for family in ProcessCollector(pid=lambda: pid, registry=None).collect():
        for sample in family.samples:
            values[sample.name] = sample.value
    return values


class AllProcessesCollector(Collector):
    """process_* for the owner plus every worker (`workers: N`), so dashboards see the whole instance.

    CPU and memory are summed (what the instance costs); process_cpu_seconds_total keeps the last
    CPU time of each worker that died, so it never goes backwards.  `lb_worker_*{pid}` gives each
    live worker on its own.  Start time and fd limit are the owner's.
    """

    _SUMMED = ("process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds")

    def __init__(self, worker_pids: Callable[[], list[int]]) -> None:
        self._worker_pids = worker_pids
        self._last_cpu: dict[int, float] = {}
        self._departed_cpu = 0.0
        self._shown_cpu = 0.0

    def collect(self) -> Iterator[Metric]:
        own = _process_samples("self")
        workers = {pid: _process_samples(pid) for pid in self._worker_pids()}
        workers = {pid: values for pid, values in workers.items() if values}
        for pid in list(self._last_cpu):
            if pid not in workers:
                self._departed_cpu += self._last_cpu.pop(pid)
        for pid, values in workers.items():
            self._last_cpu[pid] = values.get("process_cpu_seconds_total", 0.0)
        cpu = CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU time of the owner and every worker, in seconds."
        )
        own_cpu = own.get("process_cpu_seconds_total", 0.0)
        # Never less than shown before: a dying worker's time moves into `_departed_cpu`, the floats
        # are then added in another order, and the sum can come out an ulp lower (2.62 shown as
        # 2.6199999999999997), which Prometheus takes for a counter reset: a false spike in rate().
        self._shown_cpu = max(self._shown_cpu, own_cpu + self._departed_cpu + sum(self._last_cpu.values()))
        cpu.add_metric([], self._shown_cpu)
        yield cpu
        for name in self._SUMMED:
            total = GaugeMetricFamily(name, f"{name} summed over the owner and its workers.")
            total.add_metric([], own.get(name, 0.0) + sum(v.get(name, 0.0) for v in workers.values()))
            yield total
        for name in ("process_start_time_seconds", "process_max_fds"):
            if name in own:
                single = GaugeMetricFamily(name, f"{name} of the owner process.")
                single.add_metric([], own[name])
                yield single
        rss = GaugeMetricFamily("lb_worker_resident_memory_bytes", "Resident memory of each live worker.",
                                labels=["pid"])
        worker_cpu = CounterMetricFamily("lb_worker_cpu_seconds", "CPU time of each live worker.", labels=["pid"])
        for pid, values in workers.items():
            rss.add_metric([str(pid)], values.get("process_resident_memory_bytes", 0.0))
            worker_cpu.add_metric([str(pid)], values.get("process_cpu_seconds_total", 0.0))
        yield rss
        yield worker_cpu


def make_registry(
    get_context: Callable[[], ProxyContext],
    reloads: Callable[[], ReloadResults] | None = None,
    worker_pids: Callable[[], list[int]] | None = None,
    retired: Retired | None = None,
    departed: Departed | None = None,
    workers: Callable[[], WorkerCounts] | None = None,
) -> SlicedRegistry:
    """A registry of our own (not the global one), so tests and reloads never collide; /metrics renders
    it a slice at a time (`lb.control.exposition`).

    Args:
        reloads: the reloads' results, for lb_config_reloads_total and lb_config_last_reload_successful.
        worker_pids: the owner of `workers: N` passes its live workers; process_* then covers them.
        retired: backends removed from their pool (reload, DNS) whose tunnels still run.
        departed: every (pool, backend) gone from its pool whose series are still kept (lb.state.series).
        workers: the owner of `workers: N` passes how many workers it runs, serve and has restarted
            (`WorkersCollector`).
    """
    registry = SlicedRegistry()
    registry.register(LbCollector(get_context, reloads, retired, departed))
    if worker_pids is None:
        ProcessCollector(registry=registry)
    else:
        registry.register(AllProcessesCollector(worker_pids))
    if workers is not None:
        registry.register(WorkersCollector(workers))
    PlatformCollector(registry=registry)
    return registry


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerCounts:
    configured: int  # `workers: N`
    serving: int  # as /readyz and /status count them
    restarts: int  # workers replaced after they died (exited, or killed unresponsive), since start


class WorkersCollector(Collector):
    """`lb_workers{state}` and `lb_worker_restarts_total`: /status's `workers`, for alerts.  A worker that
    crash-loops (a port it cannot bind, a bug at start) left the instance at part of its capacity with
    /readyz at 200, seen only in the log."""

    def __init__(self, counts: Callable[[], WorkerCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        workers = GaugeMetricFamily("lb_workers", "Worker processes: configured (workers: N) and serving now.",
                                    labels=["state"])
        workers.add_metric(["configured"], counts.configured)
        workers.add_metric(["serving"], counts.serving)
        yield workers
        restarts = CounterMetricFamily("lb_worker_restarts", "Workers replaced after they died, since start.")
        restarts.add_metric([], counts.restarts)
        yield restarts
