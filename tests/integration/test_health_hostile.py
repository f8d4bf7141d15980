"""Health answers from a hostile or broken backend: huge, endless, stalled, dripping, oversized, malformed heads.

The status line and headers are the answer (and carry `X-Backend-State`): a body that is huge or
never ends must neither be buffered nor turn a healthy answer into a failure, while a head that
never completes, or is absurdly large, is a failed check.  Throughout, the balancer stays
responsive and every probe stays bounded in bytes and time.

Each backend is a thread that serves one script on every connection; every loop is bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import UNIT
from tests.harness.clients import find_backend, status, wait_for_state
from tests.harness.processes import Launcher, lb_config
from tests.harness.tcp import ThreadedServer

MAX_SECONDS = 20.0
CHUNK = b"x" * 65536
HUGE_BODY = 100 * 1024 * 1024


class HealthScript:
    """A backend answering every health check with `script(self, conn)`; counts the body bytes it managed to send."""

    def __init__(self, backend_id: str, script: Callable[[HealthScript, socket.socket], None]) -> None:
        self.id = backend_id
        self.script = script
        self.sent = 0
        self.connections = 0
        self.lock = threading.Lock()
        self.server = ThreadedServer(self._serve, name=backend_id)
        self.stop = self.server.stop
        self.pause = self.server.pause
        self.address = self.server.address

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2.0)
            with self.lock:
                self.connections += 1
            conn.recv(4096)  # the probe's request head
            self.script(self, conn)

    def count(self, n: int) -> None:
        with self.lock:
            self.sent += n

    def close(self) -> None:
        self.server.close()


def huge_body(server: HealthScript, conn: socket.socket) -> None:
    """200 announcing 100 MiB, streamed as fast as the peer reads (bounded by its size and MAX_SECONDS)."""
    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE_BODY}\r\nX-Backend-State: draining\r\n\r\n".encode())
    deadline = time.monotonic() + MAX_SECONDS
    left = HUGE_BODY
    while left > 0 and time.monotonic() < deadline and not server.stop.is_set():
        conn.sendall(CHUNK)
        server.count(len(CHUNK))
        left -= len(CHUNK)


def stalled_body(server: HealthScript, conn: socket.socket) -> None:
    """200 with a body announced and never sent; odd casing and padding on the state header."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nx-backend-STATE:   Draining  \r\n\r\n")
    server.pause(MAX_SECONDS)


def endless_chunks(server: HealthScript, conn: socket.socket) -> None:
    """200, chunked, one small chunk every 50 ms, never the last one."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline and server.pause(0.05):
        conn.sendall(b"2\r\nok\r\n")


def dripping_head(server: HealthScript, conn: socket.socket) -> None:
    """A head that never ends: one header line every 100 ms."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    deadline = time.monotonic() + MAX_SECONDS
    n = 0
    while time.monotonic() < deadline and server.pause(0.1):
        conn.sendall(f"X-Drip-{n}: 1\r\n".encode())
        n += 1


