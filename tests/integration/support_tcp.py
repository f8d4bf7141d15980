"""One threaded TCP server on loopback for the tests' scripted peers (backends, admin APIs, black holes).

`ThreadedServer(serve)` listens on 127.0.0.1, on a port the kernel picks, and runs `serve(conn)` for
each connection in a thread of its own; `serve` owns the socket (closes it, or keeps it open on
purpose).  `stop` is set by `close()`: a script waits on it (`pause`) instead of sleeping, so every
loop ends when the test does.  Nothing here imports `lb`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

HOST = "127.0.0.1"
JOIN_WAIT = 5.0  # seconds close() waits for each thread


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
