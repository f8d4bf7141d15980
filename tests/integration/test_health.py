"""SPEC "Backend states": health checks turn a dead gateway `down` and a restarted one `up`.

These tests kill gateways, so each starts its own stack: 3 gateways, health every 200 ms
(timeout 200 ms, rise 1, fall 2).  Live tunnels to other backends must never notice.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from tests.harness import UNIT
from tests.harness.clients import assert_echo, find_backend, recv_hello, status, wait_for_state, ws_connect
from tests.harness.processes import Balancer, Gateway, Launcher, lb_config


async def _stack(launcher: Launcher, n: int = 3) -> tuple[Balancer, list[Gateway]]:
    gateways = launcher.gateways(n)
    lb = launcher.balancer(lb_config(pools={"gateways": gateways}, routes={"/ws": "gateways"}))
    for g in gateways:
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    return lb, gateways


async def _spread(lb: Balancer, n: int) -> Counter[str]:
    """Open n tunnels at once (so least_conn must use every candidate) and count server ids."""
    seen: Counter[str] = Counter()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))
            seen[(await recv_hello(ws))["server_id"]] += 1
    return seen


async def test_killed_gateway_turns_down_then_up_after_restart(launcher: Launcher) -> None:
    """A gateway that stops answering turns `down` and gets no new clients; restarted, it turns `up`."""
    lb, gateways = await _stack(launcher)
    data = await status(lb)
    for g in gateways:
        backend = find_backend(data, "gateways", g.id)
        assert (backend["state"], backend["address"]) == ("up", g.address)
        assert isinstance(backend["connections"], int)

    victim, other = gateways[0], gateways[1]
    async with contextlib.AsyncExitStack() as stack:
        # A tunnel to a gateway that survives: a state change elsewhere must never disturb it.
        survivor_ws = None
        for _ in range(10):
            ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))
            if (await recv_hello(ws))["server_id"] == other.id:
                survivor_ws = ws
                break
        assert survivor_ws is not None, "could not open a tunnel to gw-2"

        victim.kill()
        took = await wait_for_state(lb, "gateways", victim.id, "down", within=5 * UNIT)
        assert took < 3 * UNIT
        seen = await _spread(lb, 6)
        assert victim.id not in seen, seen
        await assert_echo(survivor_ws, "through the outage")

        victim.start()
        await wait_for_state(lb, "gateways", victim.id, "up", within=5 * UNIT)
        seen = await _spread(lb, 9)
        assert victim.id in seen, f"restarted backend got no new clients: {seen}"
        await assert_echo(survivor_ws, "after the restart")
    for g in gateways:
        assert find_backend(await status(lb), "gateways", g.id)["state"] == "up"
