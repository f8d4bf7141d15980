"""Prometheus exposition: one registry, lb_* metrics read from live state at scrape time.

Nothing on the per-message or per-handshake path touches prometheus-client:
handlers bump plain integers (`context.Stats`, `pool.BackendStatus`, tunnel
byte counts) and this collector turns them into metric families when scraped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import ClassVar

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lb import __version__
from lb.config.model import Config
from lb.state.context import BackendCounts, ProxyContext
from lb.state.pool import BackendState, BackendStatus

_NONE_COUNTED = BackendCounts()  # a backend that has answered nothing yet


def config_hash(config: Config) -> str:
    """A short digest of the effective configuration: replicas whose hashes differ run different configs.

    The repr of the frozen dataclasses covers every key with its default filled in, so two files that
    differ only in comments or key order hash alike.  `workers: auto` is hashed as written, not as the
    number it came to on this machine: replicas on nodes of different sizes run the same config.
    12 hex digits: a label, not a security boundary.
    """
    if config.workers_auto:
        config = dataclasses.replace(config, workers=0)
    return hashlib.sha256(repr(config).encode()).hexdigest()[:12]


class CostlyScrapes:
    """The last /metrics body, served again for a while when rendering it was costly.

    A scrape renders on the event loop the data plane shares, and its cost grows with the backends
    (about 0.37 ms each: a connect-latency histogram, error kinds and states per backend).  At 1,000
    backends one render is about 0.4 s, and an address that can reach the admin port could render
    back to back: every handshake of the process waited behind it.  So a render that cost `COSTLY`
    or more is served again until `SHARE` times its duration has passed: scrapes then take at most
    1/(SHARE+1) of the loop, whoever asks how often.  A cheaper render (a few backends: about 3 ms)
    is never reused, so every scrape of a small pool sees the counters as they are.  The cost is
    the render's CPU time, not its wall time: on a loaded machine a cheap render may take long to
    finish, and that is no reason to serve old counters.
    """

    COSTLY: ClassVar[float] = 0.05  # seconds of CPU: about 130 backends
    SHARE: ClassVar[int] = 10

    __slots__ = ("_body", "_until")

    def __init__(self) -> None:
        self._body = b""
        self._until = -math.inf

    def body(self, render: Callable[[], bytes], clock: Callable[[], float], cpu: Callable[[], float]) -> bytes:
        """The body to answer with: the last one while it may be reused, else `render()`.

        `clock` tells when (monotonic), `cpu` what the render cost (this thread's CPU time).
        """
        now = clock()
        if now < self._until:
            return self._body
        spent = cpu()
        body = render()
        cost, done = cpu() - spent, clock()
        # Reused for SHARE times what the loop waited for it (its wall time: on a loaded machine more
        # than its CPU), so the share holds whatever else runs.
        self._body, self._until = (body, done + (done - now) * self.SHARE) if cost >= self.COSTLY else (b"", -math.inf)
        return body


Retired = Callable[[], list[tuple[str, BackendStatus]]]  # backends gone from their pool, tunnels still live
Departed = Callable[[], Iterable[tuple[str, str]]]  # (pool, backend) gone, its series still kept (lb.state.series)


class LbCollector(Collector):
    def __init__(
        self, get_context: Callable[[], ProxyContext], reloads: Callable[[], Mapping[str, int]] | None = None,
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

    def collect(self) -> Iterator[Metric]:
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
            counts = self._reloads()
            for result in ("success", "failure"):
                reloads.add_metric([result], counts.get(result, 0))
            yield reloads
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
        for (pool, result), count in stats.pool_decisions().items():
            decisions.add_metric([pool, result], count)
        yield decisions
        invalid = CounterMetricFamily(
            "lb_affinity_invalid_tokens", "Affinity tokens treated as absent, by reason.", labels=["reason"]
        )
        for reason, count in stats.invalid_tokens.items():
            invalid.add_metric([reason], count)
        yield invalid
        unsealed = CounterMetricFamily(
            "lb_affinity_unsealed_cookies",
            "Rewrite mode: backend cookie values too large to seal, passed through unsealed.",
            labels=["pool"],
        )
        for pool, count in stats.unsealed_cookies.items():
            unsealed.add_metric([pool], count)
        yield unsealed
        rejected = CounterMetricFamily(
            "lb_rejected_requests", "Requests the balancer answered itself, by status.", labels=["status"]
        )
        for status, count in stats.rejected.items():
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
            "rejects the certificate, one that never finishes).",
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
            "Tunnels the balancer ended, by cause (shutdown, drain, idle, backend_lost) and how: with a "
            "close frame, or at TCP level when none could be delivered in time.",
            labels=["cause", "ended_with"],
        )
        for (cause, ended_with), count in stats.balancer_closes.items():
            ended.add_metric([cause, ended_with], count)
        yield ended
        # Latency histograms, backend errors and health checks (lb.state.observations), workers summed.
        yield from ctx.observations.families([*present, *departed])

    @staticmethod
    def _backends(
        ctx: ProxyContext, retired: list[tuple[str, BackendStatus]], departed: list[tuple[str, str]]
    ) -> Iterator[Metric]:
        """Per backend; one removed from its pool (reload, DNS) counts on while its tunnels run, as
        /status shows it, so that lb_active_connections sums to the live tunnels; it has no state.
        A `departed` one (gone, no tunnel, its series still kept) shows its counters only."""
        active = GaugeMetricFamily(
            "lb_active_connections", "Live tunnels and in-flight handshakes per backend.",
            labels=["pool", "backend"],
        )
        up = GaugeMetricFamily("lb_backend_up", "1 if the backend passes health checks.", labels=["pool", "backend"])
        state = GaugeMetricFamily(
            "lb_backend_state", "1 for the backend's current state.", labels=["pool", "backend", "state"]
        )
        # The per-backend counters /status shows, under the same names (lb ctl status, the dashboard).
        backend_counters = {
            "handshakes": CounterMetricFamily(
                "lb_backend_handshakes", "Handshakes and requests answered by the backend.", labels=["pool", "backend"]
            ),
            "affinity_hits": CounterMetricFamily(
                "lb_backend_affinity_hits", "Handshakes whose token pinned them here.", labels=["pool", "backend"]
            ),
            "redispatches": CounterMetricFamily(
                "lb_backend_redispatches", "Handshakes sent here because their pinned backend could not take them.",
                labels=["pool", "backend"],
            ),
        }
        counts = ctx.stats.backend_counts()
        in_pools = [(pool.name, backend, True) for pool in ctx.pools.values() for backend in pool.backends.values()]
        for pool_name, backend, in_pool in [*in_pools, *((name, backend, False) for name, backend in retired)]:
            labels = [pool_name, backend.id]
            counted = counts.get((pool_name, backend.id), _NONE_COUNTED)
            for attribute, family in backend_counters.items():
                family.add_metric(labels, getattr(counted, attribute))
            active.add_metric(labels, backend.connections)
            if in_pool:  # a retired backend has no health or state any more
                up.add_metric(labels, 1 if backend.healthy else 0)
                for candidate in BackendState:
                    state.add_metric([*labels, candidate.value], 1 if backend.state is candidate else 0)
        for key in departed:
            counted = counts.get(key, _NONE_COUNTED)
            for attribute, family in backend_counters.items():
                family.add_metric(list(key), getattr(counted, attribute))
        yield active
        yield up
        yield state
        yield from backend_counters.values()


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
        cpu.add_metric([], own_cpu + self._departed_cpu + sum(self._last_cpu.values()))
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
    reloads: Callable[[], Mapping[str, int]] | None = None,
    worker_pids: Callable[[], list[int]] | None = None,
    retired: Retired | None = None,
    departed: Departed | None = None,
) -> CollectorRegistry:
    """A registry of our own (not the global one), so tests and reloads never collide.

    Args:
        reloads: counts of reloads by result ("success", "failure") for lb_config_reloads_total.
        worker_pids: the owner of `workers: N` passes its live workers; process_* then covers them.
        retired: backends removed from their pool (reload, DNS) whose tunnels still run.
        departed: every (pool, backend) gone from its pool whose series are still kept (lb.state.series).
    """
    registry = CollectorRegistry()
    registry.register(LbCollector(get_context, reloads, retired, departed))
    if worker_pids is None:
        ProcessCollector(registry=registry)
    else:
        registry.register(AllProcessesCollector(worker_pids))
    PlatformCollector(registry=registry)
    return registry
