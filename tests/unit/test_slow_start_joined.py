"""Slow start for a backend that joins a running pool (a reload or a DNS answer adds it), as for one back up.

In process, one balancer, no client: the weights the balancing reads (`new_client_candidates`) are checked.
"""

from __future__ import annotations

import time
from pathlib import Path

from lb.config.load import load_config
from lb.config.model import BackendConfig
from lb.control.balancer import Balancer


def _config(backends: str, *, more_pools: str = "", discovery: bool = False) -> str:
    dns = ('    discovery: {dns: gw.test, type: srv, interval: 1h, timeout: 100ms, nameservers: ["127.0.0.1:9"]}\n'
           if discovery else "")
    return f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    balance: least_conn
    slow_start: 60s
    backends: [{backends}]
{dns}    health_check: {{type: tcp, interval: 1h}}
{more_pools}routes: [{{path_prefix: /, pool: p}}]
"""


_A = '{id: a, address: "127.0.0.1:9", weight: 10}'
_B = '{id: b, address: "127.0.0.1:19", weight: 10}'
_Q = '  q:\n    slow_start: 60s\n    backends: [{id: c, address: "127.0.0.1:29", weight: 10}]\n'


def _weights(balancer: Balancer, pool: str) -> dict[str, float]:
    return {b.id: b.weight for b in balancer.ctx.pools[pool].new_client_candidates((), time.time())}


async def test_a_backend_a_reload_adds_ramps_up_and_the_others_and_a_new_pool_do_not(tmp_path: Path) -> None:
    """At full weight from its first second, least_conn sent the added backend every new client until it held
    as many tunnels as the others (the reason slow start exists); HAProxy 2.6 ramps a server added at run time."""
    path = tmp_path / "lb.yaml"
    path.write_text(_config(_A))
    balancer = Balancer(load_config(path), path)
    await balancer.start()
    try:
        assert _weights(balancer, "p") == {"a": 10.0}  # at start: no ramp (HAProxy: never at start)
        path.write_text(_config(f"{_A}, {_B}", more_pools=_Q))
        assert await balancer.reload()
        weights = _weights(balancer, "p")
        assert weights["a"] == 10.0 and 0 < weights["b"] < 1.0, weights
        assert balancer.ctx.pools["p"].backends["b"].ramp_from is not None
        assert _weights(balancer, "q") == {"c": 10.0}  # a new pool: all its backends alike, none ramps
    finally:
        await balancer.stop()


async def test_a_backend_a_dns_answer_adds_ramps_up(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_text(_config(_A, discovery=True))
    balancer = Balancer(load_config(path), path)
    await balancer.start()
    try:
        balancer.update_discovered("p", (BackendConfig(id="d", host="127.0.0.1", port=39, weight=10),))
        weights = _weights(balancer, "p")
        assert weights["a"] == 10.0 and 0 < weights["d"] < 1.0, weights
    finally:
        await balancer.stop()


async def test_discoverys_first_answer_at_start_takes_its_full_weight(tmp_path: Path) -> None:
    """The set discovery's first lookups find while the balancer starts is its starting set: no ramp, as
    for static backends (it ramped as if added to a running pool: every discovered gateway at a tenth)."""
    path = tmp_path / "lb.yaml"
    path.write_text(_config(_A, discovery=True))
    balancer = Balancer(load_config(path), path)
    # As discovery's first lookups apply their answer: before the balancer is ready.
    balancer.update_discovered("p", (BackendConfig(id="d", host="127.0.0.1", port=39, weight=10),))
    assert _weights(balancer, "p") == {"a": 10.0, "d": 10.0}
    await balancer.start()
    await balancer.stop()
