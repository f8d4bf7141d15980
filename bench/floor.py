"""The `floor` column: the cheapest uvloop relay that inserts a fixed cookie.

`python -m bench.floor --port P --backends HOST:PORT,HOST:PORT,...` (first stdout line:
`listening on HOST:PORT`, as `echo_server`).

What a Python balancer cannot avoid paying, and nothing more: one Protocol per
client; it finds the end of the request head (a search resumed where the last
one stopped, no parsing), opens a connection to the next backend (round robin,
one task per connection for the connect), forwards the head and whatever
followed it, inserts one fixed `Set-Cookie` into the backend's first answer
head, then relays bytes as a pair of protocols.  No routing, no cookie check,
no X-Forwarded-For, no limits, no logs, no timeouts.  The gap between this and
the balancer is the balancer's own work; the gap between this and HAProxy is
the runtime's.

It keeps the few rules that make it a fair floor rather than a broken one: a
head larger than 16 KiB closes the connection, a write buffer over its high
mark pauses reading on the other side (no unbounded buffering), and either
side closing closes the other once its buffered bytes are written.

Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, cast

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 16384
COOKIE = b"\r\nSet-Cookie: FLOOR=b1; Path=/; HttpOnly"


def insert_cookie(head: bytes | bytearray, end: int) -> bytes:
    """The answer bytes with our Set-Cookie as the last header line (`end`: index of the head's CRLFCRLF)."""
    return bytes(head[:end]) + COOKIE + bytes(head[end:])


class ClientSide(asyncio.Protocol):
    """The client's connection: buffer until the head is complete, then relay to the backend."""

    __slots__ = ("_backends", "_buffer", "_searched", "backend", "transport")

    def __init__(self, backends: Iterator[tuple[str, int]]) -> None:
        self._backends = backends
        self._buffer = bytearray()
        self._searched = 0
        self.backend: BackendSide | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.write(data)
            return
        self._buffer += data
        if backend is not None:  # connecting: reading is paused, this is what was already in flight
            return
        end = self._buffer.find(HEAD_END, max(0, self._searched - 3))
        if end < 0:
            self._searched = len(self._buffer)
            if self._searched > MAX_HEAD:
                self._close()
            return
        assert self.transport is not None
        self.transport.pause_reading()
        backend = self.backend = BackendSide(self)
        host, port = next(self._backends)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: backend, host, port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[tuple[asyncio.Transport, BackendSide]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._close()

    def backend_ready(self, transport: asyncio.Transport) -> None:
        """The backend accepted: send what we hold and relay from now on."""
        transport.write(bytes(self._buffer))
        self._buffer = bytearray()
        if self.transport is None or self.transport.is_closing():
            transport.close()
            return
        self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class BackendSide(asyncio.Protocol):
    """The backend's connection: the first answer head gets the cookie, the rest is relayed."""

    __slots__ = ("_client", "_head", "transport")

    def __init__(self, client: ClientSide) -> None:
        self._client = client
        self._head: bytearray | None = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._client.backend_ready(self.transport)

    def data_received(self, data: bytes) -> None:
        client = self._client.transport
        if client is None:
            return
        head = self._head
        if head is None:
            client.write(data)
            return
        start = max(0, len(head) - 3)
        head += data
        end = head.find(HEAD_END, start)
        if end < 0:
            if len(head) > MAX_HEAD:
                client.close()
            return
        self._head = None
        client.write(insert_cookie(head, end))
        # From here on, each side's protocol only writes into the other (as lb.proxy.tunnel does).
        assert self.transport is not None
        client.set_protocol(Relay(self.transport))
        self.transport.set_protocol(Relay(client))

    def pause_writing(self) -> None:
        if self._client.transport is not None:
            self._client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._client.transport is not None:
            self._client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._client.transport is not None:
            self._client.transport.close()


class Relay(asyncio.Protocol):
    """One side of the tunnel: what it reads goes to `peer`; a full `peer` buffer pauses reading here."""

    __slots__ = ("peer",)

    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool | None:
        self.peer.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


def parse_backends(text: str) -> list[tuple[str, int]]:
    """`h:p,h:p` → [(h, p), ...]."""
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no backends")
    return out


async def serve(host: str, port: int, backends: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    rotation = itertools.cycle(backends)
    server = await loop.create_server(lambda: ClientSide(rotation), host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backends", required=True, help="HOST:PORT,HOST:PORT,...")
    args = parser.parse_args(argv)
    backends = parse_backends(args.backends)
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    run(serve(args.host, args.port, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
