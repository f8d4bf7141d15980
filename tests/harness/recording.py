"""A recording raw-socket backend: every byte the balancer sends it, per connection, and a scripted answer.

Unlike the spy (an HTTP server that parses what it gets), this one keeps the
raw bytes, so a test can prove that nothing unparsed or unrouted arrived: a
smuggled request hidden behind a refused upgrade, a pipelined request sent
ahead of its turn, early data sent before a switch.  It answers health checks
(`GET /health`) itself and does not record them.

Behaviours (`mode`): "answer" (a fixed answer per request, connection kept
open so that anything sent after it would be seen), "silent" (never answers),
"raw" (sends `raw` after the head), "raw-then-reset" (sends `raw`, then resets the
connection: a gateway that crashes mid-answer), "interim-flood" (100 Continue until the
socket fails or a bound is reached).  Threads stop when `close()` is called;
every loop is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.harness.tcp import HOST, ThreadedServer


@dataclass
class RawConnection:
    received: bytearray = field(default_factory=bytearray)


class RecordingBackend:
    def __init__(
        self,
        backend_id: str,
        *,
        mode: str = "answer",
        answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        raw: bytes = b"",
        delay: float = 0.0,
        answer_after: bytes = b"",
        drip: tuple[bytes, float] = (b"", 0.0),
        max_seconds: float = 30.0,
    ) -> None:
        self.id = backend_id
        self.mode = mode
        self.answer = answer
        self.raw = raw
        self.delay = delay
        self.answer_after = answer_after  # answer only once what was received ends with this
        self.drip = drip  # after the answer: these bytes, one every so many seconds (a slow body)
        self.max_seconds = max_seconds
        self.connections: list[RawConnection] = []
        self.interim_sent = 0
        self._lock = threading.Lock()
        # The accept loop (and its threads, stopped on close) is the shared one in tests.harness.tcp.
        self._server = ThreadedServer(self._serve, name=backend_id, backlog=128)
        self._stop = self._server.stop
        self.port = self._server.port

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def requests(self) -> list[bytes]:
        """What each recorded (non-health-check) connection received, in order."""
        with self._lock:
            return [bytes(c.received) for c in self.connections]

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.max_seconds
        record = RawConnection()
        conn.settimeout(0.1)
        answered = 0
        with conn:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                if not record.received and chunk.startswith(b"GET /health "):
                    with contextlib.suppress(OSError):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                if not record.received:
                    with self._lock:
                        self.connections.append(record)
                with self._lock:
                    record.received += chunk
                if self.answer_after:
                    if not record.received.endswith(self.answer_after):
                        continue
                    heads = answered + 1
                else:
                    heads = record.received.count(b"\r\n\r\n")
                if heads <= answered:
                    continue
                answered = heads
                if self.delay:
                    self._stop.wait(self.delay)
                try:
                    if self.mode == "answer":
                        conn.sendall(self.answer)
                        body, every = self.drip
                        for byte in body:
                            if self._stop.wait(every):
                                return
                            conn.sendall(bytes((byte,)))
                    elif self.mode == "raw":
                        conn.sendall(self.raw)
                    elif self.mode == "raw-then-reset":
                        conn.sendall(self.raw)
                        self._stop.wait(0.2)  # what was sent arrives first
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed with SO_LINGER 0: a reset
                    elif self.mode == "hang-up":  # a gateway that closes on a request it will not take
                        return
                    elif self.mode == "interim-flood":
                        self._flood(conn, deadline)
                        return
                except OSError:
                    return

    def _flood(self, conn: socket.socket, deadline: float) -> None:
        conn.settimeout(1.0)
        line = b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
        while not self._stop.is_set() and time.monotonic() < deadline and self.interim_sent < 100_000:
            try:
                conn.sendall(line)
            except OSError:
                return
            self.interim_sent += 1

    def close(self) -> None:
        self._server.close()


def rss_kib(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")
