"""SPEC part 2 "The backend can ask for a state", through the real demo gateway.

`POST /drain` on a gateway makes its health answers carry `X-Backend-State: draining`; the balancer
puts it in `draining` (no new clients, cookie holders still reach it, live tunnels untouched) for as
long as it says so; `POST /undrain` returns it.  An operator's `disable` wins over it; `workers: 2`
sees it too (the owner reads the health answers and tells its workers).  Last, the README's rolling
update of a gateway, end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any

import aiohttp

from tests.harness import ROOT, UNIT
from tests.harness.clients import (
    affinity_cookie,
    assert_echo,
    find_backend,
    recv_hello,
    status,
    visit,
    wait_for_state,
    ws_connect,
)
from tests.harness.ops import set_state, visit_until, wait_close
from tests.harness.processes import Balancer, Gateway, Launcher, child_env, lb_config


async def gateway_post(gateway: Gateway, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        gateway.url + path, timeout=aiohttp.ClientTimeout(total=5 * UNIT)
    ) as reply:
        assert reply.status == 200
        body: dict[str, Any] = await reply.json()
        return body


async def gateway_health(gateway: Gateway) -> tuple[str | None, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
        gateway.url + "/health", timeout=aiohttp.ClientTimeout(total=5 * UNIT)
    ) as reply:
        assert reply.status == 200
        return reply.headers.get("X-Backend-State"), await reply.json()


async def _stack(launcher: Launcher, **overrides: Any) -> tuple[Balancer, list[Gateway]]:
    gateways = launcher.gateways(2)
    lb = launcher.balancer(lb_config(pools={"gateways": gateways}, overrides=overrides))
    for g in gateways:
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    return lb, gateways


async def test_demo_gateway_drain_and_undrain_toggle_its_health_answer(launcher: Launcher) -> None:
    """POST /drain: /health says draining (header and body, still 200); POST /undrain: ok again."""
    [gateway] = launcher.gateways(1)
    assert await gateway_health(gateway) == ("up", {"status": "ok", "server_id": "gw-1"})
    assert (await gateway_post(gateway, "/drain"))["status"] == "draining"
    assert await gateway_health(gateway) == ("draining", {"status": "draining", "server_id": "gw-1"})
    assert (await gateway_post(gateway, "/undrain"))["status"] == "ok"
    assert (await gateway_health(gateway))[0] == "up"


async def test_no_player_can_drain_or_undrain_a_gateway_through_the_balancer(launcher: Launcher) -> None:
    """The route to `/ws` reaches `/drain` too: any client could drain every gateway (every new player then got
    a 503), or undo a rolling update's drain.  Only the gateway's own host asks, directly (the preStop)."""
    lb, gateways = await _stack(launcher)
    async with aiohttp.ClientSession() as session:
        for path in ("/drain", "/undrain") * len(gateways):  # round robin: each gateway is asked
            async with session.post(lb.http_url(path), timeout=aiohttp.ClientTimeout(total=5 * UNIT)) as reply:
                assert reply.status == 403, await reply.text()
        async with session.post(gateways[0].url + "/drain", headers={"X-Forwarded-For": "203.0.113.9"},
                                timeout=aiohttp.ClientTimeout(total=5 * UNIT)) as reply:
            assert reply.status == 403  # a proxy on this host is not this host's own hook either
    for gateway in gateways:
        assert (await gateway_health(gateway))[0] == "up"
        assert find_backend(await status(lb), "gateways", gateway.id)["state"] == "up"
    assert (await gateway_post(gateways[0], "/drain"))["status"] == "draining"  # the preStop's way still works


async def test_backend_asks_to_drain_then_comes_back(launcher: Launcher) -> None:
    """A gateway saying draining gets no new client, keeps its cookie holders and tunnels; undrained, it is up."""
    lb, (gw1, gw2) = await _stack(launcher)
    pinned = await visit_until(lb.ws_url(), gw1.id, tries=10)
    assert pinned.cookie is not None
    async with ws_connect(lb.ws_url(), cookie=pinned.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == gw1.id
        await gateway_post(gw1, "/drain")
        await wait_for_state(lb, "gateways", gw1.id, "draining", within=5 * UNIT)
        backend = find_backend(await status(lb), "gateways", gw1.id)
        assert backend["requested_state"] == "draining"
        assert "backend asks to drain" in backend["reason"]
        for _ in range(4):
            assert (await visit(lb.ws_url())).server_id == gw2.id, "a draining backend got a new client"
        sticky = await visit(lb.ws_url(), cookie=pinned.cookie.value)
        assert sticky.server_id == gw1.id, "a cookie holder of a draining backend was moved"
        await assert_echo(ws, "tunnel untouched by the drain")
        await gateway_post(gw1, "/undrain")
        await wait_for_state(lb, "gateways", gw1.id, "up", within=5 * UNIT)
        assert find_backend(await status(lb), "gateways", gw1.id)["requested_state"] is None
        await assert_echo(ws, "still untouched")
    # Back in rotation: with one tunnel open to gw-2, least_conn picks gw-1.
    async with ws_connect(lb.ws_url()) as (ws2, _):
        holder = (await recv_hello(ws2))["server_id"]
        other = gw1.id if holder == gw2.id else gw2.id
        assert (await visit(lb.ws_url())).server_id == other


async def test_operator_disable_wins_over_backend_request(launcher: Launcher) -> None:
    """disable beats a backend's draining; enable while it still asks leaves it draining."""
    lb, (gw1, _) = await _stack(launcher)
    await gateway_post(gw1, "/drain")
    await wait_for_state(lb, "gateways", gw1.id, "draining")
    assert (await set_state(lb, gw1.id, "disable"))["state"] == "disabled"
    await gateway_post(gw1, "/undrain")
    await gateway_post(gw1, "/drain")
    assert find_backend(await status(lb), "gateways", gw1.id)["state"] == "disabled"
    assert (await set_state(lb, gw1.id, "enable"))["state"] == "draining"  # the backend still asks
    await gateway_post(gw1, "/undrain")
    await wait_for_state(lb, "gateways", gw1.id, "up")


