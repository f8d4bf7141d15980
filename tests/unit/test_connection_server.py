"""The asyncio shell around the core, on loopback sockets: counts released, bugs answered with a bare 500."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_connection import CONFIG, upgrade

from bench.handshake_shell import BenchLoop, FakeTransport, deliver
from lb.config.load import parse_config
from lb.proxy import server as server_module
from lb.proxy.server import ClientConnection, abort_in_flight, client_factory, stop_in_flight, wall_offset
from lb.proxy.tunnel import TunnelEnd, WebSocketServerEnd
from lb.state.context import ProxyContext
from lb.state.tally import Tally
from tests.harness.polling import wait_for as _wait


async def _serve(ctx: ProxyContext) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(client_factory(ctx), "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def _ctx() -> ProxyContext:
    return ProxyContext.build(
        parse_config(CONFIG, base_dir=Path("."), environ={}), lambda *_: None, wall_offset=wall_offset()
    )


async def test_a_bug_in_the_core_is_a_bare_500_and_releases_the_connection() -> None:
    """The bug: state the core takes for granted is not so (the route's pool is gone), and a KeyError
    leaves the core.  (Compiled, the shell calls the core's methods directly: none can be patched.)"""
    ctx = _ctx()
    ctx.pools.clear()
    server, port = await _serve(ctx)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a/x HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 3)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"KeyError" not in answer and b"Traceback" not in answer
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
        assert ctx.stats.rejected[500] == 1
    finally:
        server.close()


async def test_idle_and_partial_connections_at_stop() -> None:
    """stop_in_flight: an idle connection is closed quietly, a partial head gets 503; counts return to 0."""
    ctx = _ctx()
    server, port = await _serve(ctx)
    try:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        part_r, part_w = await asyncio.open_connection("127.0.0.1", port)
        part_w.write(b"GET /a/x HTTP/1.1\r\nHo")
        await _wait(lambda: ctx.handshaking == 2 and any(c.core._buf for c in ctx.in_flight))
        ctx.accepting = False
        await stop_in_flight(ctx, within=2.0)
        assert await asyncio.wait_for(idle_r.read(), 3) == b""
        refused = await asyncio.wait_for(part_r.read(), 3)
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Retry-After: 1" in refused
        for writer in (idle_w, part_w):
            writer.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()


async def test_a_connections_deadline_is_on_the_monotonic_clock() -> None:
    """The shell stamps events with the monotonic clock, so a step of the wall clock (an NTP step, a
    VM resumed) neither stretches nor cuts a connection's deadline: here, timeouts.handshake (5 s)."""
    ctx = _ctx()
    server, port = await _serve(ctx)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a/x HTTP/1.1\r\nHo")
        before = time.monotonic()
        await _wait(lambda: any(c.core._buf for c in ctx.in_flight))
        (connection,) = ctx.in_flight
        assert before - 1 < connection._timer_at - 5 < time.monotonic()
        writer.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()


def _request_at_backend(
    give: Callable[[Any, bytes], None], backend: FakeTransport, client: FakeTransport | None = None,
    request: bytes = b"GET /a/x HTTP/1.1\r\nHost: h\r\n\r\n", ctx: ProxyContext | None = None,
) -> tuple[ClientConnection, FakeTransport, Any]:
    """A shell (with a BenchLoop) whose client (`client`, or a plain one) sent `request` (`GET /a/x`) through
    `give` and whose backend is `backend`, connected: the connection, its client transport and its upstream
    protocol."""
    loop = BenchLoop(asyncio.get_running_loop())
    client = client or FakeTransport(("127.0.0.2", 40000))
    connection = ClientConnection(ctx or _ctx(), loop=loop)  # type: ignore[arg-type]
    connection.connection_made(client)  # type: ignore[arg-type]
    give(connection, request)
    upstream = loop.opened.pop()
    upstream.connection_made(backend)
    return connection, client, upstream


async def test_a_backend_read_while_the_client_is_full_is_paused_again() -> None:
    """uvloop starts reading a new connection after connection_made returns, undoing a pause made
    there; so the first bytes a backend sends while the client is not reading pause it again."""

    calls: list[str] = []

    class Backend(FakeTransport):
        def pause_reading(self) -> None:
            calls.append("pause")

    connection, client, upstream = _request_at_backend(deliver, Backend(("127.0.0.1", 7001)))
    connection.pause_writing()  # the client stopped reading: the backend is paused ...
    assert calls == ["pause"]
    calls.clear()  # ... and then, as uvloop does, reads anyway
    deliver(upstream, b"HTTP/1.1 200 OK\r\n")
    assert calls == ["pause"]
    connection.resume_writing()
    deliver(upstream, b"Content-Length: 0\r\n\r\n")
    assert calls == ["pause"]
    assert b"".join(client.written).startswith(b"HTTP/1.1 200 OK\r\n"), client.written  # the first read was kept


class _EndSeen(FakeTransport):
    """A client transport that says how the shell ended it: "close" (a FIN once flushed) or "abort" (reset)."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__(peer)
        self.ends: list[str] = []

    def close(self) -> None:
        self.ends.append("close")
        super().close()

    def abort(self) -> None:
        self.ends.append("abort")
        super().abort()


async def test_a_bug_in_the_core_mid_answer_resets_the_client() -> None:
    """An answer whose body ends at close, cut by a core bug: the client is reset, as by any cut, never
    closed cleanly, which would pass the part it got for the whole answer (RFC 9112 §8)."""
    connection, client, upstream = _request_at_backend(
        deliver, FakeTransport(("127.0.0.1", 7001)), _EndSeen(("127.0.0.2", 40000))
    )
    deliver(upstream, b"HTTP/1.1 200 OK\r\n\r\nhalf an ")
    connection.core._response_framer = None  # the bug: state the core takes for granted is gone
    deliver(upstream, b"answer")
    assert client.ends == ["abort"] and connection.core.closed
    assert b"".join(client.written).endswith(b"half an ") and b"500" not in b"".join(client.written)


async def test_a_bug_in_making_the_answers_head_is_a_bare_500() -> None:
    """Nothing of the answer has gone out: the client gets SPEC's bare 500, not the reset of an answer cut."""
    connection, client, upstream = _request_at_backend(
        deliver, FakeTransport(("127.0.0.1", 7001)), _EndSeen(("127.0.0.2", 40000))
    )
    connection.core._lookup = None  # the bug: state the core takes for granted is gone
    deliver(upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert client.ends == ["close"] and connection.core.closed
    assert b"".join(client.written).startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


async def test_a_bug_at_the_stops_bound_leaves_its_500_to_flush() -> None:
    """A core bug as the stop's bound passes (`abort_in_flight`) on a request still waiting for its answer:
    the bare 500 that internal_error writes is flushed (a close), not taken back by a reset after it."""
    class Rejected(Tally[int]):
        def __setitem__(self, status: int, count: int) -> None:
            if status == 503:  # the bug: the stop's own 503 cannot be counted
                raise RuntimeError("bug")
            super().__setitem__(status, count)

    connection, client, _upstream = _request_at_backend(
        deliver, FakeTransport(("127.0.0.1", 7001)), _EndSeen(("127.0.0.2", 40000))
    )
    ctx = connection._ctx
    ctx.stats.rejected = Rejected()
    abort_in_flight(ctx)
    assert client.ends == ["close"] and connection.core.closed and not ctx.in_flight
    assert b"".join(client.written).startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


@pytest.mark.parametrize("read", ["buffered", "data_received"])
async def test_a_read_through_data_received_is_the_same_read(read: str) -> None:
    """uvloop looks `data_received` up on every set_protocol (a missing one raises and catches an
    AttributeError per connection), so every protocol of the data plane has one; a transport that
    calls it, rather than get_buffer and buffer_updated, gets the same answer."""
    for protocol in (ClientConnection, server_module._Upstream, TunnelEnd, WebSocketServerEnd):
        assert callable(getattr(protocol, "data_received", None)), protocol

    def give(protocol: Any, data: bytes) -> None:
        if read == "buffered":
            deliver(protocol, data)
        else:
            protocol.data_received(data)

    backend = FakeTransport(("127.0.0.1", 7001))
    _, client, upstream = _request_at_backend(give, backend)
    assert b"".join(backend.written).startswith(b"GET /a/x HTTP/1.1\r\n")
    give(upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    answer = b"".join(client.written)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer


async def test_a_listeners_connections_share_its_deadlines_even_while_none_is_waiting() -> None:
    """lb.proxy.deadlines: one loop timer per slice of time for all of a listener's connections.  The
    connections it makes share its Deadlines from the first, when nothing waits in it yet."""
    factory = client_factory(_ctx(), asyncio.get_running_loop())
    first, second = factory(), factory()
    assert first._deadlines is second._deadlines


class _LostWithBytesLeft(FakeTransport):
    """A backend transport that an error ended with bytes still in its socket (`read_what_is_left` reads
    them), and that says which protocol it has now, as asyncio's and uvloop's do."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(("127.0.0.1", 7001))
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else super().get_extra_info(name, default)

    def get_protocol(self) -> Any:
        return self.protocol


async def test_a_101_read_from_a_lost_backend_ends_the_tunnel_it_opens() -> None:
    """What a backend sent ahead of the error that ended its connection is read in `connection_lost`; when
    it is the 101, the tunnel it opens makes this protocol its backend end inside that callback, and the
    loop tells no one else that the connection is lost.  The tunnel is told too: its client gets the
    101 and then 1012, rather than a tunnel left open to a backend that is gone."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        theirs.close()
        ctx = _ctx()
        backend = _LostWithBytesLeft(ours)
        _, client, upstream = _request_at_backend(deliver, backend, request=upgrade("/a/ws"), ctx=ctx)
        upstream.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        answer = b"".join(client.written)
        assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), answer
        assert answer.endswith(b"\x88\x13\x03\xf4backend went away"), answer  # close 1012
        assert not ctx.tunnels and client.closing and backend.closing
