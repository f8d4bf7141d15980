"""A stall of the balancer's own event loop is not a backend's silence: no false `down` or 502 after it.

The balancer is stopped (SIGSTOP, as a paused VM, a CPU-starved container or a long GC would hold it)
just after a health check went out; the backend answers it at once, but the balancer only reads the
answer once it runs again, past the check's `timeout` by the clock.  HAProxy and Envoy judge a check's
timeout by the time the check actually had; a balancer that took its own stall for the backend's took
every backend whose check was in flight `down` (with `fall: 1`, Traefik's behaviour, at once) and
redispatched their pinned players.  Likewise a backend's answer to a handshake, which came within
`timeouts.backend_connect` while the balancer was stopped, is read before that deadline is judged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

from tests.harness import UNIT
from tests.harness.clients import http_get_async, wait_for_state
from tests.harness.ops import paused
from tests.harness.processes import Launcher, lb_config
from tests.harness.raw import open_raw, read_response, upgrade_request
from tests.harness.tcp import ScriptedGateway, switch_protocols

ANSWER_AFTER = 0.3  # the backend holds each health answer this long: the balancer is stopped by then
STALL = 2.5  # seconds the balancer is stopped: past the check's timeout and backend_connect
# Timeouts with room to spare on a loaded machine: the backend's 0.3 s is well inside them.
CHECK = {"type": "http", "path": "/health", "interval": "2s", "timeout": "1s", "rise": 2, "fall": 1}


class _HealthBackend(ScriptedGateway):
    """Answers every GET with 200 after ANSWER_AFTER (a WebSocket upgrade: 101 after ANSWER_AFTER, a health
    check at once, with `instant_health`); `asked` is set as each such request arrives."""

    id = "gw-1"

    def __init__(self, *, instant_health: bool = False) -> None:
        self.instant_health = instant_health
        self.asked = threading.Event()
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        upgrade = b"\r\nsec-websocket-key:" in head.lower()
        if not upgrade and self.instant_health:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            return
        self.asked.set()
        if not self.server.pause(ANSWER_AFTER):
            return
        if not upgrade:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            return
        switch_protocols(conn, head)
        self.server.pause(5.0)  # the tunnel, until the test ends


async def _failed_checks(lb_admin: str) -> float:
    code, _, body = await http_get_async(lb_admin)
    assert code == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("lb_health_checks_total{") and 'result="failure"' in line
    )


async def test_a_stalled_balancer_does_not_take_a_backend_it_was_checking_down(launcher: Launcher) -> None:
    """A check in flight while the balancer itself was stopped past its timeout is not a failed check."""
    backend = _HealthBackend()
    try:
        lb = launcher.balancer(lb_config(pools={"gateways": [backend]}, health=CHECK))
        await wait_for_state(lb, "gateways", backend.id, "up", within=10 * UNIT)
        assert lb.proc is not None
        for _ in range(2):
            backend.asked.clear()
            assert await asyncio.to_thread(backend.asked.wait, 5 * UNIT), "no health check came"
            with paused(lb.proc.pid):  # the check is out; its answer comes while we are stopped
                await asyncio.sleep(STALL)
            await asyncio.sleep(2.5 * UNIT)  # the check's verdict, and the next check's
            code, _, body = await http_get_async(lb.admin_url("/status"))
            assert code == 200
            state = json.loads(body)["pools"]["gateways"]["backends"][0]
            assert state["state"] == "up", f"{state}\n{lb.logs_tail()}"
        assert "is down" not in lb.log_text(), lb.logs_tail()
        assert await _failed_checks(lb.admin_url("/metrics")) == 0, lb.logs_tail()
    finally:
        backend.server.close()


async def test_a_backend_answer_that_came_while_the_balancer_was_stopped_is_read_before_its_deadline(
    launcher: Launcher,
) -> None:
    """A 101 sent 0.3 s into a 2 s `backend_connect`, the balancer stopped meanwhile for 2.5 s: the client
    gets the 101, not a 502, and the gateway is not counted a failed handshake (`fall: 1`: it stays up)."""
    backend = _HealthBackend(instant_health=True)
    try:
        config = lb_config(pools={"gateways": [backend]}, health=CHECK,
                           overrides={"timeouts": {"backend_connect": "2s", "handshake": "5s"}})
        lb = launcher.balancer(config)
        await wait_for_state(lb, "gateways", backend.id, "up", within=10 * UNIT)
        assert lb.proc is not None and lb.port is not None
        for _ in range(2):
            backend.asked.clear()
            reader, writer = await open_raw(lb.port)
            try:
                writer.write(upgrade_request("/ws"))
                assert await asyncio.to_thread(backend.asked.wait, 5 * UNIT), "the handshake never reached the backend"
                with paused(lb.proc.pid):  # the backend answers while we are stopped
                    await asyncio.sleep(STALL)
                response = await read_response(reader, within=5 * UNIT, body=False)
                assert response.status == 101, f"{response.status}\n{lb.logs_tail()}"
            finally:
                writer.transport.abort()
        assert "is down" not in lb.log_text(), lb.logs_tail()
    finally:
        backend.server.close()
