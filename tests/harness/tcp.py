"""One threaded TCP server on loopback for the tests' scripted peers (backends, admin APIs, black holes).

`ThreadedServer(serve)` listens on 127.0.0.1, on a port the kernel picks, and runs `serve(conn)` for
each connection in a thread of its own; `serve` owns the socket (closes it, or keeps it open on
purpose).  `stop` is set by `close()`: a script waits on it (`pause`) instead of sleeping, so every
loop ends when the test does.  `ScriptedGateway` is such a server that reads each request's head,
then runs its subclass's script.  Nothing here imports `lb`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable

HOST = "127.0.0.1"
JOIN_WAIT = 5.0  # seconds close() waits for each thread
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def read_head(conn: socket.socket) -> bytes | None:
    """A request's head, read a byte at a time so that nothing after it leaves the kernel (a body or
    frames the script leaves unread); None if the connection ends first (a TCP health check)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(1)
        if not chunk:
            return None
        head += chunk
    return head


def switch_protocols(conn: socket.socket, head: bytes) -> None:
    """Answer the upgrade request `head` with a 101 whose Sec-WebSocket-Accept matches its key."""
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


class ThreadedServer:
    """Accepts on a kernel-picked loopback port; each connection is served in its own thread."""

    def __init__(self, serve: Callable[[socket.socket], None], *, name: str = "scripted", backlog: int = 64) -> None:
        self.serve = serve
        self.stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(backlog)
        self._sock.settimeout(0.05)  # the accept loop notices `stop` this often
        self.port = int(self._sock.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name=f"{name} accept", daemon=True)
        self._accepting.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def pause(self, seconds: float) -> bool:
        """Wait `seconds` unless the server is closing; False once it is."""
        return not self.stop.wait(seconds)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def close(self) -> None:
        self.stop.set()
        self._accepting.join(timeout=JOIN_WAIT)
        self._sock.close()
        for thread in self._threads:
            thread.join(timeout=JOIN_WAIT)


class ScriptedGateway:
    """A backend that runs `script(conn, head)` on each connection once its request head has come (read
    alone, so what follows it stays unread); a connection that ends first (a TCP health check) runs none.
    The balancer's hang-up or reset (an OSError) ends a script quietly, and `ended` is set once a
    script's connection is closed.  Subclasses name themselves (`id`) and write `script`."""

    id = "scripted"

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.server = ThreadedServer(self._serve, name=self.id)

    @property
    def address(self) -> str:
        return self.server.address

    def script(self, conn: socket.socket, head: bytes) -> None:
        raise NotImplementedError

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            with contextlib.suppress(OSError):
                head = read_head(conn)
                if head is None:
                    return
                self.script(conn, head)
        self.ended.set()

    def close(self) -> None:
        self.server.close()
