"""A scripted WebSocket backend in a thread, for what a demo gateway will not do on request.

The request path picks the script, so one backend serves every case of a test module:

- `/deaf`: read the request's head, then nothing more, without answering (an upload that never drains).
- `/unread`: after the 101, read nothing more (a wedged gateway under a client's upload).
- `/flood-http`: a plain `200` whose body (as many bytes as `/flood` sends) goes on as `/flood`'s.
- `/flood`: after the 101, send 16 KiB binary frames as fast as the peer takes them; once a send has
  been blocked for a moment the backend is `stalled` (the balancer paused reading from it because
  its client stopped reading), and it then only waits to see the connection end (`ended`).
- `/flood-then-reset`: as `/flood`, and once `stalled`, reset the connection (SO_LINGER 0: a gateway that
  crashed; its FIN would wait behind the bytes the balancer's shut window refuses).
- `/die`: send one text frame `"last words"`, then close TCP without a close frame (a crash between
  two frames).
- `/die-mid-frame`: send the header and 10 of 100 payload bytes of a frame, then close TCP.
- `/slow-frame`: one binary frame of `SLOW_FRAME_BYTES`, its payload trickled over `SLOW_FRAME_SECONDS`
  (a large message from a slow backend, or to a slow link), then `AFTER_SLOW_FRAME`; then as below.
- `/hang-up-on-close`: say nothing; on the client's close frame, close TCP without a close frame of
  its own (a sloppy but common server).
- anything else: say nothing, answer a close frame, end when the peer does.

Every loop is bounded in count and time; `close()` stops the accept thread and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import UNIT
from tests.harness.processes import Balancer, Launcher, lb_config
from tests.harness.raw import upgrade_request, ws_key
from tests.harness.tcp import ThreadedServer, read_head, switch_protocols

HOST = "127.0.0.1"
FLOOD_FRAME = b"\x82\x7e\x40\x00" + b"x" * 16384  # FIN + binary, 16-bit length 16384, unmasked
FLOOD_MAX_FRAMES = 20_000  # 320 MiB: far more than every buffer between here and a stalled client
MAX_SECONDS = 30.0
STALL = 0.3  # a send blocked this long means the peer stopped taking bytes
LAST_WORDS = b"\x81\x0alast words"
PARTIAL = b"\x82\x64" + b"y" * 10  # a frame announcing 100 bytes, cut after 10
BACKEND_CLOSE = b"\x88\x08\x03\xe8normal"  # close 1000 "normal", unmasked (server to client)
SLOW_FRAME_SECONDS = 5.0  # longer than a close's first deadline and linger together (2 + 2 s)
SLOW_FRAME_STEPS = 100
SLOW_FRAME_BYTES = 1000 * SLOW_FRAME_STEPS
AFTER_SLOW_FRAME = b"\x81\x05after"  # a text frame once the slow one is whole
# A client's binary frame of 2**40 bytes, masked with a zero key (the payload goes as it is), unfinished.
ENDLESS_FRAME = b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"\x00" * 4


class ScriptedBackend:
    """One listening socket; each connection runs the script its request path names."""

    def __init__(self, backend_id: str = "scripted") -> None:
        self.id = backend_id
        self.stalled = threading.Event()
        self.ended = threading.Event()
        self.ended_at = 0.0
        self.frames_sent = 0
        self.server = ThreadedServer(self._serve, name=backend_id)
        self._stop = self.server.stop
        self.port = self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            head = None
            with contextlib.suppress(OSError):
                head = read_head(conn)
            if head is None:
                return  # a TCP health check: connect, then close
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if " " not in request_line:
                return
            path = request_line.split(" ")[1]
            if path.startswith("/deaf"):  # takes the request's head, then never reads again
                self.stalled.set()
                self._stop.wait(MAX_SECONDS)
                return
            if path.startswith("/flood-http"):  # a plain answer whose body never ends for a client that reads
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             + f"Content-Length: {FLOOD_MAX_FRAMES * len(FLOOD_FRAME)}\r\n\r\n".encode())
                self._flood(conn)
                return
            switch_protocols(conn, head)
            if path.startswith("/unread"):
                self.stalled.set()
                self._stop.wait(MAX_SECONDS)
            elif path.startswith("/flood-then-reset"):
                self._flood(conn, reset=True)
            elif path.startswith("/flood"):
                self._flood(conn)
            elif path.startswith("/die-mid-frame"):
                conn.sendall(PARTIAL)
                time.sleep(0.2)  # let the partial frame reach the client before the FIN
            elif path.startswith("/die"):
                conn.sendall(LAST_WORDS)
                time.sleep(0.2)
            elif path.startswith("/slow-frame"):
                self._slow_frame(conn)
                self._hold(conn)
            elif path.startswith("/hang-up-on-close"):
                self._hold(conn, hang_up_on_close=True)
            elif path.startswith("/close-first"):  # begins the close handshake, then waits for the answer
                conn.sendall(BACKEND_CLOSE)
                self._hold(conn, closed=True)
            else:
                self._hold(conn)

    def _hold(self, conn: socket.socket, *, closed: bool = False, hang_up_on_close: bool = False) -> None:
        """Say nothing; answer a close frame with a close frame (unless `closed`: ours went first; or
        `hang_up_on_close`: end instead); end when the peer does."""
        conn.settimeout(0.2)
        deadline = time.monotonic() + MAX_SECONDS
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                if data[0] & 0x0F == 0x8 and hang_up_on_close:
                    return
                if data[0] & 0x0F == 0x8 and not closed:
                    conn.sendall(b"\x88\x02\x03\xe9")  # close 1001 back (RFC 6455 §5.5.1)

    def _slow_frame(self, conn: socket.socket) -> None:
        step = SLOW_FRAME_BYTES // SLOW_FRAME_STEPS
        with contextlib.suppress(OSError):
            conn.sendall(b"\x82\x7f" + SLOW_FRAME_BYTES.to_bytes(8, "big"))
            for _ in range(SLOW_FRAME_STEPS):
                if self._stop.wait(SLOW_FRAME_SECONDS / SLOW_FRAME_STEPS):
                    return
                conn.sendall(b"s" * step)
            conn.sendall(AFTER_SLOW_FRAME)

    def _flood(self, conn: socket.socket, *, reset: bool = False) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        conn.settimeout(STALL)
        try:
            while self.frames_sent < FLOOD_MAX_FRAMES and time.monotonic() < deadline and not self._stop.is_set():
                try:
                    conn.sendall(FLOOD_FRAME)
                except TimeoutError:
                    self.stalled.set()
                    break
                self.frames_sent += 1
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.ended_at = time.monotonic()
                self.ended.set()
                return  # closed by the caller's `with`: with linger 0, an RST
            # Only watch for the end now: a reset or an EOF from the balancer.
            while time.monotonic() < deadline and not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        break
                except TimeoutError:
                    continue
        except OSError:
            pass
        self.ended_at = time.monotonic()
        self.ended.set()

    def close(self) -> None:
        self.server.close()


TCP_HEALTH = {"type": "tcp", "interval": "300ms", "timeout": "1s", "rise": 1, "fall": 3}


def start(
    launcher: Launcher, backend: Any, tls: tuple[Path, Path] | None = None, event_loop: str | None = None,
    **timeouts: str,
) -> Balancer:
    overrides: dict[str, Any] = {"limits": {"handshake_rate_per_ip": 0}, "timeouts": timeouts}
    if event_loop is not None:
        overrides["runtime"] = {"event_loop": event_loop}
    config = lb_config(pools={"scripted": [backend]}, tls=tls, health=TCP_HEALTH, overrides=overrides)
    lb = launcher.balancer(config)
    lb.wait_states({("scripted", backend.id): "up"})
    return lb


async def _connected(lb: Balancer, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking socket connected to the balancer's listener, with this receive buffer if given."""
    assert lb.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, lb.port)), 5 * UNIT)
    return sock


