"""SPEC part 2 at scale: three balancer instances sharing keys behind a real L4 balancer.

HAProxy in `mode tcp` (`balance roundrobin`) stands in for the cloud NLB in front of three
`lb run` processes with the same keys and the same gateways, so consecutive connections of one
client land on consecutive instances.  Skipped, with the reason, when `haproxy` is not installed.

PROXY_V2 switches the HAProxy server lines to `send-proxy-v2` and the balancers' listeners to
`proxy_protocol: true` (on since the PROXY-protocol listener, lb/proxy/preamble.py, is in).
With it on, the gateways must see the client's own address in X-Forwarded-For, not HAProxy's.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.procs import free_port
from tests.harness import HOST, UNIT
from tests.harness.clients import (
    assert_echo,
    find_backend,
    recv_hello,
    source_ips,
    status,
    visit,
    wait_for_state,
    ws_connect,
)
from tests.harness.ops import visit_until
from tests.harness.processes import (
    Balancer,
    Gateway,
    Launcher,
    connects,
    lb_config,
    log_tail,
    new_key,
    poll_while_running,
    stop_process,
)

PROXY_V2 = True  # listeners[].proxy_protocol is wired: HAProxy sends PROXY v2, the balancers read it

HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")


class HAProxy:
    """`haproxy -db -f cfg` in TCP mode, round-robin over the balancers; stopped by PID."""

    def __init__(self, workdir: Path, balancers: list[Balancer]) -> None:
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        # check-send-proxy: health checks carry the header too, so the balancers see no headerless probes.
        proxy = " send-proxy-v2 check-send-proxy" if PROXY_V2 else ""
        servers = "\n".join(
            f"    server {b.name} {HOST}:{b.port} check inter 200ms{proxy}" for b in balancers
        )
        self.config_path.write_text(
            "global\n    maxconn 2000\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n"
            f"frontend players\n    bind {HOST}:{self.port}\n    default_backend balancers\n"
            f"backend balancers\n    balance roundrobin\n{servers}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        assert HAPROXY is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        poll_while_running(
            self.proc, lambda: connects(self.port), within=10 * UNIT, who="haproxy", what="not listening",
            tail=lambda: log_tail(self.log_path),
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://{HOST}:{self.port}{path}"


class Fleet:
    def __init__(self, haproxy: HAProxy, balancers: list[Balancer], gateways: list[Gateway]) -> None:
        self.haproxy, self.balancers, self.gateways = haproxy, balancers, gateways

    async def handshakes(self) -> list[int]:
        """Handshakes each instance has relayed so far (from its /status)."""
        counts = []
        for lb in self.balancers:
            data = await status(lb)
            counts.append(sum(b["handshakes"] for b in data["pools"]["gateways"]["backends"]))
        return counts

    async def visit_counted(self, **kwargs: Any) -> tuple[int, Any]:
        """One visit through HAProxy; returns the index of the instance that relayed it, and the visit."""
        before = await self.handshakes()
        seen = await visit(self.haproxy.ws_url(), **kwargs)
        deadline = time.monotonic() + 5 * UNIT
        while True:
            after = await self.handshakes()
            moved = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a != b]
            if len(moved) == 1:
                return moved[0], seen
            assert time.monotonic() < deadline, f"cannot tell which instance relayed it: {before} -> {after}"
            await asyncio.sleep(0.05)

    async def wait_all(self, backend_id: str, state: str) -> None:
        for lb in self.balancers:
            await wait_for_state(lb, "gateways", backend_id, state, within=10 * UNIT)


@pytest.fixture
def fleet(launcher: Launcher, tmp_path: Path) -> Iterator[Fleet]:
    gateways = launcher.gateways(3)
    keys = [new_key(), new_key()]
    listener_extra = {"proxy_protocol": True} if PROXY_V2 else {}
    configs = []
    for _ in range(3):
        config = lb_config(pools={"gateways": gateways}, keys=keys)
        config["listeners"] = [{**item, **listener_extra} for item in config["listeners"]]
        configs.append(config)
    balancers = launcher.balancers(*configs, names=["lb0", "lb1", "lb2"])
    haproxy = HAProxy(tmp_path, balancers).start()
    try:
        yield Fleet(haproxy, balancers, gateways)
    finally:
        haproxy.stop()


async def _ready(fleet: Fleet) -> None:
    for g in fleet.gateways:
        await fleet.wait_all(g.id, "up")


async def test_every_reconnect_lands_on_another_instance_and_the_same_gateway(fleet: Fleet) -> None:
    """Round-robin across instances, yet every reconnect with the cookie reaches the first gateway."""
    await _ready(fleet)
    client_ip = source_ips(1, start=7)[0]
    first_instance, first = await fleet.visit_counted(source_ip=client_ip)
    assert first.cookie is not None
    if PROXY_V2:
        assert first.hello["forwarded_for"] == client_ip, "the gateway must see the client, not HAProxy"
    instances = [first_instance]
    for _ in range(6):
        instance, again = await fleet.visit_counted(cookie=first.cookie.value, source_ip=client_ip)
        assert again.server_id == first.server_id, f"instance lb{instance} sent the player elsewhere"
        instances.append(instance)
    assert all(a != b for a, b in itertools.pairwise(instances)), instances
    assert set(instances) == {0, 1, 2}


async def test_killed_gateways_clients_go_to_one_survivor_whichever_instance(fleet: Fleet) -> None:
    """After its gateway dies, a player is redispatched once; every instance then sends them to that survivor."""
    await _ready(fleet)
    first = await visit(fleet.haproxy.ws_url())
    assert first.cookie is not None
    victim = next(g for g in fleet.gateways if g.id == first.server_id)
    victim.kill()
    await fleet.wait_all(victim.id, "down")
    cookie = first.cookie.value
    survivor = None
    instances = []
    for _ in range(6):
        instance, again = await fleet.visit_counted(cookie=cookie)
        instances.append(instance)
        assert again.server_id != victim.id
        if survivor is None:
            survivor = again.server_id
            assert again.cookie is not None and again.cookie.value != cookie, "the cookie was not replaced"
        else:
            assert again.server_id == survivor, f"lb{instance} sent the player to {again.server_id}, not {survivor}"
        if again.cookie is not None:
            cookie = again.cookie.value
    assert set(instances) == {0, 1, 2}


async def test_gateway_asking_to_drain_is_drained_by_every_instance(fleet: Fleet) -> None:
    """One POST /drain on the gateway: all three instances show it draining, send it no new
    player, and still route its cookie holders to it."""
    await _ready(fleet)
    target = fleet.gateways[0]
    pinned = await visit_until(fleet.haproxy.ws_url(), target.id, tries=12)
    assert pinned.cookie is not None
    async with ws_connect(fleet.haproxy.ws_url(), cookie=pinned.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == target.id
        async with aiohttp.ClientSession() as session, session.post(f"{target.url}/drain") as reply:
            assert reply.status == 200
        await fleet.wait_all(target.id, "draining")
        for lb in fleet.balancers:
            assert find_backend(await status(lb), "gateways", target.id)["requested_state"] == "draining"
        for _ in range(6):
            instance, fresh = await fleet.visit_counted()
            assert fresh.server_id != target.id, f"lb{instance} gave a draining gateway a new player"
        for _ in range(3):
            instance, sticky = await fleet.visit_counted(cookie=pinned.cookie.value)
            assert sticky.server_id == target.id, f"lb{instance} moved a cookie holder off a draining gateway"
        await assert_echo(ws, "the live tunnel is untouched")
