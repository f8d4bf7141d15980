"""`lb_discovery_lookups_total` and `lb_discovery_errors_total` are counters of a pool: a reload that drops
the pool's discovery (or the pool) and a later one that brings it back must not start them again from 0
(SPEC: counters never go backwards).  `lb.control.discovery.DiscoveryManager`, no DNS answers."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from lb.config.model import BackendConfig, DiscoveryConfig, PoolConfig
from lb.control.discovery import DiscoveryManager

STATIC = (BackendConfig("gw-1", "127.0.0.1", 9),)


def _pool(dns: str | None) -> PoolConfig:
    found = DiscoveryConfig(dns, nameservers=(("127.0.0.1", 9),), timeout=0.1) if dns else None
    return PoolConfig("gateways", STATIC, discovery=found)


def _counted(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"pool": "gateways"})


def test_counts_go_on_when_a_reload_drops_discovery_and_a_later_one_restores_it() -> None:
    async def scenario() -> list[tuple[float | None, float | None]]:
        registry = CollectorRegistry()
        manager = DiscoveryManager(lambda _pool, _backends: None, registry)
        seen = []
        manager.start({"gateways": _pool("_ws._tcp.gw.test")})
        (loop,) = manager._loops.values()
        loop.status.lookups, loop.status.errors = 7, 3  # as if it had run a while
        for pools in (
            {"gateways": _pool(None)},  # discovery dropped for a while (static backends only)
            {"gateways": _pool("_ws._tcp.gw.test")},  # and back
        ):
            manager.start(pools)
            seen.append((_counted(registry, "lb_discovery_lookups_total"),
                         _counted(registry, "lb_discovery_errors_total")))
        await manager.stop()
        return seen

    dropped, restored = asyncio.run(scenario())
    assert dropped == (None, None)  # no loop, no series (stale to Prometheus, not a reset)
    assert restored[0] is not None and restored[0] >= 7 and restored[1] is not None and restored[1] >= 3


def test_records_an_answer_left_out_are_a_gauge() -> None:
    """What /status shows as `skipped` (bad records, or past max_backends) is in the metrics too, for an alert."""
    async def scenario() -> tuple[float | None, float | None]:
        registry = CollectorRegistry()
        manager = DiscoveryManager(lambda _pool, _backends: None, registry)
        manager.start({"gateways": _pool("_ws._tcp.gw.test")})
        (loop,) = manager._loops.values()
        before = _counted(registry, "lb_discovery_skipped_records")
        loop.status.skipped = 5  # as a lookup records it
        after = _counted(registry, "lb_discovery_skipped_records")
        await manager.stop()
        return before, after

    assert asyncio.run(scenario()) == (0.0, 5.0)
