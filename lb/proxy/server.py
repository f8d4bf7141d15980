"""The asyncio shell around `connection.Connection`: the one place where its actions become I/O.

Per client connection: one `ClientConnection` protocol, one deadline
(`lb.proxy.deadlines`: a place on a timer its listener's connections share,
replaced when the core asks for an earlier one) and, while
a request is being served, one `_Upstream` protocol on the backend connection.
No task and no `asyncio.timeout` per request; the backend connect is the one
coroutine (`loop.create_connection`), stepped by `lb.proxy.connecting`.  TLS
listeners accept themselves (`lb.proxy.preamble.AcceptingServer`, with
`ssl_handshake_timeout`); its `AcceptCount` counts it in `ctx.handshaking`
from accept, through the handshake, so that a TLS connection is counted and
held to `timeouts.handshake` from accept on, like any other.  Whether a connection is within
`limits.max_connections` is decided at accept too (`ProxyContext.count_in`),
in accept order, and carried to the core's `start`.

Reading from the client pauses for two reasons, tracked apart so that one
clearing does not undo the other: the core holds too many bytes, or the
backend's write buffer is full.  A full client write buffer pauses reading
from the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final, cast

from lb.errors import LOCAL_ERRNOS
from lb.http.forwarding import render_refusal
from lb.log import Throttle
from lb.proxy.actions import (
    Action,
    CloseBackend,
    CloseClient,
    JoinTunnel,
    OpenBackend,
    PauseClient,
    ResumeClient,
    SendBackend,
    SendClient,
    SetTimer,
)
from lb.proxy.connecting import Connecting
from lb.proxy.connection import CLOSED, RELAY, TUNNEL, Connection
from lb.proxy.deadlines import Deadline, Deadlines
from lb.proxy.randomness import random_bytes
from lb.proxy.reading import read_bytes
from lb.proxy.tunnel import Tunnel, WebSocketClientEnd, WebSocketServerEnd, close_flushing, read_what_is_left, reset
from lb.state.context import ProxyContext
from lb.state.observations import error_kind
from lb.state.tally import add_one
from lb.tls import bound_buffers

log: Final = logging.getLogger("lb.proxy")  # the data plane's logger, for both of its modules
# The clock every event is stamped with: monotonic, so that a step of the wall clock neither
# stretches nor cuts a deadline (the core adds `ctx.wall_offset` where it needs wall time).  A
# Final: compiled, a call from a C static rather than a lookup of the `time` module and then of
# its attribute (five a handshake).
_now: Final = time.monotonic


def wall_offset() -> float:
    """Wall-clock seconds minus the events' clock, as of now (`ProxyContext.wall_offset`)."""
    return time.time() - _now()


_HELD: Final = 1  # pause reasons, a bit each
_BACKEND_FULL: Final = 2


