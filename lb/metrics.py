"""Prometheus exposition: one registry, lb_* metrics read from live state at scrape time.

Nothing on the per-message or per-handshake path touches prometheus-client:
handlers bump plain integers (`context.Stats`, `pool.BackendStatus`, tunnel
byte counts) and this collector turns them into metric families when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lb.context import ProxyContext
from lb.pool import BackendState


class LbCollector(Collector):
    def __init__(self, get_context: Callable[[], ProxyContext]) -> None:
        self._get_context = get_context

    def collect(self) -> Iterator[Metric]:
        ctx = self._get_context()
        yield from self._backends(ctx)
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
        for (pool, result), count in stats.decisions.items():
            decisions.add_metric([pool, result], count)
        yield decisions
        invalid = CounterMetricFamily(
            "lb_affinity_invalid_tokens", "Affinity tokens treated as absent, by reason.", labels=["reason"]
        )
        for reason, count in stats.invalid_tokens.items():
            invalid.add_metric([reason], count)
        yield invalid
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
        # Latency histograms, backend errors and health checks (lb.observations), workers summed.
        known = [(pool.name, backend_id) for pool in ctx.pools.values() for backend_id in pool.backends]
        yield from ctx.observations.families(known)

    @staticmethod
    def _backends(ctx: ProxyContext) -> Iterator[Metric]:
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
        for pool in ctx.pools.values():
            for backend in pool.backends.values():
                labels = [pool.name, backend.id]
                for attribute, family in backend_counters.items():
                    family.add_metric(labels, getattr(backend, attribute))
                active.add_metric(labels, backend.connections)
                up.add_metric(labels, 1 if backend.healthy else 0)
                for candidate in BackendState:
                    state.add_metric([*labels, candidate.value], 1 if backend.state is candidate else 0)
        yield active
        yield up
        yield state
        yield from backend_counters.values()


def make_registry(get_context: Callable[[], ProxyContext]) -> CollectorRegistry:
    """A registry of our own (not the global one), so tests and reloads never collide."""
    registry = CollectorRegistry()
    registry.register(LbCollector(get_context))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