def giant_header(server: HealthScript, conn: socket.socket) -> None:
    """A single 1 MiB header value."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\nContent-Length: 0\r\n\r\n")
    server.pause(1.0)


def answer(raw: bytes) -> Callable[[HealthScript, socket.socket], None]:
    """A fixed answer, then the connection stays open a moment (the probe must not wait for its end)."""

    def script(server: HealthScript, conn: socket.socket) -> None:
        conn.sendall(raw)
        server.pause(1.0)

    return script


SCRIPTS: dict[str, tuple[Callable[[HealthScript, socket.socket], None], str]] = {
    "huge": (huge_body, "draining"),
    "stalled": (stalled_body, "draining"),
    "chunks": (endless_chunks, "up"),
    "drip": (dripping_head, "down"),
    "giant": (giant_header, "down"),
    # Judged by the proxy's own parser: what every handshake would get a 502 for fails its check too.
    "bare-lf": (answer(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"), "down"),
    "folded": (answer(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n"), "down"),
    "status-000": (answer(b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"), "down"),
    "two-lengths": (answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"), "down"),
    "early-hints": (answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"), "up"),
    "switch": (answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"), "down"),
    "banner": (answer(b"SSH-2.0-OpenSSH_9.2\r\n"), "down"),
    "closer": (lambda server, conn: None, "down"),  # reads the request, then closes without a word
    # Two lines of the state header are one list (RFC 9110 §5.3): a `draining` in it wins in either order.
    "up-draining": (answer(b"HTTP/1.1 200 OK\r\nX-Backend-State: up\r\nX-Backend-State: draining\r\n"
                           b"Content-Length: 0\r\n\r\n"), "draining"),
    "draining-up": (answer(b"HTTP/1.1 200 OK\r\nX-Backend-State: draining\r\nX-Backend-State: up\r\n"
                           b"Content-Length: 0\r\n\r\n"), "draining"),
    # A gateway failing its readiness while it drains: draining, whatever the status (SPEC); saying `up`, down.
    "503-draining": (answer(b"HTTP/1.1 503 Service Unavailable\r\nX-Backend-State: draining\r\n"
                            b"Content-Length: 0\r\n\r\n"), "draining"),
    "503-up": (answer(b"HTTP/1.1 503 Service Unavailable\r\nX-Backend-State: up\r\nContent-Length: 0\r\n\r\n"),
               "down"),
}
# Failed at once with a reason, not after the whole timeout with "no answer".
QUICK_REASONS = {
    "bare-lf": "not a valid HTTP answer", "switch": "not a valid HTTP answer", "banner": "not a valid HTTP answer",
    "closer": "closed without answering",
}


@pytest.fixture
def hostile() -> Iterator[list[HealthScript]]:
    servers: list[HealthScript] = []
    try:
        for name, (script, _) in SCRIPTS.items():
            servers.append(HealthScript(name, script))
        yield servers
    finally:
        for server in servers:
            server.close()


async def test_hostile_health_answers_are_bounded_and_judged_by_their_head(
    launcher: Launcher, hostile: list[HealthScript]
) -> None:
    """Hostile health answers (huge, stalled, endless, malformed) get a stable verdict from their head, cost a bounded
    read per probe, and show a bounded reason in /status."""
    health: dict[str, Any] = {"type": "http", "path": "/health", "interval": "300ms", "timeout": "1s",
                              "rise": 1, "fall": 1}
    lb = launcher.balancer(lb_config(pools={"gateways": hostile}, health=health))
    for name, (_, expected) in SCRIPTS.items():
        await wait_for_state(lb, "gateways", name, expected, within=10 * UNIT)
    # Several probes later, the verdicts hold and nothing was buffered beyond a few socket buffers per probe.
    started = time.monotonic()
    while time.monotonic() - started < 2 * UNIT:
        document = await status(lb)
        for name, (_, expected) in SCRIPTS.items():
            assert find_backend(document, "gateways", name)["state"] == expected, name
        await asyncio.sleep(0.1)  # a few reads per 300 ms probe interval, not hundreds a second
    # What a probe "took" is what fit in the loopback socket buffers before it hung up: a few MB, never 100.
    huge = next(s for s in hostile if s.id == "huge")
    per_probe = huge.sent / max(1, huge.connections)
    assert per_probe < HUGE_BODY / 4, f"{per_probe:.0f} bytes of health answer per probe"
    # What /status says of a broken answer is a bounded summary, never the backend's bytes echoed.
    document = await status(lb)
    reason = find_backend(document, "gateways", "giant")["reason"]
    assert "aaaa" not in reason and len(reason) < 200 and "too large" in reason, reason
    for name, reason in QUICK_REASONS.items():
        assert reason in find_backend(document, "gateways", name)["reason"], name
    lb.assert_alive()