async def _sent_and_answered(sock: socket.socket, request: bytes, status: bytes) -> None:
    """Send `request` and read the answer's head byte by byte, leaving every frame after it unread; the head
    starts with `status` (b"HTTP/1.1 101")."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    head = b""
    async with asyncio.timeout(5 * UNIT):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(status), head


async def stalled_client(lb: Balancer, path: str = "/flood") -> socket.socket:
    """A client that completes the upgrade (or, for `/flood-http`, reads the answer's head), then never
    reads again (a tiny receive buffer)."""
    sock = await _connected(lb, rcvbuf=4096)
    plain = path.startswith("/flood-http")
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{lb.port}\r\n\r\n".encode() if plain else upgrade_request(
        path, host=f"{HOST}:{lb.port}", key=ws_key()
    )
    await _sent_and_answered(sock, request, b"HTTP/1.1 200" if plain else b"HTTP/1.1 101")
    return sock


async def stalled_upload(lb: Balancer) -> socket.socket:
    """A client that sends a `/deaf` request's head and then as much of its huge body as the kernel takes."""
    sock = await _connected(lb)
    head = f"POST /deaf HTTP/1.1\r\nHost: {HOST}:{lb.port}\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, head)
    await _send_until_refused(sock)
    return sock


async def stalled_tunnel_upload(lb: Balancer) -> socket.socket:
    """A client whose upgrade to `/unread` is answered, and which then sends one endless binary frame
    for as long as anything takes it."""
    sock = await _connected(lb)
    await _sent_and_answered(sock, upgrade_request("/unread", host=f"{HOST}:{lb.port}", key=ws_key()), b"HTTP/1.1 101")
    await asyncio.get_running_loop().sock_sendall(sock, ENDLESS_FRAME)
    await _send_until_refused(sock)
    return sock


async def _send_until_refused(sock: socket.socket) -> None:
    """Send on the non-blocking `sock` until nothing more is taken for half a second (bounded)."""
    chunk = b"u" * 65536
    deadline = time.monotonic() + 10 * UNIT
    idle_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - idle_since < 0.5:  # until nothing more is taken
        try:
            if sock.send(chunk):
                idle_since = time.monotonic()
        except BlockingIOError:
            await asyncio.sleep(0.02)


def _tls_client(lb: Balancer, ca: Path, rcvbuf: int | None) -> ssl.SSLSocket:
    assert lb.tls_port is not None
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window follows it
    raw.settimeout(5 * UNIT)
    raw.connect((HOST, lb.tls_port))
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=HOST)


