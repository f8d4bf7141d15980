"""The backend side of a handshake: connect, send the request head, read the answer's head.

Everything is bounded by `timeouts.backend_connect`: a backend that refuses,
or accepts TCP and never answers, raises `BackendConnectError` and the
listener tries another one.  After the head, the connection is handed to
`tunnel` together with any bytes that arrived behind the head.
"""

from __future__ import annotations

import asyncio
from typing import cast

from lb.config import BackendConfig
from lb.errors import BackendConnectError, BadRequest
from lb.http_head import HEAD_END, ResponseHead, parse_response_head

MAX_RESPONSE_HEAD = 65536


class UpstreamProtocol(asyncio.Protocol):
    """Buffers the backend's bytes until the handshake answer's head is complete."""

    __slots__ = ("_buffer", "_closed", "_reader_to_pause", "_waiter", "transport")

    def __init__(self, reader_to_pause: asyncio.Transport) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: str | None = None
        # While the request body streams to the backend, a full backend buffer
        # must pause reading from the client.
        self._reader_to_pause = reader_to_pause

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._closed = "backend closed the connection"
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = f"connection lost: {exc}" if exc else "backend closed the connection"
        self._wake()

    def pause_writing(self) -> None:
        self._reader_to_pause.pause_reading()

    def resume_writing(self) -> None:
        self._reader_to_pause.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_head(self) -> ResponseHead:
        """The next response head (a 1xx may be followed by another).

        Raises:
            ConnectionError: the backend closed before a complete head.
            BadRequest: the head is malformed or too large.
        """
        while True:
            end = self._buffer.find(HEAD_END, 0, MAX_RESPONSE_HEAD)
            if end >= 0:
                raw = bytes(self._buffer[: end + len(HEAD_END)])
                del self._buffer[: end + len(HEAD_END)]
                return parse_response_head(raw)
            if len(self._buffer) >= MAX_RESPONSE_HEAD:
                raise BadRequest("backend response head too large")
            if self._closed is not None:
                raise ConnectionError(self._closed)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    @property
    def closed(self) -> bool:
        """The backend already hung up (its last bytes may still be in the buffer)."""
        return self._closed is not None

    def take_buffer(self) -> bytes:
        """Bytes that arrived behind the head (e.g. the backend's first WebSocket frame)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


async def connect(backend: BackendConfig, client: asyncio.Transport) -> UpstreamProtocol:
    """Open a TCP connection to `backend`; the caller bounds the time.

    Raises:
        BackendConnectError: refused, unreachable, or reset.
    """
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(
            lambda: UpstreamProtocol(client), backend.host, backend.port
        )
    except OSError as exc:
        raise BackendConnectError(backend.id, backend.address, str(exc) or type(exc).__name__) from exc
    return protocol
