"""Relay bytes both ways after the handshake, as HAProxy and nginx do: no frame parsing.

Each side's transport gets a `TunnelEnd` protocol that writes what it reads
straight into the other side's transport: no task, queue or copy per chunk.
The backend's side of a WebSocket also follows frame headers (`frames`) so
the balancer can end a tunnel with a close frame of its own (drain, shutdown).
That is also why compression, fragmentation, subprotocols and close codes
pass unchanged.  Backpressure: when one transport's write buffer passes its
high-water mark, asyncio calls `pause_writing` on its protocol, which pauses
reading from the peer; so a slow client cannot make the balancer buffer
without bound.  When either side closes or fails, both close (flushing what
is buffered) and the backend's connection count drops.
"""

from __future__ import annotations

import asyncio
import logging
import time

from lb.access_log import log_tunnel_closed
from lb.context import ProxyContext
from lb.frames import FrameBoundaries, close_frame
from lb.framing import BodyFramer
from lb.pool import BackendStatus

log = logging.getLogger(__name__)

CLOSE_LINGER = 2.0  # seconds a tunnel may stay open after we sent the client a close frame


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: reads from its own transport, writes into `peer`."""

    __slots__ = ("nbytes", "peer", "tunnel")

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.peer = peer
        self.nbytes = 0

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        self.nbytes += len(data)

    def eof_received(self) -> bool | None:
        # A WebSocket has no use for half-close: after the close handshake one
        # side closes TCP, and the other should follow promptly.
        self.tunnel.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


class WebSocketServerEnd(TunnelEnd):
    """The backend side of a WebSocket tunnel: follows frame boundaries so a close can be injected."""

    __slots__ = ("frames", "pending_close", "silenced")

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        super().__init__(tunnel, peer)
        self.frames = FrameBoundaries()
        self.pending_close: bytes | None = None
        self.silenced = False  # our close frame went out: nothing more may follow it

    def data_received(self, data: bytes) -> None:
        if self.silenced:
            return
        if self.pending_close is None:
            self.frames.feed(data)
            self.peer.write(data)
            self.nbytes += len(data)
            return
        boundary = self.frames.first_boundary(data)
        if boundary is None:
            self.peer.write(data)
            self.nbytes += len(data)
            return
        self.peer.write(data[:boundary])
        self.nbytes += boundary
        self._send_close()

    def inject_close(self, code: int, reason: str) -> None:
        """Send the client a close frame at the next frame boundary of the backend's stream."""
        if self.silenced or self.pending_close is not None:
            return
        self.pending_close = close_frame(code, reason)
        if self.frames.at_boundary:
            self._send_close()

    def _send_close(self) -> None:
        assert self.pending_close is not None
        self.peer.write(self.pending_close)
        self.silenced = True
        # The client answers with its own close frame, which still reaches the
        # backend; whoever is slow to hang up after that is cut off.
        asyncio.get_running_loop().call_later(CLOSE_LINGER, self.tunnel.close)


class FramedResponseEnd(TunnelEnd):
    """The backend side of a plain HTTP answer: closes the tunnel when the body is complete."""

    __slots__ = ("framer",)

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport, framer: BodyFramer) -> None:
        super().__init__(tunnel, peer)
        self.framer = framer

    def data_received(self, data: bytes) -> None:
        try:
            end = self.framer.feed(data)
        except ValueError:
            log.warning("malformed chunked body from backend %s; closing", self.tunnel.backend.id)
            self.tunnel.close()
            return
        if end is None:
            TunnelEnd.data_received(self, data)
            return
        TunnelEnd.data_received(self, data[:end])
        self.tunnel.close()


class Tunnel:
    """A client and a backend connection joined after the handshake."""

    __slots__ = (
        "backend", "client_end", "client_ip", "closed", "ctx", "idle_mark", "opened_at", "pool", "request_id",
        "server_end",
    )

    def __init__(
        self, ctx: ProxyContext, backend: BackendStatus, client_ip: str, pool: str, request_id: str = "-"
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id  # of the handshake that opened it: its close line carries it too
        self.backend = backend
        self.client_ip = client_ip
        self.pool = pool
        self.closed = False
        self.opened_at = time.monotonic()
        self.idle_mark = (0, self.opened_at)  # (bytes seen, when): the idle sweeper's last look
        self.client_end: TunnelEnd
        self.server_end: TunnelEnd

    @classmethod
    def join(
        cls,
        ctx: ProxyContext,
        backend: BackendStatus,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        client_ip: str,
        pool: str,
        to_server: bytes = b"",
        to_client: bytes = b"",
        framer: BodyFramer | None = None,
        server_closed: bool = False,
        request_id: str = "-",
    ) -> Tunnel:
        """Switch both transports to relaying; flush what each side sent ahead of the switch.

        The caller has already counted the connection on `backend`; the tunnel
        releases it on close.  `server_closed`: the backend hung up before the
        switch, so no callback will ever tell the new protocol; close after flushing.
        """
        tunnel = cls(ctx, backend, client_ip, pool, request_id)
        tunnel.client_end = TunnelEnd(tunnel, server)
        tunnel.server_end = (
            WebSocketServerEnd(tunnel, client) if framer is None else FramedResponseEnd(tunnel, client, framer)
        )
        ctx.tunnels.add(tunnel)
        client.set_protocol(tunnel.client_end)
        server.set_protocol(tunnel.server_end)
        if to_server:
            tunnel.client_end.data_received(to_server)
        if to_client:
            tunnel.server_end.data_received(to_client)
        if server_closed or (framer is not None and framer.done):
            tunnel.close()
        elif not tunnel.closed:
            client.resume_reading()
            server.resume_reading()
        return tunnel

    @property
    def bytes_in(self) -> int:
        """Client → backend."""
        return self.client_end.nbytes

    @property
    def bytes_out(self) -> int:
        """Backend → client."""
        return self.server_end.nbytes

    @property
    def closing(self) -> bool:
        """A close frame was sent or is waiting for a frame boundary."""
        end = self.server_end
        return isinstance(end, WebSocketServerEnd) and (end.silenced or end.pending_close is not None)

    def close_gracefully(self, code: int, reason: str) -> None:
        """End a WebSocket tunnel with a close frame to the client (e.g. 1001, 1012); others just close."""
        if isinstance(self.server_end, WebSocketServerEnd):
            self.server_end.inject_close(code, reason)
        else:
            self.close()

    def close(self) -> None:
        """Close both sides (buffered bytes are flushed first); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.server_end.peer.close()
        self.client_end.peer.close()
        self.backend.connections -= 1
        stats = self.ctx.stats
        stats.closed_bytes_in += self.client_end.nbytes
        stats.closed_bytes_out += self.server_end.nbytes
        stats.tunnels_closed += 1
        self.ctx.tunnels.discard(self)
        if not self.ctx.tunnels and self.ctx.all_tunnels_closed is not None:
            self.ctx.all_tunnels_closed.set()
        log_tunnel_closed(
            client=self.client_ip, pool=self.pool, backend=self.backend.id,
            duration=f"{time.monotonic() - self.opened_at:.3f}", bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            request_id=self.request_id,
        )