def _stalled_tls_client(lb: Balancer, ca: Path, path: str) -> ssl.SSLSocket:
    sock = _tls_client(lb, ca, rcvbuf=4096)
    sock.sendall(upgrade_request(path, host=f"{HOST}:{lb.tls_port}", key=ws_key()))
    head = read_head(sock)  # byte by byte: leave every frame after the head unread
    assert head is not None and head.startswith(b"HTTP/1.1 101"), head
    return sock


def _stalled_tls_upload(lb: Balancer, ca: Path) -> ssl.SSLSocket:
    sock = _tls_client(lb, ca, rcvbuf=None)
    sock.sendall(f"POST /deaf HTTP/1.1\r\nHost: {HOST}:{lb.tls_port}\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
    _send_tls_until_refused(sock)
    return sock


def _send_tls_until_refused(sock: ssl.SSLSocket) -> None:
    """Send on the blocking `sock` until a send is blocked for half a second (bounded)."""
    sock.settimeout(0.5)  # a send blocked this long: nothing more is taken
    chunk = b"u" * 16384  # one TLS record
    deadline = time.monotonic() + 10 * UNIT
    with contextlib.suppress(TimeoutError):
        while time.monotonic() < deadline:
            sock.sendall(chunk)


def _stalled_tls_tunnel_upload(lb: Balancer, ca: Path) -> ssl.SSLSocket:
    sock = _tls_client(lb, ca, rcvbuf=None)
    sock.sendall(upgrade_request("/unread", host=f"{HOST}:{lb.tls_port}", key=ws_key()))
    head = read_head(sock)  # byte by byte: leave every frame after the head unread
    assert head is not None and head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(ENDLESS_FRAME)
    _send_tls_until_refused(sock)
    return sock


async def _in_own_thread(blocking: Callable[[], ssl.SSLSocket]) -> ssl.SSLSocket:
    """Run `blocking` in a thread of its own: stalls started together must all be under way at once
    (the default executor's few threads would run them a few at a time)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ssl.SSLSocket] = loop.create_future()

    def run() -> None:
        try:
            result = blocking()
        except BaseException as exc:  # handed to the awaiting task as it is
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=run, daemon=True).start()
    return await done


async def stalled_tls_client(lb: Balancer, ca: Path, path: str = "/flood") -> ssl.SSLSocket:
    """`stalled_client` over the TLS listener: the upgrade done, then nothing read."""
    return await _in_own_thread(lambda: _stalled_tls_client(lb, ca, path))


async def stalled_tls_upload(lb: Balancer, ca: Path) -> ssl.SSLSocket:
    """`stalled_upload` over the TLS listener: a huge body sent until the balancer takes no more."""
    return await _in_own_thread(lambda: _stalled_tls_upload(lb, ca))


async def stalled_tls_tunnel_upload(lb: Balancer, ca: Path) -> ssl.SSLSocket:
    """`stalled_tunnel_upload` over the TLS listener."""
    return await _in_own_thread(lambda: _stalled_tls_tunnel_upload(lb, ca))
