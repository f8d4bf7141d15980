"""A lean WebSocket echo backend for the benchmark: `python -m bench.echo_server --port P --id ID`.

One raw asyncio Protocol per connection (uvloop when installed), no framework:

- `GET /health` → 200 `ok` and close, so the balancer's and HAProxy's checks pass;
- a WebSocket upgrade → 101 with Sec-WebSocket-Accept (RFC 6455 §4.2.2), then at once
  a text message `{"type":"hello","server_id":ID}` (handshake workers read it and hang up);
- then every frame comes back unmasked (`wire.echo_frames`), ping gets pong, close gets close;
- anything else → 404 and close.

The benchmark sends the same small frame over and over, so a whole read that is
a known small frame is answered from a cache (one dictionary lookup); larger
reads go through the frame loop.  A full write buffer pauses reading, so a
stream that outruns its reader is slowed rather than buffered without bound.

With `--port 0` the kernel picks the port; the first line on stdout is always
`listening on HOST:PORT`, which is what the benchmark waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import cast

from bench.wire import HEAD_END, Unmasker, accept_key, echo_frames, hello_message, server_frame

MAX_HEAD = 16384
_SMALL_READ = 256  # reads up to this size are answered from the cache
_CACHE_LIMIT = 1024

_HEALTH_REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class EchoServer:
    """Shared by every connection of one server: its id, hello frame, and caches."""

    __slots__ = ("connections", "hello", "replies", "server_id", "unmasker")

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.hello = server_frame(hello_message(server_id))
        self.unmasker = Unmasker()
        # Whole small reads (complete frames, no close) → their reply.
        self.replies: dict[bytes, bytes] = {}
        self.connections = 0


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("_buffer", "_server", "_transport", "_ws")

    def __init__(self, server: EchoServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ws = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections -= 1
        self._transport = None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if not self._ws:
            self._buffer += data
            self._handshake(transport)
            return
        server = self._server
        if not self._buffer:
            if len(data) <= _SMALL_READ:
                reply = server.replies.get(data)
                if reply is not None:
                    transport.write(reply)
                    return
            self._frames(transport, data, cache=len(data) <= _SMALL_READ)
            return
        self._buffer += data
        self._frames(transport, self._buffer, cache=False)

    def _frames(self, transport: asyncio.Transport, data: bytes | bytearray, *, cache: bool) -> None:
        echo = echo_frames(data, self._server.unmasker)
        if echo.reply:
            transport.write(echo.reply)
        if echo.close:
            transport.close()
            return
        if data is self._buffer:
            del self._buffer[: echo.consumed]
        elif echo.consumed < len(data):
            self._buffer += data[echo.consumed :]
        elif cache and echo.reply:
            replies = self._server.replies
            if len(replies) >= _CACHE_LIMIT:
                replies.clear()
            replies[bytes(data)] = echo.reply

    def _handshake(self, transport: asyncio.Transport) -> None:
        end = self._buffer.find(HEAD_END)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                transport.write(_BAD_REQUEST)
                transport.close()
            return
        head = bytes(self._buffer[:end]).decode("latin-1")
        rest = bytes(self._buffer[end + len(HEAD_END) :])
        self._buffer.clear()
        request_line, _, header_text = head.partition("\r\n")
        parts = request_line.split(" ")
        path = parts[1] if len(parts) == 3 else ""
        headers: dict[str, str] = {}
        for line in header_text.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if headers.get("upgrade", "").lower() == "websocket" and key:
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n\r\n" + self._server.hello
            )
            self._ws = True
            if rest:
                self._buffer += rest
                self._frames(transport, self._buffer, cache=False)
            return
        transport.write(_HEALTH_REPLY if path.split("?", 1)[0] == "/health" else _NOT_FOUND)
        transport.close()


async def serve(host: str, port: int, server_id: str) -> None:
    loop = asyncio.get_running_loop()
    state = EchoServer(server_id)
    server = await loop.create_server(lambda: EchoProtocol(state), host, port, backlog=4096, reuse_address=True)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", flush=True)
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: let the kernel pick (printed on stdout)")
    parser.add_argument("--id", required=True, dest="server_id", help="server id sent in the hello message")
    args = parser.parse_args(argv)
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    run(serve(args.host, args.port, args.server_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