class _Upstream(WebSocketServerEnd):
    """The backend side while a request is served; detached (owner None) once dropped.

    After a WebSocket's switch it is its tunnel's backend end (`Tunnel.join(server_end=...)`), as
    `ClientConnection` becomes the client end: each callback of both phases asks `tunnelled` first.
    """

    __slots__ = ("owner", "transport", "tunnelled")

    def __init__(self, owner: ClientConnection) -> None:
        self.owner: ClientConnection | None = owner
        self.transport: asyncio.Transport | None = None
        self.tunnelled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        owner = self.owner
        if owner is None:
            transport.close()  # the attempt was given up while it connected
            return
        if owner.client_full:
            self.transport.pause_reading()  # the client is not reading: nothing more to pass it yet
        owner.backend_connected()

    def connect_failed(self, exc: BaseException) -> None:
        owner = self.owner
        if owner is None:
            return
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            owner.local_failure(exc)
            return
        owner.drive(owner.core.backend_failed, str(exc) or type(exc).__name__, _now(), error_kind(exc))

    def buffer_updated(self, nbytes: int) -> None:
        if self.tunnelled:
            super().data_received(read_bytes(nbytes))  # WebSocketServerEnd's, as its buffer_updated
            return
        self.data_received(read_bytes(nbytes))

    def data_received(self, data: bytes) -> None:
        # What buffer_updated reads, and for a transport that calls this instead.  Defined even so:
        # uvloop looks it up on every protocol it is given, and a missing one cost a raised and caught
        # AttributeError (about 1 µs a connection).
        if self.tunnelled:
            super().data_received(data)
            return
        owner = self.owner
        if owner is not None:
            if owner.client_full:
                # uvloop starts reading after connection_made returns, undoing a pause made there.
                cast(asyncio.Transport, self.transport).pause_reading()
            owner.received(data, from_backend=True)

    def eof_received(self) -> bool | None:
        if self.tunnelled:
            return super().eof_received()
        owner = self.owner
        if owner is not None:
            owner.drive(owner.core.backend_eof, _now())
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnelled:
            super().connection_lost(exc)
            return
        owner = self.owner
        if owner is not None and isinstance(exc, OSError):
            self._read_what_is_left(owner)
            if self.tunnelled:
                # What was left held a 101, and the tunnel it opened made this its backend end inside
                # this callback: the tunnel hears of the loss here (else it stayed open to a backend
                # that is gone, its client never told).
                super().connection_lost(exc)
                return
            owner = self.owner  # dropped, if what was left ended the answer
        if owner is not None:
            cause = f"connection lost: {exc}" if exc else "backend closed the connection"
            owner.drive(owner.core.backend_failed, cause, _now())

    def _read_what_is_left(self, owner: ClientConnection) -> None:
        """Pass on what the backend sent ahead of the error that ended its transport: a gateway that
        answers an upload from its head (a 413, a 401) and closes on the body it did not read resets
        the connection, and when the client's next bytes were handled first, the write of them met
        that reset and the answer was lost (the client got a 502).  See `read_what_is_left`."""

        def receive(data: bytes) -> bool:
            owner.received(data, from_backend=True)
            return self.owner is owner  # dropped once what was left ended the answer

        read_what_is_left(self.transport, receive)

    def pause_writing(self) -> None:
        if self.tunnelled:
            super().pause_writing()
            return
        owner = self.owner
        if owner is not None:
            owner.pause(_BACKEND_FULL)
            owner.drive(owner.core.backend_blocked, True, _now())

    def resume_writing(self) -> None:
        if self.tunnelled:
            super().resume_writing()
            return
        owner = self.owner
        if owner is not None:
            owner.resume(_BACKEND_FULL)
            owner.drive(owner.core.backend_blocked, False, _now())


class AcceptCount:
    """One client connection's place in ctx.handshaking, from its accept to its `_end`.

    Made at accept by a listener that accepts itself (`lb.proxy.preamble.AcceptingServer`:
    a PROXY header or a TLS handshake comes first), which decides then whether the
    connection is within limits.max_connections (`admitted`), in accept order.  The
    same object goes to the ClientConnection: handed over at connection_made (its `_end`
    releases the count from then on), or released by the listener when the TLS handshake
    fails, times out or is cancelled, or the header never completes.  Released
    exactly once, never dropped in between: no moment in which another accept could
    slip past the limit.
    """

    __slots__ = ("admitted", "counted", "ctx")

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.counted = True
        self.admitted = ctx.count_in()

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.ctx.handshaking -= 1

    def hand_over(self) -> None:
        """The connection is made: its `_end` releases the count from now on."""
        if not self.counted:
            # Released already: the listener's connect returned before connection_made ran. Neither
            # loop does that (the waiter is set after the protocol is told), but a count must never
            # go below what is open: take it again rather than let `_end` release it twice.
            self.ctx.handshaking += 1
        self.counted = False