async def test_workers_see_the_backend_request(launcher: Launcher) -> None:
    """With workers: 2, no worker gives a new client to a backend that asks to drain."""
    lb, (gw1, gw2) = await _stack(launcher, workers=2)
    await gateway_post(gw1, "/drain")
    await wait_for_state(lb, "gateways", gw1.id, "draining")
    for _ in range(8):
        assert (await visit(lb.ws_url())).server_id == gw2.id


class SpreadGateway(Gateway):
    """A demo gateway started with `--close-spread S`: on SIGTERM it closes players with 1012 over S seconds."""

    spread = 1.5

    def launch(self) -> None:
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backends_demo", "--id", self.id, "--port", str(self.port),
             "--close-spread", str(self.spread)],
            cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )


async def test_rolling_update_recipe(launcher: Launcher, tmp_path: Any) -> None:
    """The README's gateway rolling update: /drain (no new players), then SIGTERM closes the rest with
    1012 spread over the window, and each reconnect with its cookie lands on another gateway."""
    leaving = SpreadGateway("gw-1", tmp_path)
    launcher.adopt(leaving)
    [staying] = launcher.gateways(1, prefix="gw-stay")
    lb = launcher.balancer(lb_config(pools={"gateways": [leaving, staying]}))
    for g in (leaving, staying):
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    async with contextlib.AsyncExitStack() as stack:
        players = []
        for _ in range(12):  # least_conn takes turns between the two: about every other one is leaving's
            ws, headers = await stack.enter_async_context(ws_connect(lb.ws_url()))
            hello = await recv_hello(ws)
            cookie = affinity_cookie(headers)
            if hello["server_id"] == leaving.id:
                assert cookie is not None
                players.append((ws, cookie.value))
                if len(players) == 3:
                    break
        assert len(players) == 3, f"{len(players)} of 12 players reached {leaving.id}"
        await gateway_post(leaving, "/drain")  # what the StatefulSet's preStop does
        await wait_for_state(lb, "gateways", leaving.id, "draining")
        assert (await visit(lb.ws_url())).server_id == staying.id
        stopping = asyncio.create_task(asyncio.to_thread(leaving.stop))  # SIGTERM after preStop
        closes = await asyncio.gather(*(wait_close(ws, 10 * UNIT) for ws, _ in players))
        await stopping
        assert {c.code for c in closes} == {1012}, closes
        times = sorted(c.at for c in closes)
        assert times[-1] - times[0] >= SpreadGateway.spread / 3, f"closed all at once: {times}"
        for _, token in players:
            again = await visit(lb.ws_url(), cookie=token)
            assert again.server_id == staying.id
            assert again.cookie is not None and again.cookie.value != token
