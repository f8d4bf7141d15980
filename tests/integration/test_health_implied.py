"""A pool that writes no `health_check`: the balancer checks that its backends are alive, not what they answer.

SPEC: "Where this page is silent, do what an operator of HAProxy, Envoy or Traefik would expect"; those
check nothing unless asked.  The implied check still sends `GET /health` every second, but any complete
HTTP answer passes: a backend that refuses everything with a 403 keeps getting handshakes, whose answer
(status, headers, refusal body) is what the client gets.  A backend that dies still goes `down` (503, or
its cookie holders redispatched), and a gateway's `X-Backend-State: draining` still drains it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import aiohttp

from tests.harness import UNIT
from tests.harness.clients import affinity_cookie, find_backend, recv_hello, status, wait_for_state, ws_connect
from tests.harness.processes import Launcher, lb_config
from tests.harness.raw import raw_exchange, upgrade_request
from tests.harness.tcp import ScriptedGateway

REFUSAL_BODY = b"no players from your region\n"
REFUSAL = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Refused-By: raw-403\r\n"
    b"Content-Length: " + str(len(REFUSAL_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + REFUSAL_BODY
)


class RefusingBackend(ScriptedGateway):
    """Answers every request, whatever its path or method, with the same 403 and its body, then closes;
    counts the `GET /health` requests (the balancer's checks) it answered."""

    def __init__(self, backend_id: str) -> None:
        self.id = backend_id
        self.health_checks = 0
        self._lock = threading.Lock()
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        if head.startswith(b"GET /health "):
            with self._lock:
                self.health_checks += 1
        conn.sendall(REFUSAL)


def without_health_check(config: dict[str, Any]) -> dict[str, Any]:
    for pool in config["pools"].values():
        del pool["health_check"]
    return config


async def test_a_backend_that_answers_403_to_everything_keeps_getting_handshakes(launcher: Launcher) -> None:
    """No `health_check`: after 3 s of checks answered 403, a handshake still gets the backend's 403 answer
    (its status, headers and body), not a 503; the backend stays `up`."""
    backend = RefusingBackend("refuser")
    try:
        lb = launcher.balancer(without_health_check(lb_config(pools={"gateways": [backend]})))
        assert lb.port is not None
        deadline = time.monotonic() + 10 * UNIT
        while backend.health_checks < 3:  # three checks a second apart: `fall` (2) failures would have been seen
            assert time.monotonic() < deadline, f"only {backend.health_checks} health check(s) within 10 s"
            await wait_for_state(lb, "gateways", "refuser", "up", within=UNIT)
            await asyncio.sleep(0.1)
        shown = find_backend(await status(lb), "gateways", "refuser")
        assert (shown["state"], shown["reason"]) == ("up", "initial state"), shown
        for _ in range(3):
            response = await raw_exchange(lb.port, upgrade_request("/ws"))
            assert response is not None
            assert (response.status, response.get("X-Refused-By"), response.body) == (403, "raw-403", REFUSAL_BODY)
    finally:
        backend.close()


async def test_a_killed_gateway_still_goes_down_without_a_health_check(launcher: Launcher) -> None:
    """No `health_check`: a killed gateway goes `down` within seconds, its cookie holder is redispatched to
    the other one; with both dead, a new client gets 503 with Retry-After."""
    gateways = launcher.gateways(2)
    lb = launcher.balancer(without_health_check(lb_config(pools={"gateways": gateways})))
    async with ws_connect(lb.ws_url()) as (ws, headers):
        pinned = (await recv_hello(ws))["server_id"]
        cookie = affinity_cookie(headers)
    assert cookie is not None
    victim = next(g for g in gateways if g.id == pinned)
    other = next(g for g in gateways if g.id != pinned)

    victim.kill()
    await wait_for_state(lb, "gateways", victim.id, "down", within=6 * UNIT)
    reason = find_backend(await status(lb), "gateways", victim.id)["reason"]
    assert reason.startswith("health check failed 2 time(s): "), reason
    async with ws_connect(lb.ws_url(), cookie=cookie.value) as (ws, headers):
        assert (await recv_hello(ws))["server_id"] == other.id
        replaced = affinity_cookie(headers)
        assert replaced is not None and replaced.value != cookie.value

    other.kill()
    await wait_for_state(lb, "gateways", other.id, "down", within=6 * UNIT)
    async with aiohttp.ClientSession() as session, session.get(
        lb.http_url("/whoami"), timeout=aiohttp.ClientTimeout(total=5 * UNIT)
    ) as reply:
        assert reply.status == 503
        assert reply.headers.get("Retry-After")


async def test_a_gateway_that_asks_to_drain_drains_without_a_health_check(launcher: Launcher) -> None:
    """No `health_check`: the demo gateway's `POST /drain` (its /health then says `X-Backend-State: draining`)
    puts it in `draining`, and `POST /undrain` brings it back."""
    [gateway] = launcher.gateways(1)
    lb = launcher.balancer(without_health_check(lb_config(pools={"gateways": [gateway]})))
    async with aiohttp.ClientSession() as session:
        for path, state in (("/drain", "draining"), ("/undrain", "up")):
            async with session.post(gateway.url + path, timeout=aiohttp.ClientTimeout(total=5 * UNIT)) as reply:
                assert reply.status == 200
            await wait_for_state(lb, "gateways", gateway.id, state, within=5 * UNIT)
