"""Relay bytes both ways after the handshake, as HAProxy and nginx do: no frame parsing.

Each side's transport has a `TunnelEnd` protocol that writes what it reads
straight into the other side's transport (the handshake's own protocols,
`lb.proxy.server.ClientConnection` and `_Upstream`, become the ends at the switch):
no task or queue per chunk, and one copy
out of the data plane's read buffer (`lb.proxy.reading`: at most 32 KiB a read).
The backend's side of a WebSocket also follows frame headers (`lb.ws.frames`) so
the balancer can end a tunnel with a close frame of its own (drain, shutdown,
idle); the client's side, to know whether the client has sent its close frame.
Headers only: that is also why compression, fragmentation, subprotocols and
close codes pass unchanged.  Backpressure: when one transport's write buffer passes
its high-water mark, asyncio calls `pause_writing` on its protocol, which
pauses reading from the peer; so a slow client cannot make the balancer
buffer without bound.  When either side closes or fails, both close (flushing
what is buffered) and the backend's connection count drops.

Every close the balancer starts has a deadline.  A close frame waits for a
frame boundary of the backend's stream; a client that stopped reading pauses
that stream, so the boundary may never come.  If the close frame is not out
within `CLOSE_DEADLINE`, or the client has not taken it (nor hung up) within
`CLOSE_LINGER` after, the tunnel is aborted at TCP level: no buffer is kept
for a peer that does not read.  A client still taking the bytes of a long
frame is not such a peer: each look, every `CLOSE_DEADLINE`, that finds it
took some since the last one waits on (`next_close_look`), up to the close's
own bound (the end of SIGTERM's `timeouts.shutdown_grace`, or that long from
a drain's or an idle timeout's close); meanwhile flow control still pauses
the backend whenever its buffer is full.  Each such end is counted by cause
and by how it ended (`close_frame` or `tcp`) in `Stats.balancer_closes`.

Backend loss (issue 11): when the backend's connection ends without the
backend having sent a close frame, the client gets close 1012 (Service
Restart) if the stream is at a frame boundary, so client libraries reconnect
at once instead of reporting an abnormal 1006; mid-frame, TCP is closed.  Not
after the client's own close frame (or its FIN): a backend that hangs up then,
without a close frame of its own, is answering, and the tunnel just ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Final

from lb.access_log import log_tunnel_closed, log_tunnel_ended
from lb.proxy.deadlines import Deadline, Deadlines
from lb.proxy.reading import READ_CHUNK, READ_VIEW, read_bytes
from lb.state.context import ProxyContext
from lb.state.pool import BackendStatus
from lb.state.rounding import round_half_even
from lb.state.tally import add_one
from lb.ws.frames import FrameBoundaries, close_frame

log: Final = logging.getLogger(__name__)
_monotonic: Final = time.monotonic  # a C static for compiled code (as lb.proxy.server._now)

CLOSE_LINGER = 2.0  # seconds a tunnel may stay open after we sent the client a close frame
# Seconds a close frame may wait for a frame boundary before TCP is cut, unless its client took bytes
# meanwhile (`next_close_look`): then it waits as long again, up to the close's bound.
CLOSE_DEADLINE = 2.0
# Seconds a closed connection's unsent bytes may go without the peer taking any (TCP's own retries
# on a lossy mobile link stall a few seconds; a peer that keeps its window shut stalls for ever).
FLUSH_STALL = 10.0
# Seconds between two looks at a side whose reading is paused because its peer takes nothing: paused,
# its FIN or RST is not read, so it is asked of the kernel (`TunnelEnd.let_go_if_peer_gone`).
PAUSED_PEER_LOOK = 2.0
SERVICE_RESTART: Final = 1012  # IANA close code registry: the service is restarting; reconnect
GOING_AWAY: Final = 1001  # RFC 6455 §7.4.1: the server is going down


def next_close_look(taken_before: int, taken_now: int, now: float, close_by: float) -> float | None:
    """When a close frame still waiting for a frame boundary is looked at next; None: cut TCP now.

    Args:
        taken_before: bytes the client had taken at the last look (relayed to it, less what was
            still in our write buffer for it).
        taken_now: the same now.
        now: the event loop's time.
        close_by: the close's bound (loop time): past it, even a client still reading is cut.

    Returns:
        Seconds to the next look: `CLOSE_DEADLINE`, or what is left before `close_by` if less.
        None when the client took nothing since the last look (it stopped reading, or the backend
        stalled mid-frame: either way no boundary is coming) or the bound has passed.
    """
    if taken_now <= taken_before or now >= close_by:
        return None
    return min(CLOSE_DEADLINE, close_by - now)


# The socket states (Linux's tcp_states.h, `tcpi_state` in TCP_INFO) of a peer that has left: its FIN
# was received (CLOSE_WAIT), or its RST (CLOSE).
_TCP_CLOSE: Final = 7
_TCP_CLOSE_WAIT: Final = 8
_TCP_INFO: Final = getattr(socket, "TCP_INFO", 0)  # Linux only; elsewhere no look is made
# struct tcp_info's tcpi_bytes_acked (Linux 4.1+): a u64 at offset 120, so the first 128 bytes hold it.
_TCPI_BYTES_ACKED_END: Final = 128
_U64: Final = struct.Struct("=Q")
# Linux's SIOCOUTQ (TIOCOUTQ on a socket): the bytes of a socket's send queue, unsent (a full window
# holds them) or not yet acknowledged.  An ioctl, not TCP_INFO: uvloop's socket stand-in makes a socket
# object for each getsockopt (7,000 instructions), where its descriptor is at hand.
_SEND_QUEUE: Final = getattr(termios, "TIOCOUTQ", 0)
_C_INT: Final = struct.Struct("=i")  # what the ioctl writes
_ioctl: Final = fcntl.ioctl  # a C static for compiled code, not the module's attribute at each call


def has_left(tcp_state: int) -> bool:
    """Whether a socket in `tcp_state` (TCP_INFO's first byte) has heard its peer's FIN or RST."""
    return tcp_state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def client_has_left(transport: asyncio.Transport) -> bool:
    """Whether the peer of `transport`'s socket has closed it, asked of the kernel: a paused transport
    reads nothing, so neither its FIN nor its RST reaches the protocol (HAProxy and nginx hear both from
    the poller, EPOLLRDHUP and EPOLLERR; asyncio's loops do not watch a paused socket at all)."""
    return has_left(_tcp_state(transport))


def backend_has_reset(transport: asyncio.Transport) -> bool:
    """Whether the peer of `transport`'s socket has reset it, asked of the kernel as `client_has_left`.

    A reset only: behind a FIN, what the backend sent last (its close frame, perhaps) waits unread in the
    kernel for a client that is slow, not gone, to make room for it."""
    return _tcp_state(transport) == _TCP_CLOSE


def send_queue(transport: asyncio.BaseTransport) -> int | None:
    """The bytes of `transport`'s socket in the kernel's send queue, unsent or not yet acknowledged by
    the peer (SIOCOUTQ); None where the kernel cannot be asked (no socket, not Linux, closed under us,
    not TCP).  The tunnel asks it before it closes at a client's FIN (`all_taken`), the admin port of
    its slow readers (lb.control.admin)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not _SEND_QUEUE:
        return None
    # Written into a bytearray: given bytes, fcntl.ioctl first tries them as a writable buffer, and the
    # error it makes and clears for that cost 4,400 instructions.
    queued = bytearray(4)
    try:
        _ioctl(sock.fileno(), _SEND_QUEUE, queued)
    except (OSError, ValueError):  # closed under us, or no descriptor (a test's stand-in): nothing known
        return None
    return int(_C_INT.unpack(queued)[0])


def all_taken(transport: asyncio.Transport) -> bool:
    """Whether every byte written into `transport` has reached its peer: none in its buffer, and none in
    the kernel's send queue (`send_queue`).  False where the kernel cannot be asked.

    Once it holds, closing the socket loses nothing of what was written: a close with bytes still
    queued loses them all if the peer then sends anything, which a closed socket answers with a reset."""
    return not transport.get_write_buffer_size() and send_queue(transport) == 0


def taken_by(transport: asyncio.Transport, relayed: int) -> int:
    """A count that grows while the peer of `transport` takes bytes: TCP_INFO's tcpi_bytes_acked, what its
    kernel has acknowledged (it stops once its receive buffer is full and it reads nothing).  Not our own
    write buffer's drain: the kernel's send buffer below it (up to tcp_wmem's 4 MiB) takes what a slow reader
    frees, and reports room only once a third of it is free, so a client reading 500 KB/s left that buffer
    unchanged for seconds.  Where the kernel cannot be asked, `relayed` (bytes written into `transport`)
    less what is still in its buffer."""
    info = _tcp_info(transport, _TCPI_BYTES_ACKED_END)
    if len(info) >= _TCPI_BYTES_ACKED_END:
        return int(_U64.unpack_from(info, _TCPI_BYTES_ACKED_END - 8)[0])
    return relayed - transport.get_write_buffer_size()


def _tcp_state(transport: asyncio.Transport) -> int:
    """TCP_INFO's first byte for `transport`'s socket; 0 (no state) when it cannot be asked."""
    info = _tcp_info(transport, 1)
    return info[0] if info else 0


def _tcp_info(transport: asyncio.Transport, length: int) -> bytes:
    """The first `length` bytes of TCP_INFO for `transport`'s socket (the kernel may give fewer); none when
    it cannot be asked."""
    sock = transport.get_extra_info("socket")
    if sock is None or not _TCP_INFO:
        return b""
    try:
        return bytes(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, length))
    except OSError:  # closed under us, or not TCP (a test's pipe): nothing known
        return b""


# Reads of what a peer sent before an error ended its transport (`read_what_is_left`): 128 KiB, an
# answer head's limit (64 KiB) and a short body, or a tunnel's last frames.
LEFT_READS: Final = 4


def read_what_is_left(transport: asyncio.BaseTransport | None, receive: Callable[[bytes], bool]) -> None:
    """Hand `receive` what the kernel still holds for `transport`'s socket, whose transport an error ended.

    A write that meets the peer's reset (EPIPE, ECONNRESET) ends the transport before the loop has read
    what came ahead of that reset: a gateway that answers an upload early (a 413) or sends its close
    frame, and then closes with bytes of ours unread, resets the connection; when our next write is made
    first, that answer or close frame was lost.  The kernel keeps those bytes readable, and both loops
    close the socket only once `connection_lost` returns, so it reads them there: at most `LEFT_READS`
    reads, until none is left, and while `receive` says to go on.  Called only from the transport's own
    `connection_lost`: the descriptor is then still that connection's (uvloop's socket object reports -1
    once it is closed, asyncio's too, and a TLS transport has no socket left by then), never one the
    kernel has given to another connection since.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    try:
        fd = int(sock.fileno())
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    for _ in range(LEFT_READS):
        try:
            data = os.read(fd, READ_CHUNK)  # non-blocking, as the loops leave it: BlockingIOError when none is left
        except OSError:
            return
        if not data or not receive(data):
            return


def idle_sweep_interval(idle: float) -> float:
    """Seconds between two looks for tunnels silent for `timeouts.idle` (`idle` > 0).

    A look notices bytes moved since the one before, not when, so a tunnel is closed between `idle`
    and `idle` plus this interval after its last byte.  The interval divides `idle` into at least
    two equal parts, each at most max(1 s, idle / 10): within 10 % of a long idle timeout (HAProxy's
    `timeout tunnel` is exact; a timer per tunnel, re-armed on every read, would cost the relay), and
    one look a second, each a pass over every tunnel, for idle timeouts from 2 to 10 s (below 2 s,
    two looks per timeout).
    """
    target = max(1.0, idle / 10)
    return idle / max(2, math.ceil(idle / target))


class TunnelEnd(asyncio.BufferedProtocol):
    """One side of a tunnel: reads from its own transport, writes into `peer`."""

    __slots__ = ("full", "nbytes", "paused_look", "paused_taken", "peer", "tunnel")
    __deletable__ = ("peer", "tunnel")  # compiled (mypyc), a native class deletes only these: see forget()

    # Made as the transport's protocol (the handshake's, `lb.proxy.server.ClientConnection` and
    # `_Upstream`, are ends), and an end of a tunnel once `Tunnel.join` begins it: until then none
    # of the fields below is set.

    def begin(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        """This end of `tunnel`, relaying into `peer`, from now on."""
        self.tunnel = tunnel
        self.peer = peer
        self.nbytes = 0
        self.full = False  # this end's own transport is over its high-water mark (the peer is paused)
        # While it is: the next look at whether the paused peer has gone (`let_go_if_peer_gone`).
        self.paused_look: Deadline | None = None
        # What this end's own transport had taken (`taken_by`) when that look was set: one that takes bytes is slow,
        # not wedged, and what the paused peer sent before it left is still on its way to it.
        self.paused_taken = 0

    # Static: uvloop looks `get_buffer` up twice as it takes each protocol (hasattr, then the
    # attribute), and a method would be bound, a new object each time; a static method is the same
    # function object.  Every read of either phase fills lb.proxy.reading's one buffer.
    @staticmethod
    def get_buffer(sizehint: int) -> memoryview:
        return READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        # data_received's work inline: this runs for every read of every tunnel.
        # A copy of its own (the peer's transport may keep it), as `bytes`: uvloop wraps anything else
        # in a memoryview and casts it (two objects and a method call per write), and writes `bytes`
        # by its fast path.
        self.peer.write(read_bytes(nbytes))
        self.nbytes += nbytes

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        self.nbytes += len(data)

    def eof_received(self) -> bool | None:
        """The client closed its side: after a finished close handshake (the usual end), the tunnel
        ends at once.  Before the backend has answered (a close frame and then the FIN at once, as
        some clients send them), the FIN is passed on, as HAProxy does, and the backend's side stays
        open for its answer: a WebSocket's server then closes TCP first (RFC 6455 §7.1.1), which
        ends the tunnel.  It gets CLOSE_LINGER for that.  Under TLS (no half-close in asyncio's TLS
        transport) or towards a backend that cannot take a FIN, the tunnel closes at once.

        A FIN with no close frame of the client's before it (a killed app, a client that just hangs
        up) also ends the tunnel at once, where HAProxy passes it on, once the backend has taken
        everything the client sent (nothing relayed since the head it answered, or `all_taken`: the
        kernel's send queue towards it is empty).  That client has dropped its WebSocket without a
        close (1006, RFC 6455 §7.1.5): nothing the backend
        sends after the FIN is for a WebSocket it still has.  The backend has had every byte and gets
        the FIN; the tunnel, its backend's count and the client's connection go now, not a round trip
        later.  With bytes still on their way to the backend (a slow reader behind a large last
        message) the FIN is passed on as HAProxy does: closed, the socket would answer the backend's
        next ping with a reset, and the kernel would drop what it still held.  Passed on, the FIN
        cost 17 µs of CPU a handshake whose client hangs up so (`python -m bench.ab`, 6 rounds: 126 µs
        closing at once against 143; the floor, which closes at once, 115).
        """
        tunnel = self.tunnel
        if tunnel.closed:
            # A TLS client's close_notify after the tunnel ended: the backend's end has let go of
            # this transport already (`forget`), and there is nothing left to pass on.
            return None
        server_end = tunnel.server_end
        if (
            server_end.silenced  # we said goodbye already: nothing more goes to this client
            or server_end.frames.close_seen  # the backend has, too: the close handshake is done
            # The client dropped its WebSocket: no answer is for it, and the backend has had every byte.
            # With nothing relayed, all it was written is the head it answered (read, so taken): the
            # kernel is asked only when the client sent more.
            or (not tunnel.client_end.frames.close_seen and (self.nbytes == 0 or all_taken(self.peer)))
            or not self.peer.can_write_eof()
            or tunnel.client_tls
        ):
            server_end.client_left_first()
            tunnel.close()  # at once, so the backend's connection count drops with the client's close
            return None
        tunnel.client_finished = True
        self.peer.write_eof()
        server_end.linger()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self.tunnel
        # `exc is not None` first: compiled, naming OSError looks it up in builtins (300 instructions), and
        # nearly every connection ends without an error.
        if exc is not None and isinstance(exc, OSError) and not tunnel.closed and not tunnel.client_tls:
            # Its close frame (or last frames) may wait unread behind the reset that ended it: a client
            # that closes with the backend's frames unread resets the connection (under TLS the kernel
            # holds records, which the TLS layer alone could read).  The server end's peer is this
            # end's own transport, the client's.
            read_what_is_left(tunnel.server_end.peer, self._left_over)
        if not tunnel.closed:  # the client's own end (ours, an abort, has closed the tunnel already)
            tunnel.server_end.client_left_first()
        tunnel.close()
        self.forget()

    def _left_over(self, data: bytes) -> bool:
        """Relay bytes read after the connection was lost; whether to read on."""
        self.data_received(data)
        return not self.tunnel.closed

    def forget(self) -> None:
        """Drop this end's references once its connection is lost (no callback comes after that).

        Transport → this end → peer transport → its end → back, and end ↔ tunnel, are
        cycles: left alone, every closed tunnel (ends, transports, their contexts: about
        ten objects) waits for the cycle collector, which then runs every few hundred
        handshakes.  Broken here, all of it is freed by reference counting at once.
        """
        del self.peer, self.tunnel

    def pause_writing(self) -> None:
        """This end's transport takes nothing more for now: the peer is paused, so the peer's leaving is
        not read either.  It is looked for every PAUSED_PEER_LOOK while the pause lasts."""
        self.full = True
        self.peer.pause_reading()
        self.look_at_paused_peer_later()

    def look_at_paused_peer_later(self) -> None:
        if self.paused_look is None:
            self.paused_taken = self.own_taken()
            self.paused_look = self.tunnel.deadlines().call_later(PAUSED_PEER_LOOK, self._look_at_paused_peer)

    def _look_at_paused_peer(self) -> None:
        """Still full (else resumed since: the peer is read again), and this end's transport took nothing
        since the last look: the paused peer is let go if it has gone.  One that took bytes is slow, not
        wedged: a client's upload and FIN (or a gateway's last frames and reset) behind it are still on
        their way to it, and reach it as it reads, as HAProxy relays them."""
        self.paused_look = None
        if self.full and (self.own_taken() != self.paused_taken or not self.let_go_if_peer_gone()):
            self.look_at_paused_peer_later()

    def own_taken(self) -> int:
        """`taken_by` of this end's own transport (the one whose write buffer is full)."""
        return 0

    def let_go_if_peer_gone(self) -> bool:
        """Whether the paused peer has gone, asked of the kernel; if so, the tunnel is ended here."""
        return False

    def resume_writing(self) -> None:
        self.full = False
        self.peer.resume_reading()


class WebSocketClientEnd(TunnelEnd):
    """The client side of a WebSocket tunnel: follows its frame headers too, to know whether the client
    has sent its close frame (a backend that hangs up after that is answering it, not lost).

    The same header-only tracker as the backend's side: one more call per read, payloads skipped by
    count; about 230 instructions per echoed message (callgrind), against some 20 µs of CPU the
    relay spends on one, and no more than the tracker's bytes-typed reads saved on the backend's side.
    """

    __slots__ = ("frames",)

    def begin(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        super().begin(tunnel, peer)
        self.frames = FrameBoundaries()

    def own_taken(self) -> int:
        server_end = self.tunnel.server_end
        return taken_by(server_end.peer, server_end.nbytes)

    def let_go_if_peer_gone(self) -> bool:
        """The client takes nothing, so its backend is paused: a backend that has reset is let go.
        Without this, a gateway that crashed behind a client that stopped reading would keep its tunnel,
        its count in least_conn and lb_active_connections, for as long as that client stays.  A FIN is
        not acted on: what came before it is the client's to read."""
        if not backend_has_reset(self.peer):
            return False
        # What the backend sent last may still be unread in the kernel: the client cannot have it
        # whole, so no 1012 claims an orderly end; it gets what was read, then the close.
        self.tunnel.server_end.backend_gone(unread=True)
        return True

    def buffer_updated(self, nbytes: int) -> None:
        data = read_bytes(nbytes)  # as TunnelEnd.buffer_updated, with the tracker's look
        self.frames.feed(data)
        self.peer.write(data)
        self.nbytes += nbytes

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        self.peer.write(data)
        self.nbytes += len(data)


class WebSocketServerEnd(TunnelEnd):
    """The backend side of a WebSocket tunnel: follows frame boundaries so a close can be injected."""

    __slots__ = (
        "backend_closed_first", "close_by", "deadline", "frames", "pending_close", "sent", "silenced", "taken",
        "upload_end",
    )

    # Set when our close goes out (`_send_close`), read only after, so not at each tunnel's start: the
    # client's bytes read at the last look, and where the frame it was sending then ends
    # (`still_uploading`), both as counted by the client end's `nbytes`.
    sent: int
    upload_end: int

    def begin(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        super().begin(tunnel, peer)
        self.frames = FrameBoundaries()
        self.pending_close: tuple[int, bytes] | None = None  # (code, frame): our close, waiting for a boundary
        self.silenced = False  # our close frame went out: nothing more may follow it
        # A close of ours was asked for after the backend's own close frame had begun: none is sent.
        self.backend_closed_first = False
        self.deadline: Deadline | None = None
        # While a close waits for a frame boundary: the bytes its client had taken at the last look,
        # and the loop time past which it is cut even if it is still reading (`next_close_look`).
        self.taken = 0
        self.close_by = 0.0

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(read_bytes(nbytes))

    def own_taken(self) -> int:
        client_end = self.tunnel.client_end
        return taken_by(client_end.peer, client_end.nbytes)

    def let_go_if_peer_gone(self) -> bool:
        """The backend takes nothing, so its client is paused: a client that has left is let go.  Without
        this, a wedged backend would keep a gone client's tunnel, its place in limits.max_connections and
        its count in least_conn for as long as it stays wedged."""
        if not client_has_left(self.peer):
            return False
        # What it sent last is still unread in the kernel, and the backend took nothing for it: nothing
        # can be delivered either way, and a FIN passed on now would tell the backend the client's stream
        # ended whole.  Both sides are cut.
        self.client_left_first()
        self.tunnel.abort()
        return True

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

    def eof_received(self) -> bool | None:
        self.backend_gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self.tunnel
        if exc is not None and isinstance(exc, OSError) and not tunnel.closed and not self.silenced:  # as above
            # Its close frame (or last frames) may wait unread behind the reset that ended it.  The client
            # end's peer is this end's own transport, the backend's.
            read_what_is_left(tunnel.client_end.peer, self._left_over)
        self.backend_gone()
        self.forget()

    def _left_over(self, data: bytes) -> bool:
        """Relay bytes read after the connection was lost; whether to read on (not past our own close)."""
        self.data_received(data)
        return not self.tunnel.closed and not self.silenced

    def backend_gone(self, *, unread: bool = False) -> None:
        """The backend's connection ended (EOF or error): close the tunnel, with 1012 if it did not close.

        `unread`: its end was seen by a look at its paused socket, not read: bytes it sent before may
        be left unread, so its client gets no close frame (a TCP close, as mid-frame).
        """
        tunnel = self.tunnel
        if tunnel.closed:
            return
        if (
            not self.silenced
            and not self.frames.close_seen
            and not tunnel.client_finished
            and not tunnel.client_end.frames.close_seen
        ):
            # The backend died rather than closing (and not in answer to the client's close frame, or
            # to its FIN passed on: a backend may answer either by hanging up without a close frame):
            # tell the client to reconnect now (1012), if a close frame can go between two frames;
            # mid-frame, only a TCP close is honest.
            tunnel.cause = "backend_lost"
            if self.frames.at_boundary and self.pending_close is None and not unread:
                self.peer.write(close_frame(SERVICE_RESTART, "backend went away"))
                self.silenced = True
                tunnel.ended_with = "close_frame"
                tunnel.close_code = SERVICE_RESTART
            else:
                tunnel.ended_with = "tcp"
        elif tunnel.client_finished or tunnel.client_end.frames.close_seen:
            self.client_left_first()  # the backend answered the client's close or FIN
        tunnel.close()

    def client_left_first(self) -> None:
        """The client ended the tunnel (hung up, or began the close, and the backend answered) while a close
        of ours still waited for a frame boundary: the balancer did not end it, so no close of ours is
        counted (`Stats.balancer_closes`, the drain's last line) or logged as its cause."""
        if self.pending_close is not None and not self.silenced:
            self.tunnel.cause = None

    def inject_close(self, code: int, reason: str, until: float | None = None) -> None:
        """Send the client a close frame at the next frame boundary of the backend's stream.

        None if the backend has sent its own (or is sending it): nothing may follow that frame (RFC 6455
        §5.5.1), and the close handshake it began is left to finish, within CLOSE_LINGER.  `until`
        (loop time) bounds the wait for a client still taking the frame in flight; by default
        `timeouts.shutdown_grace` from now.
        """
        if self.silenced or self.pending_close is not None or self.backend_closed_first:
            return
        if self.frames.close_seen:
            self._let_backend_close()
            return
        self.pending_close = (code, close_frame(code, reason))
        deadlines = self.tunnel.deadlines()
        self.close_by = (
            until if until is not None else deadlines.loop.time() + self.tunnel.ctx.config.timeouts.shutdown_grace
        )
        if self.frames.at_boundary:
            self._send_close()
        else:
            if self.deadline is not None:
                self.deadline.cancel()  # a half-close's linger: this close's own deadlines take over
            self.taken = taken_by(self.peer, self.nbytes)
            self.deadline = deadlines.call_later(CLOSE_DEADLINE, self._overdue)

    def _let_backend_close(self) -> None:
        """The backend began the close handshake before ours could go: ours is not sent (the rest of the
        backend's frame still is), the client's answer ends the tunnel, and one that does not answer
        is cut after CLOSE_LINGER."""
        self.pending_close = None
        self.backend_closed_first = True
        self.tunnel.cause = None  # the backend ended it, not the balancer: no balancer close is counted
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.tunnel.deadlines().call_later(CLOSE_LINGER, self.tunnel.close_or_abort)

    def linger(self) -> None:
        """The client has said its last: the backend has CLOSE_LINGER to finish, unless a close of
        ours already runs on its own deadline."""
        if self.deadline is None and not self.tunnel.closed:
            self.deadline = self.tunnel.deadlines().call_later(CLOSE_LINGER, self.tunnel.close_or_abort)

    def _overdue(self) -> None:
        """No frame boundary came yet: cut TCP, unless the client is still taking the frame in flight.

        A stalled reader pauses the backend, so its boundary may never come; a client that reads a
        long frame (a large message, a slow backend) gets its end, and then the close frame.  One
        look per CLOSE_DEADLINE: nothing is counted per byte for it.
        """
        if not self.silenced and not self._still_taking(self._overdue):
            self.tunnel.abort()

    def _send_close(self) -> None:
        assert self.pending_close is not None
        if self.frames.close_seen:  # the frame our close waited for was the backend's close
            self._let_backend_close()
            return
        if self.deadline is not None:
            self.deadline.cancel()
        code, frame = self.pending_close
        self.peer.write(frame)
        self.silenced = True
        self.tunnel.ended_with = "close_frame"
        # The code as sent, here and not when asked for: a close that never found a frame boundary
        # ends at TCP, and its log line must not name a code the client never got.
        self.tunnel.close_code = code
        # The client answers with its own close frame, which still reaches the
        # backend; whoever is slow to hang up after that is cut off, unless the client is still
        # taking what was sent before the close (`outlasts_linger`), until `close_by`.
        self.taken = taken_by(self.peer, self.nbytes)
        uploading = self.tunnel.client_end
        self.sent = uploading.nbytes
        self.upload_end = uploading.nbytes + uploading.frames.left_in_frame
        self.deadline = self.tunnel.deadlines().call_later(CLOSE_LINGER, self.tunnel.close_or_abort)

    def outlasts_linger(self) -> bool:
        """Our close frame went out behind bytes the client is still taking (a long frame, to a slow link),
        or while the client is still sending a frame (`still_uploading`): its linger is renewed, up to
        `close_by`, rather than the client cut with the frame's end and the close unread, or its message
        cut short.  Looked at once per linger, as `_overdue` looks at a close still waiting."""
        if not self.silenced:
            return False
        if self.still_uploading():
            return True
        if self.tunnel.client_end.peer.get_write_buffer_size():
            return False
        if not self.peer.get_write_buffer_size():
            return False  # all of it is the kernel's now: closing flushes it
        return self._still_taking(self.tunnel.close_or_abort)

    def still_uploading(self) -> bool:
        """Whether the client is still sending the frame it was in when our close went out, and sent some of
        it since the last look; if so, the tunnel is looked at again then (`next_close_look`).

        RFC 6455 §5.5.1 lets an endpoint finish the message it is sending before it answers a close, and a
        browser's answer waits behind it in its socket: a message of some megabytes over a slow uplink was
        cut CLOSE_LINGER after our close, lost to the backend, the client told 1006.  That frame's end is
        known from its header (a fragmented message's later frames are not waited for); one more look
        is given after it, for the close that follows.  A client paused behind a backend that takes
        nothing sends nothing, so is not waited for; nor one past `close_by`.
        """
        client = self.tunnel.client_end
        if self.sent >= self.upload_end or client.frames.close_seen or self.tunnel.client_finished:
            return False
        sent = client.nbytes
        if not self._look_again(self.sent, sent, self.tunnel.close_or_abort):
            return False
        self.sent = sent
        return True

    def _still_taking(self, look_again: Callable[[], None]) -> bool:
        """Whether the client took bytes since the last look and `close_by` is not past: if so, `look_again`
        is called at the next look (`next_close_look`)."""
        taken = taken_by(self.peer, self.nbytes)
        if not self._look_again(self.taken, taken, look_again):
            return False
        self.taken = taken
        return True

    def _look_again(self, before: int, now: int, look: Callable[[], None]) -> bool:
        """Progress from `before` to `now` (bytes) within `close_by`: `look` is called at the next look
        (`next_close_look`), and True; else False, nothing scheduled."""
        deadlines = self.tunnel.deadlines()
        wait = next_close_look(before, now, deadlines.loop.time(), self.close_by)
        if wait is None:
            return False
        self.deadline = deadlines.call_later(wait, look)
        return True


class Tunnel:
    """A client and a backend connection joined after the handshake."""

    __slots__ = (
        "_deadlines",
        "backend",
        "cause",
        "client_end",
        "client_finished",
        "client_ip",
        "client_port",
        "client_tls",
        "close_code",
        "closed",
        "ctx",
        "ended_with",
        "idle_mark",
        "opened_at",
        "pool",
        "request_id",
        "server_end",
    )

    def __init__(
        self, ctx: ProxyContext, backend: BackendStatus, client_ip: str, pool: str, request_id: str = "-"
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id  # of the handshake that opened it: its close line carries it too
        self.backend = backend
        self.client_ip = client_ip
        self.client_port = 0
        self.client_tls = False  # the client's connection is TLS: no half-close (asyncio's has none)
        self.pool = pool
        self.closed = False
        # Set when the balancer ends the tunnel: why ("shutdown", "drain", "idle", "backend_lost") and
        # what its client got ("close_frame", or "tcp" when no close frame could be delivered).
        self.cause: str | None = None
        self.ended_with = "tcp"
        self.close_code: int | None = None  # the close code the balancer sent the client, if it sent one
        self.client_finished = False  # the client's FIN was passed on: the backend's own end is the answer
        self.opened_at = _monotonic()
        # (bytes seen, when): the idle sweeper's last look.  None seen yet, so its first look stamps the
        # time: looks fall on its own grid, and a silence is never judged from between two of them.
        self.idle_mark = (-1, self.opened_at)
        self.client_end: WebSocketClientEnd
        self.server_end: WebSocketServerEnd  # every tunnel is a WebSocket's: the backend side reads frames
        self._deadlines: Deadlines | None = None  # see deadlines()

    @staticmethod
    def join(
        ctx: ProxyContext,
        backend: BackendStatus,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        client_end: WebSocketClientEnd,
        server_end: WebSocketServerEnd,
        client_ip: str,
        pool: str,
        to_server: bytes = b"",
        to_client: bytes = b"",
        server_closed: bool = False,
        request_id: str = "-",
        client_port: int = 0,
        client_lead: bytes = b"",
        client_full: bool = False,
        server_full: bool = False,
        deadlines: Deadlines | None = None,
        client_tls: bool = False,
        client_paused: bool = True,
        server_paused: bool = True,
    ) -> Tunnel:
        """Switch both transports to relaying; flush what each side sent ahead of the switch.

        The caller has already counted the connection on `backend`; the tunnel
        releases it on close.  `server_closed`: the backend hung up before the
        switch, so no callback will ever tell the tunnel's end; close after flushing.
        `request_id`: the handshake's id, repeated on the tunnel's close line (SPEC part 2).
        `client_lead`: bytes for the client ahead of `to_client` (the 101 head); both leave in
        one write (one syscall, not two), and only `to_client` counts as relayed.
        `client_full`, `server_full`: that transport is already over its high-water mark (it told
        the protocol before this one); its peer stays paused until it drains.
        `deadlines`: the handshake's, on the running loop (see `deadlines()`).
        `client_tls`: the client's connection is TLS (known to the caller; asking the transport for its
        `sslcontext` cost a client's hang-up about 1,800 instructions).
        `client_paused`, `server_paused`: that transport's reading may have been paused before the switch,
        so it is resumed here (unless its peer is full).  False when the caller knows it was not (as for
        nearly every handshake): a resume_reading of a transport that reads is a method looked up and
        called for nothing (480 instructions a handshake for both, `bench.instructions_live --profile`).
        `client_end`, `server_end`: the client's and the backend's transport's protocols already
        (`lb.proxy.server.ClientConnection` and `_Upstream` are ends), which become the tunnel's
        ends here: no set_protocol at the switch, which in uvloop looks up four methods of the new
        protocol and stops and starts reading (2,600 instructions each).
        """
        # Tunnel, not a classmethod's cls: compiled, the constructor is then called directly, not
        # through the type's call (its arguments packed into a tuple and parsed again).
        tunnel = Tunnel(ctx, backend, client_ip, pool, request_id)
        tunnel.client_port = client_port
        tunnel.client_tls = client_tls
        tunnel._deadlines = deadlines
        client_end.begin(tunnel, server)
        server_end.begin(tunnel, client)
        tunnel.client_end, tunnel.server_end = client_end, server_end
        ctx.tunnels.add(tunnel)
        tunnel.client_end.full = client_full
        tunnel.server_end.full = server_full
        # Full before the switch: no pause_writing comes to that end to start the looks.
        if server_full:
            tunnel.server_end.look_at_paused_peer_later()
        if client_full:
            tunnel.client_end.look_at_paused_peer_later()
        if to_server:
            tunnel.client_end.data_received(to_server)
        if client_lead:
            end = tunnel.server_end
            if to_client:
                end.frames.feed(to_client)  # what data_received does on a fresh end, in one write
                end.nbytes += len(to_client)
                client.write(client_lead + to_client)
                to_client = b""
            else:
                client.write(client_lead)
        if to_client:
            tunnel.server_end.data_received(to_client)
        if server_closed:
            tunnel.server_end.backend_gone()  # hung up right after its 101: the client still hears 1012
        elif not tunnel.closed:
            # Not past a pause the flush above caused (or one from before the switch): resumed
            # here, a side would be read into a peer that is full, and since that peer's transport
            # still counts itself paused, nothing would ever pause it again.
            if client_paused and not tunnel.server_end.full:
                client.resume_reading()
            if server_paused and not tunnel.client_end.full:
                server.resume_reading()
        return tunnel

    def deadlines(self) -> Deadlines:
        """Where this tunnel's deadlines go (`lb.proxy.deadlines`: a loop timer shared with others, not
        one each): the handshake's, else its own on the running loop, made once.  Not the loop asked
        for each time: on Python 3.11 every get_running_loop() is a getpid() system call (it checks
        for a fork), and a client's hang-up asked for one."""
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(asyncio.get_running_loop())
        return deadlines

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
        """A close frame was sent or is waiting for a frame boundary (or the backend's took its place)."""
        end = self.server_end
        return end.silenced or end.pending_close is not None or end.backend_closed_first

    def close_gracefully(
        self, code: int, reason: str, *, cause: str | None = None, until: float | None = None
    ) -> None:
        """End the tunnel with a close frame to the client (e.g. 1001, 1012), at a frame boundary.

        `cause` names why, for `Stats.balancer_closes` ("shutdown", "drain", "idle").  `until` (event
        loop time): how long a client still reading the backend's frame in flight is waited for
        (`WebSocketServerEnd.inject_close`).
        """
        if self.closed or self.closing:  # one close at a time; the first one's cause stays
            return
        if self.cause is None:
            self.cause = cause or f"close_{code}"
        self.server_end.inject_close(code, reason, until)

    def shut_down(self) -> None:
        """SIGTERM's close of this tunnel: a 1001 at a frame boundary (nothing, once closed), within
        the shutdown's grace (SPEC: close tunnels with 1001 after timeouts.shutdown_grace)."""
        self.close_gracefully(GOING_AWAY, "balancer shutting down", cause="shutdown", until=self.ctx.spread_until)

    def close_or_abort(self) -> None:
        """After the close linger: close if the client took everything we sent, else cut TCP."""
        if self.closed or self.server_end.outlasts_linger():
            return
        client = self.server_end.peer
        if client.get_write_buffer_size() or self.client_end.peer.get_write_buffer_size():
            self.abort()
        else:
            self.close()

    def abort(self) -> None:
        """Cut both connections at TCP level, dropping what is buffered (a peer that does not read).

        `ended_with` says what the client got: a close frame of ours that has left our buffer for it
        stays "close_frame" (the cut then costs only the backend, which did not take what the client
        sent, or has not hung up); one still in that buffer is dropped with it: "tcp".

        A side that left bytes in our buffer is reset (`reset`): it is not reading, and a FIN would
        keep what the kernel holds for it (up to megabytes) in FIN-WAIT-1 for minutes.  A client
        whose buffer is empty gets a FIN: the close frame it was sent may still be in the kernel.
        """
        if self.closed:
            return
        if _cut(self.server_end.peer):
            self.ended_with = "tcp"
        _cut(self.client_end.peer)
        self.close()

    def close(self) -> None:
        """Close both sides (buffered bytes are flushed first: `close_flushing`); idempotent."""
        if self.closed:
            return
        self.closed = True
        end = self.server_end
        if end.deadline is not None:
            end.deadline.cancel()
        # Each paused end's look is cancelled: it reads the end's tunnel, which `forget` takes.
        if end.paused_look is not None:
            end.paused_look.cancel()
        if self.client_end.paused_look is not None:
            self.client_end.paused_look.cancel()
        close_flushing(end.peer)
        close_flushing(self.client_end.peer)
        self.backend.connections -= 1
        stats = self.ctx.stats
        stats.closed_bytes_in += self.client_end.nbytes
        stats.closed_bytes_out += self.server_end.nbytes
        stats.tunnels_closed += 1
        if self.cause is not None:
            add_one(stats.balancer_closes, (self.cause, self.ended_with))
        self.ctx.tunnels.discard(self)
        if not self.ctx.tunnels and self.ctx.all_tunnels_closed is not None:
            self.ctx.all_tunnels_closed.set()
        # Milliseconds, as seconds: round(x, 3) rounds in decimal (a dtoa pass, 1,900 instructions);
        # this is the same value but at a tie (or a hair from one: x * 1000 may round onto it), for a tenth.
        duration = round_half_even((_monotonic() - self.opened_at) * 1000.0) / 1000.0
        if self.cause is None and self.close_code is None:  # a client or backend hung up: the common end
            log_tunnel_ended(
                self.client_ip, self.client_port, self.pool, self.backend.id, duration, self.bytes_in,
                self.bytes_out, self.request_id,
            )
            return
        log_tunnel_closed(
            client=self.client_ip, client_port=self.client_port, pool=self.pool, backend=self.backend.id,
            duration=duration, bytes_in=self.bytes_in, bytes_out=self.bytes_out, request_id=self.request_id,
            **({"cause": self.cause, "ended_with": self.ended_with} if self.cause else {}),
            **({"close_code": self.close_code} if self.close_code is not None else {}),
        )


_NO_LINGER: Final = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}


def reset(transport: asyncio.Transport) -> None:
    """Cut a connection with a TCP reset: abort() alone drops our buffer but closes with a FIN once the
    kernel has sent what it holds, which tells the peer it got everything (a body that ends at close
    passes for whole) and keeps a peer that reads nothing on the kernel's memory for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone: abort() below is all there is to do
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    transport.abort()


def _cut(transport: asyncio.Transport) -> bool:
    """abort(), as a reset when our buffer still holds bytes for the peer (`Tunnel.abort`); whether it did."""
    if transport.get_write_buffer_size():
        reset(transport)
        return True
    transport.abort()
    return False


def close_flushing(transport: asyncio.Transport) -> None:
    """close(), which sends what is buffered first, with no time limit of its own: a peer that keeps
    its window shut would hold the descriptor and our buffer for ever (a tunnel's counted nowhere once
    it has ended, an answer's place in limits.max_connections for good).  Watched instead, and cut
    once the peer has taken nothing for FLUSH_STALL; a slow reader that keeps taking bytes is not.

    A transport already closing (closed before, aborted, or lost) is left alone: asyncio's TLS
    transport (3.11) drops its TLS layer at a second close(), after which asking its buffer raises.
    """
    if transport.is_closing():
        return
    transport.close()
    pending = transport.get_write_buffer_size()
    if pending:
        asyncio.get_running_loop().call_later(FLUSH_STALL, _watch_flush, transport, pending)


def _watch_flush(transport: asyncio.Transport, before: int) -> None:
    pending = transport.get_write_buffer_size()
    if not pending:
        return
    if pending >= before:
        reset(transport)  # nothing taken for FLUSH_STALL: what the kernel holds for it goes too
        return
    asyncio.get_running_loop().call_later(FLUSH_STALL, _watch_flush, transport, pending)
