"""Listeners that accept themselves: PROXY-protocol and TLS listeners.  [asyncio shell]

A listener with `proxy_protocol: true` (SPEC part 2) sits behind an L4
balancer (an NLB, HAProxy `send-proxy-v2`, kube-proxy) that puts a PROXY v1
or v2 header before the client's own bytes.  That header comes before
anything else, TLS included, so `loop.create_server` cannot be used: its
transport would start reading (or the TLS handshake) at once.

A TLS listener is served the same way, without the header: with
`create_server(ssl=...)` the TLS handshake runs inside the loop, which never
says when one fails (asyncio keeps our protocol in a reference cycle until
the garbage collector runs, so its `limits.max_connections` slot stayed taken)
and cannot be waited for at shutdown.  Here each handshake is a task we hold:
its end, whatever it is, releases the count at once, and SIGTERM waits for it.
Plain listeners keep `create_server` on uvloop: nothing happens between accept
and the protocol there, and its accept path is the cheapest.  On asyncio's own
loop they are served here too: its accept loop goes on calling accept() after
EMFILE within one wake-up and schedules a retry for each failure, so out of
descriptors it spins; this one pauses.

- `AcceptingServer` serves the listening sockets `listening_sockets` makes
  (SO_REUSEADDR, SO_REUSEPORT for `workers: N`, the listener's backlog; one
  per address a name resolves to) and accepts with `loop.add_reader` on
  each: non-blocking `accept()` in a loop until EAGAIN, at most a bounded
  batch per wake-up so one listener cannot starve the loop.  An
  accept that fails for want of descriptors or buffers (EMFILE, ENFILE, ...)
  is logged at most once per interval, as `lb.proxy.server` does for the
  other listeners, and accepting pauses: 0.1 s at first, doubling to a
  second while the shortage lasts, 0.1 s again after an accept succeeds.
  The short first pause is for the backlog a shortage leaves: many of its
  connections are clients long gone, whose TLS handshakes fail in a moment
  and give their descriptors back, and a fixed second between batches kept
  live clients waiting behind them for 10 s and more.
- With PROXY protocol and a `proxy_protocol_from` list, a peer outside it
  is closed at accept, unread: its header could name any client.  A
  link-local peer (`fe80::1%eth0`) is matched by its address, its zone aside.
- Each accepted socket is counted at once (`_Accepted`).  With PROXY
  protocol it gets a `_Preamble`: on readability it peeks
  (`recv(n, MSG_PEEK)`) and parses what it has so far plus the peeked bytes
  with the pure `lb.http.proxy_header.parse_proxy_header`.  Complete: it takes
  exactly the header's remaining bytes off the socket and not one more (what
  follows is the TLS ClientHello or the HTTP head, and belongs to the
  transport).  Incomplete: everything peeked is header, so it is taken and
  the preamble waits.  A `BadProxyHeader`, EOF, a socket error, or
  `timeouts.handshake` passing since accept closes the socket without an
  answer: the peer is an L4 balancer, not a client that could read one.
- Then `loop.connect_accepted_socket` wraps the socket in a transport
  (with TLS, the handshake starts only now) around a `ClientConnection`
  whose client address is the header's source, or the socket's peer for
  LOCAL / UNKNOWN headers (health checks of the L4 balancer).  The core's
  handshake deadline and the TLS handshake timeout both count from accept,
  so the header and the handshake share one `timeouts.handshake`.

The preamble counts in `ctx.handshaking` (so in `limits.max_connections`)
from accept, like a TLS handshake does; the count passes to the
`ClientConnection` when it is made, and is released exactly once on every
path.  A preamble holds at most one header's bytes (`MAX_V2_LENGTH` + 16).

`AcceptingServer` duck-types what the balancer uses of `asyncio.Server`
(`close()`, `wait_closed()`, `sockets`, `is_serving()`), so reload and shutdown handle it
like any other listener.  Closing stops accepting; headers still arriving
finish (bounded by `timeouts.handshake`) and then meet the core, which
answers according to the shutdown in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
import time
from collections.abc import Sequence

from lb.errors import LOCAL_ERRNOS, BadProxyHeader
from lb.http.client_address import IPNetwork, TrustedProxies, peer_address
from lb.http.proxy_header import MAX_V2_LENGTH, V2_FIXED, parse_proxy_header
from lb.log import Throttle
from lb.proxy.deadlines import Deadline, Deadlines
from lb.proxy.server import AcceptCount, ClientConnection, accept_errors
from lb.state.context import ProxyContext
from lb.tls import TLS_SHUTDOWN_TIMEOUT

log = logging.getLogger("lb.proxy.server")

# The most a header can be: peeking this much always shows its end (a v1 line is far shorter).
_PEEK = V2_FIXED + MAX_V2_LENGTH
_DISCARD = 64 * 1024  # what a refused peer's unread bytes are read off up to, for a FIN rather than a reset
_DISCARD_READ = 16 * 1024
# Accepts per wake-up: drains a burst of SYNs quickly without holding the loop for long.
_ACCEPT_BATCH = 128
# Seconds without accepting after EMFILE & co: the first pause, doubled up to the last (asyncio's one).
_ACCEPT_PAUSE_FIRST = 0.1
_ACCEPT_PAUSE_MAX = 1.0
# Errors of one connection already gone at accept: try the next one.
_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


def listening_sockets(host: str, port: int, *, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Non-blocking listening TCP sockets on (host, port): one on each address a name resolves to (both
    of `localhost`'s, say), as `loop.create_server` binds them; one for an address.  As there, an
    address of a family this host has no sockets for (IPv6 on a kernel without it) is skipped.

    Raises:
        OSError: the address cannot be resolved, or one of them bound (in use, not ours, no permission);
        the sockets bound before it are closed.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, kind, proto, address) for family, kind, proto, _, address in infos))
    unsupported: OSError = OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, address in addresses:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                unsupported = exc
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: an IPv6 listener is IPv6 only (an IPv4 one may share the port).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise unsupported
    return socks


def claim_address(host: str, port: int) -> list[socket.socket]:
    """Locks that claim (host, port)'s addresses for this `lb run` (its listener, or its workers'), one
    per address: Unix sockets in the abstract namespace, scoped as ports are to the network namespace
    and gone with the process.  Of two `lb run`s that start on one address at once, one takes it, the
    other is told the address is in use.  Without them, a `workers: N` owner's check of the port
    passed, and its workers bound it half a second later: a second `lb run` on it started in between,
    passed its own check, and both served.  None for port 0 (a port of its own each time).  Where Unix
    sockets cannot be made (a sandbox's policy), no lock: the binds still refuse an address in use.

    Raises:
        OSError: EADDRINUSE, an address another `lb run` claims (or this one, under another
        spelling); or it cannot be resolved.
    """
    if port == 0:
        return []
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    locks: list[socket.socket] = []
    try:
        for ip in dict.fromkeys(str(info[4][0]) for info in infos):
            try:
                lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:
                continue
            try:
                lock.bind(f"\0ws-affinity-lb listener {ip} {port}")
            except OSError as exc:
                lock.close()
                if exc.errno != errno.EADDRINUSE:
                    continue  # not a claim of someone else's: go without this lock
                raise OSError(errno.EADDRINUSE, "Address already in use (another lb run claims it, "
                              "or this one under another spelling)") from None
            locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.close()
        raise
    return locks


class AcceptingServer:
    """A listener that accepts itself (PROXY header, TLS, both, or plain on asyncio's loop); quacks like
    `asyncio.Server` for the balancer."""

    def __init__(
        self,
        ctx: ProxyContext,
        socks: Sequence[socket.socket],
        ssl_context: ssl.SSLContext | None,
        *,
        proxy_protocol: bool = True,
        proxy_from: Sequence[IPNetwork] = (),
        start_serving: bool = True,
    ) -> None:
        """`socks`: the listening sockets (`listening_sockets`: one per address of the listener's name);
        `proxy_from`: the listener's `proxy_protocol_from` (empty: a PROXY header from any peer)."""
        self._ctx = ctx
        self._ssl = ssl_context
        self._proxy_protocol = proxy_protocol
        self._proxy_from = TrustedProxies(tuple(proxy_from))
        # Past the limit and its answered overflow, a connection whose TLS handshake or PROXY header
        # comes first is closed at once (ctx.sheds); a plain one (asyncio's loop) is answered 503 at
        # its head, as create_server's are.
        self._sheds = ssl_context is not None or proxy_protocol
        self._loop = asyncio.get_running_loop()
        self._deadlines = Deadlines(self._loop)  # its connections' (lb.proxy.deadlines)
        self._preambles: set[_Preamble] = set()  # reading their PROXY header
        self._tasks: set[asyncio.Task[None]] = set()
        # Each socket's accepting pauses on its own after a failed accept: its handle to resume it.
        self._resume: dict[socket.socket, asyncio.TimerHandle] = {}
        self._pause = _ACCEPT_PAUSE_FIRST  # the next pause after a failed accept
        self._closed = asyncio.Event()
        self._socks = tuple(socks)
        self._open = True  # until close()
        self._serving = False
        if start_serving:
            self.start_serving_now()

    def start_serving_now(self) -> None:
        """Start accepting (once); for a listener made with start_serving=False."""
        if self._open and not self._serving:
            self._serving = True
            for sock in self._socks:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def start_serving(self) -> None:
        self.start_serving_now()

    def serve_tls_with(self, context: ssl.SSLContext) -> None:
        """A reload that keeps this TLS listener: its new context (certificate), for handshakes from now on."""
        self._ssl = context

    def believe_proxy_headers_from(self, networks: Sequence[IPNetwork]) -> None:
        """A reload that keeps this listener: its new `proxy_protocol_from`, for connections accepted from now."""
        self._proxy_from = TrustedProxies(tuple(networks))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (kept after close, as their addresses are still asked for in logs)."""
        return self._socks

    def is_serving(self) -> bool:
        return self._serving and self._open

    @property
    def pending(self) -> int:
        """Connections still reading their PROXY header or in their TLS handshake (being handed over)."""
        return len(self._preambles) + len(self._tasks)

    def close(self) -> None:
        """Stop accepting (idempotent); headers already arriving may still finish."""
        if not self._open:
            return
        self._open = False
        for sock in self._socks:
            resume = self._resume.pop(sock, None)
            if resume is not None:
                resume.cancel()
            elif self._serving:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._check_done()

    async def wait_closed(self) -> None:
        """Returns once closed and no connection is still in its preamble or hand-over."""
        await self._closed.wait()

    def _check_done(self) -> None:
        if not self._open and not self._preambles and not self._tasks:
            self._closed.set()

    # -- accept ------------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        if not self._open:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    continue
                # Out of descriptors or buffers, or anything else (not expected on a listening
                # socket): pause rather than spin on it.
                kind = "PROXY-protocol" if self._proxy_protocol else "TLS" if self._ssl is not None else "plain"
                where = "" if exc.errno in LOCAL_ERRNOS else f" on a {kind} listener"
                accept_errors.report(exc, "accept connections" + where)
                self._loop.remove_reader(sock.fileno())
                self._resume[sock] = self._loop.call_later(self._pause, self._resume_accepting, sock)
                self._pause = min(self._pause * 2, _ACCEPT_PAUSE_MAX)
                return
            self._pause = _ACCEPT_PAUSE_FIRST
            address = (peer[0], peer[1]) if peer else ("-", 0)
            if self._sheds and self._ctx.sheds():
                conn.close()
                self._ctx.stats.shed += 1
                continue
            if self._proxy_protocol:
                if self._proxy_from.networks and peer_address(address[0]) not in self._proxy_from:
                    # Not an L4 balancer of ours: its header would name any client it likes.
                    conn.close()
                    _refusals.report(address[0], "the peer is not in listeners[].proxy_protocol_from")
                    continue
                conn.setblocking(False)  # the preamble peeks; the transport sets the rest (TCP_NODELAY)
                self._preambles.add(_Preamble(self, conn, address))
            else:
                self._hand_over(_Accepted(self, conn, address), address)

    def _resume_accepting(self, sock: socket.socket) -> None:
        del self._resume[sock]
        if self._open:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    # -- hand-over ---------------------------------------------------------------------

    def _preamble_done(self, preamble: _Preamble) -> None:
        self._preambles.discard(preamble)
        self._check_done()

    def _hand_over(self, accepted: _Accepted, client: tuple[str, int]) -> None:
        """The header (if any) is complete: the socket becomes a ClientConnection's transport."""
        task = self._loop.create_task(self._connect(accepted, client))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, accepted))

    def abort_pending(self) -> None:
        """The end of a stop: connections still reading a PROXY header or in a TLS handshake are dropped.

        None of them has sent a request yet; stopping waited for them as long as it waits for
        anything (`lb.proxy.server.stop_in_flight`), and a silent one must not hold it longer.
        """
        for preamble in list(self._preambles):
            preamble.drop()
        for task in list(self._tasks):
            task.cancel()

    def _task_done(self, accepted: _Accepted, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not accepted.handing_over:
            # Cancelled before its first step (abort_pending in the turn it was handed over): `_connect`'s
            # `finally` never ran, and its count and socket would be held for good.
            accepted.release()
            accepted.sock.close()
        self._check_done()

    async def _connect(self, accepted: _Accepted, client: tuple[str, int]) -> None:
        accepted.handing_over = True  # from here on, the `finally` below releases what it must
        ctx, tls = self._ctx, self._ssl is not None
        made: ClientConnection | None = None

        def factory() -> ClientConnection:
            nonlocal made
            # Its count goes with it: from here on the connection releases it (or hands it to _end).
            made = ClientConnection(
                ctx, tls, client=client, accepted=accepted.accepted, count=accepted.count, loop=self._loop,
                deadlines=self._deadlines,
            )
            return made

        left = ctx.config.timeouts.handshake - (time.monotonic() - accepted.accepted)
        try:
            await self._loop.connect_accepted_socket(
                factory,
                accepted.sock,
                ssl=self._ssl,
                ssl_handshake_timeout=max(left, 0.001) if tls else None,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if tls else None,
            )
        except OSError as exc:  # ssl.SSLError and the handshake timeout's ConnectionAbortedError included
            # The transport has closed the socket.  Counted, not logged above DEBUG: scanners and plain
            # HTTP on a TLS port would flood the log.
            if tls:
                ctx.stats.tls_failures += 1
            log.debug("connection from %s closed %s: %r", client[0],
                      "during its TLS handshake" if tls else "before it started", exc)
        finally:
            # Once connection_made has run, the count is the connection's (this does nothing); before
            # it (a failed or cancelled handshake), it ends now.
            accepted.release()
            if made is None:
                accepted.sock.close()


class _RateLimitedRefusals:
    """Connections closed for want of a valid header: one warning per interval, with a count.

    Worth a warning (an L4 balancer not sending the header is a misconfiguration an operator
    must see), but a flood of garbage must not become a flood of log lines.
    """

    def __init__(self) -> None:
        self._throttle = Throttle()

    def report(self, peer: str, why: str) -> None:
        suppressed = self._throttle.due()
        if suppressed is None:
            log.debug("PROXY-protocol connection from %s closed: %s", peer, why)
            return
        log.warning(
            "closed a connection from %s without an answer: %s (listeners[].proxy_protocol is on; "
            "%d more like it since the last report)", peer, why, suppressed,
        )


_refusals = _RateLimitedRefusals()


class _Accepted:
    """One accepted socket, counted in ctx.handshaking from accept (its count goes to its ClientConnection)."""

    __slots__ = ("accepted", "count", "handing_over", "peer", "server", "sock")

    def __init__(self, server: AcceptingServer, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.accepted = time.monotonic()  # the clock of the connection's events (lb.proxy.server)
        self.count = AcceptCount(server._ctx)  # within limits.max_connections or not: decided now
        self.handing_over = False  # AcceptingServer._connect has started

    def release(self) -> None:
        """The socket closes before any ClientConnection took it: it counts no longer (once)."""
        self.count.release()


class _Preamble(_Accepted):
    """An accepted socket reading its PROXY header."""

    __slots__ = ("buf", "timer")

    def __init__(self, server: AcceptingServer, sock: socket.socket, peer: tuple[str, int]) -> None:
        super().__init__(server, sock, peer)
        self.buf = bytearray()
        self.timer: Deadline | None = server._deadlines.call_later(
            server._ctx.config.timeouts.handshake, self._timed_out
        )
        server._loop.add_reader(sock.fileno(), self._readable)

    def _stop_reading(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.server._loop.remove_reader(self.sock.fileno())

    def _abort(self, why: str) -> None:
        """Close without an answer: with a FIN, as SPEC's "closed" reads, once what the peer sent is read off
        (bytes left unread make the kernel answer the close with a reset, which a client reading to the
        end takes for an error).  Read off and dropped, at most `_DISCARD` bytes: more than that, and
        the reset it then gets is the flood's own doing."""
        _refusals.report(self.peer[0], why)
        with contextlib.suppress(OSError):  # BlockingIOError: all read; any other error: the reset is due
            for _ in range(_DISCARD // _DISCARD_READ):
                if not self.sock.recv(_DISCARD_READ):
                    break
        self._close()

    def _close(self) -> None:
        self._stop_reading()
        self.release()
        self.sock.close()
        self.server._preamble_done(self)

    def drop(self) -> None:
        """Closed unanswered at the end of a stop (no warning: not the L4 balancer's fault)."""
        self._close()

    def _timed_out(self) -> None:
        self.server._loop.remove_reader(self.sock.fileno())
        self.timer = None
        self._abort("no complete PROXY header within timeouts.handshake")

    def _readable(self) -> None:
        try:
            peeked = self.sock.recv(_PEEK - len(self.buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort(f"read failed: {exc.strerror or exc}")
            return
        if not peeked:
            if not self.buf:
                # Connected and closed without a byte: an L4 balancer's TCP health check, not a fault.
                log.debug("connection from %s closed before sending anything", self.peer[0])
                self._close()
                return
            self._abort("closed before a complete PROXY header")
            return
        try:
            header = parse_proxy_header(self.buf + peeked)
        except BadProxyHeader as exc:
            self._abort(str(exc))
            return
        # Complete: take exactly the rest of the header.  Incomplete: all that was peeked is header.
        want = len(peeked) if header is None else header.consumed - len(self.buf)
        try:
            taken = self.sock.recv(want)
        except (BlockingIOError, InterruptedError):  # pragma: no cover - the bytes were just peeked
            return
        except OSError as exc:  # pragma: no cover - as above
            self._abort(f"read failed: {exc.strerror or exc}")
            return
        self.buf += taken
        if header is None or len(self.buf) < header.consumed:
            return  # more to come; the next readability re-parses from what is taken so far
        self._stop_reading()
        self.server._preamble_done(self)
        self.server._hand_over(self, header.client_address or self.peer)

