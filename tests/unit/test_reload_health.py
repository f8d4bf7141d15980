"""Health checks across a reload: kept backends keep their loops; what is new to check is checked at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lb.config.load import load_config
from lb.control.balancer import Balancer
from lb.control.health import HealthChecker, ProbeResult
from lb.state.pool import BackendStatus


def _config(pools: str) -> str:
    return f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
{pools.rstrip()}
routes: [{{path_prefix: /, pool: p}}, {{path_prefix: /q, pool: q}}]
"""


BEFORE = """
  p:
    backends: [{id: a, address: "127.0.0.1:9"}, {id: b, address: "127.0.0.1:10"}]
    health_check: {type: tcp, interval: 1h}
  q:
    backends: [{id: c, address: "127.0.0.1:12"}]
    health_check: {type: tcp, interval: 1h}
"""
# a: kept as it was; b: moved; d: added; q: its checks changed.  Nothing here is due within the test
# (checks are hourly): whatever is probed after the reload is probed because of it.
AFTER = """
  p:
    backends: [{id: a, address: "127.0.0.1:9", weight: 2}, {id: b, address: "127.0.0.1:11"},
               {id: d, address: "127.0.0.1:13"}]
    health_check: {type: tcp, interval: 1h}
  q:
    backends: [{id: c, address: "127.0.0.1:12"}]
    health_check: {type: tcp, interval: 1h, timeout: 1s}
"""


def test_a_reload_probes_what_it_added_moved_or_checks_anew_and_leaves_the_rest_on_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that keeps a backend where it was keeps its checks: probing every backend at once at
    every SIGHUP was 3,000 connects in one turn of the event loop; added and moved backends, and a pool
    whose health_check changed, are probed at once, and every backend has one loop, never two."""
    probed: list[tuple[str, int]] = []

    async def check(self: HealthChecker, backend: BackendStatus) -> ProbeResult:
        probed.append((backend.id, backend.config.port))
        return ProbeResult(True, "connected")

    monkeypatch.setattr(HealthChecker, "check", check)
    config_path = tmp_path / "lb.yaml"
    config_path.write_text(_config(BEFORE))

    async def probed_soon(expected: int) -> list[tuple[str, int]]:
        """The probes made until `expected` have been (5 s at most), and any other made in a few turns more."""
        for _ in range(500):
            if len(probed) >= expected:
                break
            await asyncio.sleep(0.01)
        for _ in range(10):  # probes are immediate here: a loop due now has run within these
            await asyncio.sleep(0)
        taken = sorted(probed)
        probed.clear()
        return taken

    async def scenario() -> None:
        balancer = Balancer(load_config(config_path), config_path)
        await balancer.start()
        try:
            assert await probed_soon(3) == [("a", 9), ("b", 10), ("c", 12)]
            config_path.write_text(_config(AFTER))
            assert await balancer.reload()
            assert await probed_soon(3) == [("b", 11), ("c", 12), ("d", 13)]
            loops = sorted(name for checker in balancer._checkers for name in checker._tasks)
            assert loops == ["a", "b", "c", "d"]
            assert await balancer.reload()  # the same file again: nothing to probe
            assert await probed_soon(0) == []
        finally:
            await balancer.stop()

    asyncio.run(scenario())