class ClientConnection(WebSocketClientEnd):
    """One accepted client connection; the core decides, this carries it out.

    After a WebSocket's switch it is its tunnel's client end (`Tunnel.join(client_end=...)`): the
    transport's protocol from accept to close, so that the switch sets no new protocol (uvloop's
    set_protocol looks up four methods and stops and starts reading: 2,600 instructions a
    handshake).  Each callback the two phases share asks `tunnelled` first.
    """

    __slots__ = (
        "_accepted",
        "_client",
        "_connecting",
        "_ctx",
        "_deadlines",
        "_early",
        "_loop",
        "_paused",
        "_timer",
        "_timer_armed",
        "_timer_at",
        "_tls",
        "_transport",
        "_upstream",
        "client_full",
        "core",
        "tunnelled",
    )
    # The core goes at the switch (its request, decision and buffers are not the tunnel's to keep).
    __deletable__ = ("core",)

    def __init__(
        self,
        ctx: ProxyContext,
        tls: bool = False,
        *,
        client: tuple[str, int] | None = None,
        accepted: float | None = None,
        count: AcceptCount | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        """`client`: the client's (address, port) when not the socket's peer (a PROXY header's source);
        `accepted`: when the socket was accepted, if before this protocol is made;
        `count`: its place in ctx.handshaking since then (None: counted at connection_made);
        `loop`: the running loop, when the caller has it at hand (see `client_factory`);
        `deadlines`: the listener's, on that loop, shared with its other connections (None: its own)."""
        self._ctx = ctx
        # Asked once per listener, not per connection: on Python 3.11 every get_running_loop()
        # is a getpid() system call (it checks for a fork), and a handshake would make two.
        self._loop = loop or asyncio.get_running_loop()
        self._deadlines = deadlines if deadlines is not None else Deadlines(self._loop)
        self._accepted = accepted or 0.0
        self._client = client
        self._early = count  # counted, and timed, from its accept (a TLS handshake or PROXY header first)
        self._transport: asyncio.Transport | None = None
        self._timer: Deadline | None = None
        self._timer_at: float | None = None  # the deadline the core asked for (the events' clock)
        self._timer_armed = 0.0  # when the armed handle fires (the events' clock); may be before _timer_at
        self._upstream: _Upstream | None = None
        self._connecting: Connecting | None = None
        self._paused = 0
        self.client_full = False
        self._tls = tls
        self.core: Connection  # made in connection_made, once the peer is known
        self.tunnelled = False  # the tunnel's client end now (`_join`): the callbacks are WebSocketClientEnd's

    # -- client transport callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if self._tls:
            bound_buffers(self._transport)
        ctx = self._ctx
        client = self._client or transport.get_extra_info("peername") or ("-", 0)
        self.core = Connection(ctx, client_ip=client[0], client_port=client[1], tls=self._tls, random=random_bytes)
        early = self._early
        if early is not None:
            early.hand_over()  # counted since accept: _end releases it from now on
            self._early = None
            admitted = early.admitted
        else:
            admitted = ctx.count_in()
        ctx.in_flight.add(self)
        self._start(admitted)

    def buffer_updated(self, nbytes: int) -> None:
        if self.tunnelled:
            super().buffer_updated(nbytes)
            return
        self.received(read_bytes(nbytes), from_backend=False)

    def data_received(self, data: bytes) -> None:
        # As _Upstream.data_received: what buffer_updated reads, and there for uvloop's lookup.
        if self.tunnelled:
            super().data_received(data)
            return
        self.received(data, from_backend=False)

    def eof_received(self) -> bool | None:
        if self.tunnelled:
            return super().eof_received()
        if not self.drive(self.core.client_eof, _now()):
            return None
        # Keep our half open while an answer is still on its way (not possible under TLS).
        return None if self._tls or self._transport is None else True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnelled:
            super().connection_lost(exc)
            return
        self.run(self.core.client_lost())
        self._end()

    def pause_writing(self) -> None:
        if self.tunnelled:
            super().pause_writing()
            return
        self.client_full = True
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()
        self.drive(self.core.client_blocked, True, _now())

    def resume_writing(self) -> None:
        if self.tunnelled:
            super().resume_writing()
            return
        self.client_full = False
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()
        self.drive(self.core.client_blocked, False, _now())

    # -- actions -------------------------------------------------------------------

    def drive(self, event: Callable[..., list[Action]], *args: Any) -> bool:
        """Feed one event to the core and carry out its actions; False if the core raised.

        A core bug is caught here, and in the hot events' own `drive`s below: `internal_error`
        logs it (with its traceback, so it must run inside the except) and closes the connection.
        """
        try:
            actions = event(*args)
        except Exception:
            self.internal_error()
            return False
        self.run(actions)
        return True

    # `drive` for the events of every handshake (its start, its backend connected, each read), each
    # calling the core directly: a bound method of the core made for each, and its call through
    # `drive`, cost about 800 instructions a time, 4,000 a handshake.

    def _start(self, admitted: bool) -> None:
        try:
            actions = self.core.start(self._accepted or _now(), admitted)
        except Exception:
            self.internal_error()
            return
        self.run(actions)

    def backend_connected(self) -> None:
        try:
            actions = self.core.backend_connected(_now())
        except Exception:
            self.internal_error()
            return
        self.run(actions)

    def received(self, data: bytes, *, from_backend: bool) -> None:
        """Bytes read from the client, or from the backend of the request being served."""
        core = self.core
        try:
            actions = core.receive_backend(data, _now()) if from_backend else core.receive_client(data, _now())
        except Exception:
            self.internal_error()
            return
        self.run(actions)

    def run(self, actions: list[Action]) -> None:
        """Carry out the core's actions, in order.

        Bytes for the client wait while only timer actions follow them, so that the 101
        head and what the backend sent behind it (JoinTunnel.to_client) leave in one
        write: one syscall per handshake fewer.  Any other action writes them first.
        """
        lead: bytes | None = None  # client bytes held until the next non-timer action
        for action in actions:
            kind = type(action)
            if kind is SendClient:
                data = cast(SendClient, action).data
                lead = data if lead is None else lead + data
                continue
            if kind is SetTimer:
                self._set_timer(cast(SetTimer, action).at)
                continue
            if kind is JoinTunnel:
                self._join(cast(JoinTunnel, action), lead or b"")
                lead = None
                continue
            if lead is not None:
                if self._transport is not None:
                    self._transport.write(lead)
                lead = None
            if kind is SendBackend:
                upstream = self._upstream
                if upstream is not None and upstream.transport is not None:
                    upstream.transport.write(cast(SendBackend, action).data)
            elif kind is OpenBackend:
                self._open(cast(OpenBackend, action))
            elif kind is CloseBackend:
                self._drop_upstream()
            elif kind is CloseClient:
                self._close(cast(CloseClient, action).abort)
            elif kind is PauseClient:
                self.pause(_HELD)
            elif kind is ResumeClient:
                self.resume(_HELD)
        if lead is not None and self._transport is not None:
            self._transport.write(lead)

    def _set_timer(self, at: float | None) -> None:
        """Keep one deadline that is reached no later than the core's (give or take the GRAIN of
        `lb.proxy.deadlines`), placed again only when it must.

        One reached before the core's places itself again for the rest.  So a deadline
        that moves later, or goes away, costs no cancel and no new one, and the first
        is placed at most max(backend_connect, 1 s) ahead: a handshake's backend
        phase (a later deadline than that) then needs none of its own.  One
        deadline per handshake instead of three (each with a cancel).
        """
        self._timer_at = at
        if at is None:
            return  # a handle still armed finds nothing to do when it fires; _end cancels it
        timer = self._timer
        if timer is not None:
            if self._timer_armed <= at:
                return
            timer.cancel()
        now = _now()
        armed = now + min(at - now, max(self._ctx.config.timeouts.backend_connect, 1.0))
        self._timer_armed = armed
        self._timer = self._deadlines.call_at(armed, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        at = self._timer_at
        if at is None:
            return
        now = _now()
        if now < at:
            self._set_timer(at)  # armed early on purpose: the rest of the wait
            return
        self._timer_at = None
        self.drive(self.core.deadline, now)

    def _open(self, action: OpenBackend) -> None:
        loop = self._loop
        upstream = _Upstream(self)
        self._upstream = upstream
        self._connecting = Connecting(
            loop, loop.create_connection(lambda: upstream, action.host, action.port), upstream.connect_failed)

    def local_failure(self, exc: OSError) -> None:
        """The balancer itself is out of descriptors or memory: 503, and no backend is blamed."""
        _local_errors.report(exc)
        self.drive(self.core.local_failure, _now())

    def _drop_upstream(self) -> None:
        upstream = self._upstream
        if upstream is None:
            return
        self._upstream = None
        upstream.owner = None
        if upstream.transport is not None:
            close_flushing(upstream.transport)
        connecting = self._connecting
        self._connecting = None
        if connecting is not None:
            connecting.cancel()  # a no-op once it has ended
        self._paused &= ~_BACKEND_FULL
        self._apply_pause()

    def pause(self, reason: int) -> None:
        self._paused |= reason
        self._apply_pause()

    def resume(self, reason: int) -> None:
        self._paused &= ~reason
        self._apply_pause()

    def _apply_pause(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _close(self, abort: bool) -> None:
        transport = self._transport
        self._drop_upstream()
        if transport is not None:
            if abort:
                reset(transport)
            else:
                close_flushing(transport)

    def _join(self, action: JoinTunnel, head: bytes) -> None:
        """Hand both transports to a tunnel; `head` (the 101) goes out with the first bytes it relays."""
        upstream, client = self._upstream, self._transport
        assert upstream is not None and upstream.transport is not None and client is not None
        server = upstream.transport
        upstream.owner = None
        upstream.transport = None  # the tunnel's ends know their transports as each other's peer
        self._upstream = None
        self._connecting = None
        self._end()
        core = self.core
        del self.core
        self.tunnelled = upstream.tunnelled = True  # from here on every callback of both is the tunnel's
        tunnel = Tunnel.join(
            self._ctx,
            action.backend,
            client,
            server,
            client_ip=core.client_ip,
            client_port=core.client_port,
            pool=action.pool,
            to_server=action.to_server,
            to_client=action.to_client,
            server_closed=action.backend_closed,
            request_id=action.request_id,
            client_lead=head,
            client_full=self.client_full,
            server_full=bool(self._paused & _BACKEND_FULL),
            deadlines=self._deadlines,
            client_tls=self._tls,
            # Paused only as _apply_pause and client_full (pause_writing, the backend's connect) left them.
            client_paused=self._paused != 0,
            server_paused=self.client_full,
            client_end=self,
            server_end=upstream,
        )
        if not self._ctx.accepting:
            # A handshake that was at its backend when SIGTERM came completes, then closes: its tunnel
            # missed the shutdown's spread of 1001s, so it gets its own at a random moment of what is
            # left of the window.  A reconnect storm's handshakes complete together and must not all
            # be closed together (SPEC: never all at once); past the window, at once.
            left = self._ctx.spread_until - self._loop.time()
            if left > 0:
                self._loop.call_later(random.uniform(0.0, left), tunnel.shut_down)
            else:
                tunnel.shut_down()

    def _end(self) -> None:
        """This connection no longer counts as a handshake in progress (once)."""
        if self._transport is None:
            return
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ctx = self._ctx
        ctx.handshaking -= 1
        ctx.in_flight.discard(self)

    def internal_error(self) -> None:
        """A bug in the core: logged with its traceback; the client gets a bare 500 if nothing was sent yet,
        and is reset if its answer was under way (RELAY), as the core's own cuts of an answer are."""
        core = self.core
        log.error("internal error on a connection from %s (request %s)", core.client_ip, core.request_id, exc_info=True)
        add_one(self._ctx.stats.rejected, 500)
        answered = core.state in (RELAY, TUNNEL, CLOSED)
        mid_answer = core.state == RELAY
        with contextlib.suppress(Exception):
            self.run(core.client_lost(500, "internal_error"))  # releases the backend's count
        core.state = CLOSED
        self._drop_upstream()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if mid_answer:
                # Cut as the core cuts an answer (`_close(abort=True)`): a FIN would pass the part already
                # sent of a body that ends at close for all of it.
                reset(transport)
                return
            if not answered:
                transport.write(render_refusal(500, "Internal Server Error", core.request_id, {}))
            close_flushing(transport)

    # -- shutdown ------------------------------------------------------------------

    def shutdown(self) -> None:
        """Answer now (503) if nothing reached a backend yet; otherwise let the answer complete."""
        self.drive(self.core.shutdown, _now())


def client_factory(
    ctx: ProxyContext, loop: asyncio.AbstractEventLoop | None = None
) -> Callable[[], ClientConnection]:
    """The protocol factory for a plain listener on uvloop (`loop.create_server`); TLS and
    PROXY-protocol listeners, and plain ones on asyncio's own loop, accept themselves
    (`lb.proxy.preamble.AcceptingServer`).  Call it with the loop running (the loop that will
    serve the listener), or name that loop."""
    serving = loop or asyncio.get_running_loop()
    deadlines = Deadlines(serving)
    # Compiled, the lambda calls the native constructor directly: no argument tuple or keyword
    # dictionary to parse per connection, as a call from interpreted code would have.
    return lambda: ClientConnection(ctx, loop=serving, deadlines=deadlines)


async def stop_in_flight(
    ctx: ProxyContext, within: float, pending: Callable[[], int] = lambda: 0, streaming_within: float = 0.0,
    hurried: Callable[[], bool] = lambda: False,
) -> None:
    """SIGTERM: every handshake in flight gets its answer; wait up to `within` for them.

    Call after ctx.accepting is False and the listeners are closed.  A request that has not
    reached a backend gets 503 with Retry-After; one that has gets its answer; a connection
    idle between requests (or not yet speaking) is closed.  `pending`: connections the
    listeners still hold (a TLS handshake, a PROXY header arriving): each becomes a
    connection here when it completes, whose request is then refused (503) as it arrives.
    Answers still streaming to their clients then get until `streaming_within` (from the
    start, as the tunnels get `shutdown_grace`); `abort_in_flight` ends what is left.  Once `hurried()`
    (a second Ctrl-C), nothing more is waited for.
    """
    for connection in list(ctx.in_flight):
        connection.shutdown()
    loop = asyncio.get_running_loop()
    start = loop.time()

    # Polled, not an event: connections join while this waits (handshakes completing) and leave its
    # concern by entering RELAY inside the core; a 50 ms poll during shutdown costs nothing.  One the
    # core has closed is no one's concern either: its transport may still be closing (a TLS one waits
    # for a close_notify that a pooled client never sends), which held the stop for the whole grace
    # with no request in it; `abort_in_flight` ends it with the rest.
    def handshaking() -> bool:
        return loop.time() < start + within and bool(
            pending() or any(c.core.state != RELAY and c.core.state != CLOSED for c in ctx.in_flight)
        )

    def streaming() -> bool:
        return loop.time() < start + streaming_within and any(c.core.state != CLOSED for c in ctx.in_flight)

    while not hurried() and (handshaking() or streaming()):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def abort_in_flight(ctx: ProxyContext) -> None:
    """The end of a shutdown: a request still waiting for its answer gets its 503, an answer still
    streaming is cut, and the log says so."""
    left = list(ctx.in_flight)
    streaming = sum(1 for connection in left if connection.core.state == RELAY)
    if streaming:
        log.info("closing %d answer(s) still streaming to their clients at the end of shutdown", streaming)
    now = _now()
    for connection in left:
        # A core bug there is logged and ends the connection (internal_error): not reset after, which
        # would take back the 500 it has just written.
        connection.drive(connection.core.stop_bound_passed, now)
        connection._end()


# -- accept errors ----------------------------------------------------------------


class _RateLimitedErrors:
    """Out-of-descriptor errors: one log line per interval with a count, not a traceback each."""

    def __init__(self) -> None:
        self._throttle = Throttle()

    def report(self, exc: OSError, what: str = "connect to a backend") -> None:
        suppressed = self._throttle.due()
        if suppressed is not None:
            log.error("cannot %s: %s (%d more like it since the last report)", what, exc.strerror or exc, suppressed)


_local_errors = _RateLimitedErrors()
accept_errors = _RateLimitedErrors()  # shared with lb.proxy.preamble's own accept loop: one rate limit


def install_accept_error_filter(loop: asyncio.AbstractEventLoop) -> None:
    """Log accept errors (EMFILE, ENFILE, ...) once per interval; the loop itself retries accepting.

    asyncio reports each failed accept through the loop's exception handler
    with a traceback, then pauses that listener for a second; this filter keeps
    the pause and drops the flood.  Idempotent.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "_lb_accept_filter", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            # Out of descriptors or buffers: one line per interval, whatever ran out.
            if "accept" in str(context.get("message", "")):
                accept_errors.report(exc, "accept connections")
            else:
                _local_errors.report(exc, str(context.get("message") or "run"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler._lb_accept_filter = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
