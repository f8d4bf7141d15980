"""Tunnel ends with fake transports: close frames at boundaries, deadlines, backend loss → 1012.

The relay is callback-driven, so fake transports that record writes, closes and aborts are enough;
a short event loop runs only where a deadline (call_later) is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.proxy import tunnel as tunnel_module
from lb.proxy.deadlines import Deadlines
from lb.proxy.reading import READ_CHUNK, READ_VIEW
from lb.proxy.tunnel import CLOSE_DEADLINE, Tunnel, has_left, idle_sweep_interval, next_close_look, send_queue
from lb.state.context import ProxyContext
from lb.state.pool import BackendStatus
from lb.ws.frames import close_frame
from tests.harness.fake_tunnels import (
    CLOSE,
    CLOSE_WAIT,
    ESTABLISHED,
    FakeSocket,
    FakeTransport,
    join_tunnel,
    one_backend_context,
)

TEXT = b"\x81\x02hi"  # a whole unmasked text frame
PARTIAL = b"\x82\x64" + b"y" * 10  # 10 of 100 payload bytes
SERVER_CLOSE = b"\x88\x02\x03\xe8"  # the backend's own close 1000


def _setup() -> tuple[ProxyContext, BackendStatus]:
    ctx, backend = one_backend_context()
    backend.connections = 1  # the caller of join counts the connection
    return ctx, backend


def _join(client: FakeTransport, server: FakeTransport, **kwargs: Any) -> tuple[ProxyContext, Tunnel]:
    ctx, backend = _setup()
    kwargs.setdefault("client_tls", client.tls)  # the shell tells join, as it knows its listener
    tunnel = join_tunnel(ctx, backend, client, server, client_ip="1.2.3.4", pool="p", **kwargs)
    return ctx, tunnel


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_backend_lost_between_frames_sends_1012_then_closes() -> None:
    """EOF from the backend after whole frames: the client gets close 1012, counted as a close frame."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(TEXT)
        server.protocol.eof_received()
        assert bytes(client.written) == TEXT + close_frame(1012, "backend went away")
        assert tunnel.closed and client.closed and not client.aborted
        assert ctx.stats.balancer_closes[("backend_lost", "close_frame")] == 1
        assert tunnel.close_code == 1012

    _run(scenario())


def test_backend_lost_mid_frame_is_a_tcp_close() -> None:
    """Mid-frame no close frame may follow: the client gets exactly the partial bytes, then close."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(PARTIAL)
        server.protocol.connection_lost(ConnectionResetError())
        assert bytes(client.written) == PARTIAL and tunnel.closed
        assert ctx.stats.balancer_closes[("backend_lost", "tcp")] == 1

    _run(scenario())


def test_backend_that_sent_its_own_close_gets_no_1012() -> None:
    """A clean close handshake from the backend is relayed as is, nothing added."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(TEXT + SERVER_CLOSE)
        server.protocol.eof_received()
        assert bytes(client.written) == TEXT + SERVER_CLOSE and tunnel.closed
        assert not ctx.stats.balancer_closes

    _run(scenario())


def test_split_frame_headers_are_followed() -> None:
    """Opcode tracking survives frames split at any byte."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        _, tunnel = _join(client, server)
        stream = TEXT + SERVER_CLOSE
        for i in range(len(stream)):
            server.protocol.data_received(stream[i : i + 1])
        server.protocol.eof_received()
        assert bytes(client.written) == stream and tunnel.closed

    _run(scenario())


def test_close_that_finds_no_boundary_is_cut_after_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused backend mid-frame: the close frame waits, then both sides are aborted and counted as tcp."""
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(PARTIAL)
        tunnel.close_gracefully(1001, "going away", cause="idle")
        assert not tunnel.closed and bytes(client.written) == PARTIAL
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.aborted and server.aborted
        assert ctx.stats.balancer_closes[("idle", "tcp")] == 1
        assert tunnel.close_code is None  # never sent: the close line names no code

    _run(scenario())


def test_a_close_the_client_took_is_a_close_frame_even_when_the_backend_side_is_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client took our close frame (nothing left in its buffer) but the backend has not taken what
    the client sent: the linger cuts both at TCP level, yet the client got a close frame, and
    `ended_with` says what the client got."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport(buffered=1 << 20)
        ctx, tunnel = _join(client, server)
        tunnel.close_gracefully(1012, "service restart", cause="drain")
        assert bytes(client.written).endswith(close_frame(1012, "service restart"))
        await asyncio.sleep(0.2)
        assert tunnel.closed and server.aborted
        assert ctx.stats.balancer_closes == {("drain", "close_frame"): 1}
        assert tunnel.ended_with == "close_frame" and tunnel.close_code == 1012

    _run(scenario())


@pytest.mark.parametrize("taken", [True, False], ids=["close-taken", "close-still-buffered"])
def test_what_is_left_at_the_end_of_the_grace_counts_by_what_the_client_got(taken: bool) -> None:
    """SIGTERM's end of grace aborts what is left: a tunnel whose client took its 1001 ended with a
    close frame; one whose 1001 is still in our buffer (the client stopped reading) ended at TCP level."""

    async def scenario() -> None:
        client, server = FakeTransport(buffered=0 if taken else 4096), FakeTransport()
        ctx, tunnel = _join(client, server)
        tunnel.shut_down()
        tunnel.abort()  # as TunnelClosing.end does
        assert tunnel.closed and client.aborted
        assert ctx.stats.balancer_closes == {("shutdown", "close_frame" if taken else "tcp"): 1}

    _run(scenario())


@pytest.mark.parametrize(
    ("taken_before", "taken_now", "now", "close_by", "expected"),
    [
        (100, 100, 10.0, 40.0, None),  # took nothing since the last look: it stopped reading
        (100, 90, 10.0, 40.0, None),  # (cannot happen; still nothing taken)
        (100, 101, 10.0, 40.0, CLOSE_DEADLINE),  # still reading: look again a deadline later
        (100, 5000, 39.5, 40.0, 0.5),  # still reading, near the bound: the last look falls on it
        (100, 5000, 40.0, 40.0, None),  # at the bound: cut even a reader
        (100, 5000, 50.0, 40.0, None),  # past it (a close asked for after SIGTERM's grace)
    ],
    ids=["stalled", "no-progress", "reading", "reading-near-bound", "at-bound", "past-bound"],
)
def test_a_close_waits_on_only_while_its_client_takes_bytes_and_within_its_bound(
    taken_before: int, taken_now: int, now: float, close_by: float, expected: float | None
) -> None:
    """A close waiting for a frame boundary: the next look comes a CLOSE_DEADLINE later while the client
    took bytes since the last one, never past the close's bound; otherwise TCP is cut now."""
    assert next_close_look(taken_before, taken_now, now, close_by) == expected


def _feed_bit_by_bit(end: FakeTransport, piece: bytes, pieces: int, every: float) -> asyncio.Future[None]:
    """`piece` into `end`'s protocol every `every` seconds, `pieces` times; done when the last has gone
    or the tunnel has ended.

    Fed from a timer chain, not from the test's own sleeps: after a stall of the event loop, the feed
    that fell due runs before the close's look that fell due after it, so the look always sees the
    peer's progress, however loaded the machine.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def feed(left: int) -> None:
        if done.done():
            return
        tunnel = end.protocol.tunnel
        if left == 0 or tunnel is None or tunnel.closed:
            done.set_result(None)
            return
        end.protocol.data_received(piece)
        loop.call_later(every, feed, left - 1)

    feed(pieces)
    return done


def _stream_to_the_client(server: FakeTransport, pieces: int, *, every: float = 0.005) -> asyncio.Future[None]:
    """The backend's frame goes on: 40 bytes every `every` seconds, `pieces` times, to a client that
    takes each at once (its buffer stays empty)."""
    return _feed_bit_by_bit(server, b"y" * 40, pieces, every)


@pytest.mark.parametrize("how", ["drain", "shutdown"])
def test_a_client_still_reading_a_long_frame_gets_its_end_then_the_close(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The backend's frame goes on past many deadlines while the client keeps taking it: no cut; the
    close frame goes at the frame's end, the tunnel counted as ended by a close frame."""
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.02)
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.02)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(b"\x82\x7e\x03\xe8")  # a 1000-byte frame's header: mid-frame now
        if how == "drain":
            tunnel.close_gracefully(1012, "service restart", cause="drain")
        else:
            ctx.spread_until = asyncio.get_running_loop().time() + 10.0
            tunnel.shut_down()
        await _stream_to_the_client(server, 20)  # five deadlines' worth, a little at a time
        assert not tunnel.closed, "a client still reading was cut"
        server.protocol.data_received(b"y" * 200 + TEXT)
        code, reason = (1012, "service restart") if how == "drain" else (1001, "balancer shutting down")
        assert bytes(client.written).endswith(b"y" * 200 + close_frame(code, reason))
        await asyncio.sleep(0.1)
        assert tunnel.closed and not client.aborted
        assert ctx.stats.balancer_closes[(how, "close_frame")] == 1 and tunnel.close_code == code

    _run(scenario())


def test_a_client_reading_past_the_shutdown_grace_is_cut_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM's close waits for a reading client only until the grace ends (SPEC: tunnels are closed
    after timeouts.shutdown_grace): a frame that goes on past it is cut at TCP level."""
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.02)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(b"\x82\x7f" + (1 << 40).to_bytes(8, "big"))  # a frame without end
        loop = asyncio.get_running_loop()
        ctx.spread_until = loop.time() + 0.15
        tunnel.shut_down()
        await asyncio.wait_for(_stream_to_the_client(server, 1000), 5.0)  # ends when the tunnel is cut
        assert tunnel.closed and client.aborted
        assert loop.time() >= ctx.spread_until, "cut before the grace ended"
        assert ctx.stats.balancer_closes[("shutdown", "tcp")] == 1

    _run(scenario())


def _upload_to_the_backend(client: FakeTransport, pieces: int, *, every: float = 0.005) -> asyncio.Future[None]:
    """The client's frame goes on: 40 bytes every `every` seconds, `pieces` times (as `_stream_to_the_client`,
    the other way)."""
    return _feed_bit_by_bit(client, b"u" * 40, pieces, every)


_UPLOAD_HEADER = b"\x82\xfe\x03\xe8" + b"mask"  # a masked 1000-byte binary frame's header: mid-frame after it
_CLIENT_CLOSE = b"\x88\x82mask" + bytes(a ^ b for a, b in zip(b"\x03\xe8", b"ma", strict=True))


@pytest.mark.parametrize("how", ["drain", "shutdown"])
def test_a_client_still_sending_a_long_frame_when_our_close_goes_out_may_finish_it(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """RFC 6455 §5.5.1: an endpoint may finish the message it is sending before it answers a close.  The
    upload goes on past many lingers: its backend gets all of it and the client's close, no cut (it was
    cut CLOSE_LINGER after our close: the message lost, the client told 1006)."""
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.02)
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.02)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server)
        client.protocol.data_received(_UPLOAD_HEADER)
        if how == "drain":
            tunnel.close_gracefully(1012, "service restart", cause="drain")
        else:
            ctx.spread_until = asyncio.get_running_loop().time() + 10.0
            tunnel.shut_down()
        assert client.written.endswith(close_frame(*((1012, "service restart") if how == "drain"
                                                     else (1001, "balancer shutting down"))))
        await _upload_to_the_backend(client, 25)  # the frame's 1000 bytes, over some five lingers
        assert not tunnel.closed, "a client still sending its message was cut"
        client.protocol.data_received(_CLIENT_CLOSE)
        assert bytes(server.written) == _UPLOAD_HEADER + b"u" * 1000 + _CLIENT_CLOSE
        server.protocol.eof_received()  # the backend answers the client's close by hanging up
        assert tunnel.closed and not client.aborted and not server.aborted
        assert ctx.stats.balancer_closes[(how, "close_frame")] == 1

    _run(scenario())


@pytest.mark.parametrize("stall", ["stops sending", "sends past its frame", "past the bound"])
def test_an_upload_is_waited_for_only_while_its_frame_comes_and_within_the_close_bound(
    monkeypatch: pytest.MonkeyPatch, stall: str
) -> None:
    """A client that stops mid-frame, or goes on to other frames without answering our close, or is still
    sending when the close's bound (the shutdown grace) passes, is let go at the next look."""
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.02)
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.02)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        client.protocol.data_received(_UPLOAD_HEADER)
        loop = asyncio.get_running_loop()
        ctx.spread_until = loop.time() + (0.1 if stall == "past the bound" else 10.0)
        tunnel.shut_down()
        started = loop.time()
        if stall == "stops sending":
            await _upload_to_the_backend(client, 5)
        elif stall == "sends past its frame":
            await _upload_to_the_backend(client, 25)
            client.protocol.data_received(_UPLOAD_HEADER)  # a second message, no close
            await asyncio.wait_for(_upload_to_the_backend(client, 1000), 5.0)  # ends when the tunnel does
        else:
            client.protocol.data_received(b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"mask")
            await asyncio.wait_for(_upload_to_the_backend(client, 10_000), 5.0)
        await asyncio.sleep(0.1)
        assert tunnel.closed, "an upload that stopped, or went past its frame or the bound, kept the tunnel"
        if stall == "past the bound":
            assert loop.time() >= ctx.spread_until > started
        elif stall == "sends past its frame":
            assert loop.time() - started < 1.0

    _run(scenario())


def test_close_sent_but_not_taken_is_cut_after_the_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a boundary the close goes out; a client whose buffer never drains is aborted after the linger."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(buffered=1 << 20), FakeTransport()
        ctx, tunnel = _join(client, server)
        tunnel.close_gracefully(1012, "service restart", cause="drain")
        assert bytes(client.written).endswith(close_frame(1012, "service restart"))
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.aborted
        assert ctx.stats.balancer_closes[("drain", "tcp")] == 1
        assert tunnel.close_code == 1012  # sent, though the client never took it

    _run(scenario())


@pytest.mark.parametrize("split", [None, 1, 3], ids=["relayed", "header-in-flight", "payload-in-flight"])
def test_a_close_asked_for_after_the_backends_own_close_frame_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, split: int | None
) -> None:
    """The backend has begun the close handshake (its close frame relayed, or part of it): a close of
    ours asked for then (idle, drain, shutdown) sends nothing after it (RFC 6455 §5.5.1), counts no
    balancer close, and ends the tunnel after the close linger if the client never answers."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        stream = TEXT + SERVER_CLOSE
        cut = len(stream) if split is None else len(TEXT) + split
        server.protocol.data_received(stream[:cut])
        tunnel.close_gracefully(1001, "idle timeout", cause="idle")
        server.protocol.data_received(stream[cut:])
        tunnel.close_gracefully(1001, "idle timeout", cause="idle")  # the next idle look
        tunnel.shut_down()  # and a SIGTERM
        assert bytes(client.written) == stream and tunnel.closing and not tunnel.closed
        await asyncio.sleep(0.2)
        assert tunnel.closed and bytes(client.written) == stream
        assert not ctx.stats.balancer_closes and tunnel.close_code is None

    _run(scenario())


LATE_PING = b"\x89\x04late"  # a ping the backend sends after its own close frame (which it may not)


@pytest.mark.parametrize("cause", ["idle", "drain", "shutdown"])
def test_frames_after_the_backends_close_frame_do_not_let_a_close_of_ours_follow_it(
    monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """The backend sent its close frame, then a ping in a later read: the backend has still closed,
    so no close of ours goes after its close (RFC 6455 §5.5.1), and no balancer close is counted."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(TEXT + SERVER_CLOSE)
        server.protocol.data_received(LATE_PING)
        if cause == "shutdown":
            tunnel.shut_down()
        else:
            tunnel.close_gracefully(1012 if cause == "drain" else 1001, "bye", cause=cause)
        await asyncio.sleep(0.2)
        assert tunnel.closed and bytes(client.written) == TEXT + SERVER_CLOSE + LATE_PING
        assert not ctx.stats.balancer_closes and tunnel.close_code is None

    _run(scenario())


def test_a_backend_that_hangs_up_after_its_close_frame_and_a_later_frame_gets_its_client_no_1012() -> None:
    """Close frame, a ping after it, then EOF: the backend closed (no `backend_lost`, no 1012 after its
    own close)."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(SERVER_CLOSE)
        server.protocol.data_received(LATE_PING)
        server.protocol.eof_received()
        assert tunnel.closed and bytes(client.written) == SERVER_CLOSE + LATE_PING
        assert not ctx.stats.balancer_closes

    _run(scenario())


def test_a_client_fin_after_the_backends_close_and_a_later_frame_ends_the_tunnel_at_once() -> None:
    """The backend's close frame, then a ping: the client's FIN still finishes a close handshake, so the
    tunnel ends at once instead of passing the FIN on and lingering."""

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        _, tunnel = _join(client, server)
        server.protocol.data_received(SERVER_CLOSE)
        server.protocol.data_received(LATE_PING)
        client.protocol.eof_received()
        assert tunnel.closed and not server.eof_written

    _run(scenario())


# Drawn from the whole range, idle timeouts were under 2 s in 7% of examples and from 2 to 10 s (one look a
# second, the parts a whole number of seconds at most) in 1%: each of the three rules' ranges is drawn alike.
@given(st.one_of(st.floats(min_value=0.001, max_value=2), st.floats(min_value=2, max_value=10),
                 st.floats(min_value=10, max_value=30 * 86400)))
def test_the_idle_sweep_divides_idle_into_at_least_two_parts_of_at_most_max_1s_and_a_tenth(idle: float) -> None:
    """A tunnel is closed between `idle` and `idle` + one interval after its last byte: the interval is
    a whole part of `idle` (no look lands just short of it), at most half of it, and at most
    max(1 s, idle / 10)."""
    interval = idle_sweep_interval(idle)
    parts = idle / interval
    assert abs(parts - round(parts)) < 1e-6 and round(parts) >= 2
    assert interval <= max(1.0, idle / 10) * (1 + 1e-9)


def test_close_taken_is_a_clean_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that takes the close (empty buffer) is closed normally and counted as close_frame."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server)
        tunnel.close_gracefully(1001, "going away", cause="shutdown")
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.closed and not client.aborted
        assert ctx.stats.balancer_closes[("shutdown", "close_frame")] == 1
        assert tunnel.close_code == 1001

    _run(scenario())


class KeepingTransport(FakeTransport):
    """Keeps each object written, as a transport whose buffer is not empty does."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes | bytearray] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


def test_reads_go_through_one_shared_buffer_and_each_is_copied_out() -> None:
    """Both ends read into the data plane's one buffer, at most READ_CHUNK at a time; what a transport
    keeps is a copy, so the next read (of any tunnel) cannot change bytes still waiting to go out."""
    client, server = KeepingTransport(), KeepingTransport()
    _, tunnel = _join(client, server)
    for end, frames in ((client.protocol, [b"\x81\x03abc", b"\x81\x03xyz"]), (server.protocol, [TEXT, TEXT])):
        for frame in frames:
            buffer = end.get_buffer(-1)
            assert len(buffer) == READ_CHUNK
            buffer[: len(frame)] = frame
            end.buffer_updated(len(frame))
    assert server.chunks == [b"\x81\x03abc", b"\x81\x03xyz"] and client.chunks == [TEXT, TEXT]
    assert tunnel.bytes_in == 10 and tunnel.bytes_out == 2 * len(TEXT) and tunnel.server_end.frames.at_boundary
    # As `bytes`: uvloop writes those by its fast path, and wraps anything else in a cast memoryview.
    assert all(type(chunk) is bytes for chunk in server.chunks + client.chunks)


def test_a_client_half_close_is_passed_on_and_the_backends_answer_still_reaches_it() -> None:
    """Close frame, then FIN: the backend gets the FIN, its close frame still reaches the client, and
    the backend's own close (RFC 6455 §7.1.1: the server closes TCP first) ends the tunnel."""

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server)
        client.protocol.data_received(CLIENT_CLOSE)
        assert client.protocol.eof_received() is True  # our half towards the client stays open
        assert server.eof_written and not tunnel.closed
        server.protocol.data_received(close_frame(1000, "bye"))
        assert bytes(client.written).endswith(close_frame(1000, "bye"))
        server.protocol.eof_received()
        assert tunnel.closed and client.closed and not client.aborted and not ctx.tunnels

    _run(scenario())


def test_a_tunnel_given_its_loop_never_asks_asyncio_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hang-up's linger goes on the loop the tunnel was given: on Python 3.11 each
    get_running_loop() is a getpid() system call, and every client that hangs up asked for one."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server, deadlines=Deadlines(loop))

        def no_loop() -> asyncio.AbstractEventLoop:
            raise AssertionError("the tunnel asked asyncio for its loop")

        monkeypatch.setattr(asyncio, "get_running_loop", no_loop)
        client.protocol.data_received(CLIENT_CLOSE)  # close frame, then FIN: the FIN is passed on
        assert client.protocol.eof_received() is True
        linger = tunnel.server_end.deadline
        assert linger is not None and not linger.cancelled()
        server.protocol.eof_received()
        assert tunnel.closed and linger.cancelled() and not ctx.tunnels

    _run(scenario())


def test_a_client_eof_after_a_finished_close_handshake_ends_the_tunnel_at_once() -> None:
    """The usual end: the backend's close frame went out, then the client closes; nothing is left to
    relay, so the backend's connection count drops with the client's close, not a round trip later."""

    async def scenario() -> None:
        for by_backend in (True, False):
            client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
            ctx, tunnel = _join(client, server)
            if by_backend:
                server.protocol.data_received(close_frame(1000, "bye"))
            else:
                tunnel.close_gracefully(1001, "going away", cause="shutdown")
            assert client.protocol.eof_received() is None
            assert tunnel.closed and not server.eof_written and not ctx.tunnels

    _run(scenario())


# Close 1000 as a client sends it: masked, key 12 34 56 78 (RFC 6455 §5.3).
CLIENT_CLOSE = b"\x88\x82\x12\x34\x56\x78" + bytes(b ^ k for b, k in zip(b"\x03\xe8", b"\x12\x34", strict=True))
CLIENT_TEXT = b"\x81\x82\x00\x00\x00\x00hi"  # a masked text frame (a zero key)


def _client_sends(client: FakeTransport, data: bytes, how: str) -> None:
    """The client's bytes as a transport delivers them: one read, or a byte per read (both through the
    shared read buffer, as the transports fill it)."""
    pieces = [data] if how == "one read" else [data[i : i + 1] for i in range(len(data))]
    for piece in pieces:
        READ_VIEW[: len(piece)] = piece
        client.protocol.buffer_updated(len(piece))


@pytest.mark.parametrize("how", ["one read", "byte by byte", "ahead of the switch"])
def test_a_backend_that_hangs_up_after_the_clients_close_frame_is_not_a_backend_lost(how: str) -> None:
    """The client sent close 1000 and the backend, instead of a close frame back, closes TCP (a sloppy
    but common server): it answered; the client gets no 1012 "backend went away" and no `backend_lost`
    close is counted."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        stream = CLIENT_TEXT + CLIENT_CLOSE
        if how == "ahead of the switch":
            ctx, tunnel = _join(client, server, to_server=stream)
        else:
            ctx, tunnel = _join(client, server)
            _client_sends(client, stream, how)
        assert bytes(server.written) == stream
        server.protocol.data_received(TEXT)
        server.protocol.eof_received()
        assert tunnel.closed and client.closed and not client.aborted
        assert bytes(client.written) == TEXT  # no close frame of ours
        assert tunnel.cause is None and not ctx.stats.balancer_closes

    _run(scenario())


def test_a_close_frame_inside_a_clients_message_is_no_close() -> None:
    """A binary message whose payload ends with the bytes of a masked close frame: frames are followed
    from the first header, so this is no close, and a backend that hangs up then is a backend lost."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, _ = _join(client, server)
        payload = b"x" * 10 + CLIENT_CLOSE
        _client_sends(client, bytes((0x82, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload, "one read")
        server.protocol.eof_received()
        assert bytes(client.written) == close_frame(1012, "backend went away")
        assert ctx.stats.balancer_closes[("backend_lost", "close_frame")] == 1

    _run(scenario())


@pytest.mark.parametrize(
    "how", ["reset", "close-frame-answered", "close-frame-alone-answered", "fin-answered", "tls-close"]
)
def test_a_client_that_ends_the_tunnel_while_our_close_waits_for_a_boundary_is_no_close_of_ours(how: str) -> None:
    """The client hangs up (or closes, and the backend answers) while our 1012 still waits for the end of
    the backend's frame: the client ended the tunnel, so no balancer close is counted or logged as its cause."""

    async def scenario() -> None:
        client = FakeTransport(half_close=True, tls=how == "tls-close")
        server = FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server, to_client=PARTIAL)
        tunnel.close_gracefully(1012, "service restart", cause="drain")
        assert not tunnel.closed and tunnel.closing
        if how == "reset":
            client.protocol.connection_lost(ConnectionResetError())
        elif how == "tls-close":
            client.protocol.eof_received()
        else:
            if how.startswith("close-frame"):
                client.protocol.data_received(b"\x88\x82abcdb\x8a")  # close 1000, masked with "abcd"
            if how != "close-frame-alone-answered":  # that one's client keeps its side open
                client.protocol.eof_received()
            server.protocol.eof_received()  # the backend hangs up in answer, mid-frame
        assert tunnel.closed and tunnel.cause is None and tunnel.close_code is None
        assert not ctx.stats.balancer_closes
        assert bytes(client.written) == PARTIAL  # no close frame of ours

    _run(scenario())


def test_a_client_that_hangs_up_without_a_close_frame_is_not_a_backend_lost() -> None:
    """A killed app's FIN, passed on (no kernel here says the backend has taken everything): the backend
    then closes without a close frame, which is its answer to that FIN, not a crash. No 1012 to a client
    that has left, no `backend_lost` close."""

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server, to_client=TEXT)
        client.protocol.eof_received()
        server.protocol.eof_received()
        assert tunnel.closed and tunnel.cause is None and not ctx.stats.balancer_closes
        assert bytes(client.written) == TEXT  # no close frame of ours

    _run(scenario())


def test_a_fin_with_no_close_frame_before_it_ends_the_tunnel_at_once() -> None:
    """A client that hangs up without its close frame has dropped its WebSocket (1006): once the backend
    has taken every byte it sent (the kernel's send queue towards it empty: here a socket pair's, idle),
    the backend's side is closed (no FIN alone, no linger), the client's too, and the backend's count
    drops now.  After the client's close frame the same FIN is passed on
    (`test_a_client_half_close_is_passed_on_and_the_backends_answer_still_reaches_it`)."""

    async def scenario() -> None:
        with _socket_pair() as (ours, _):
            client = FakeTransport(half_close=True)
            server = FakeTransport(half_close=True, sock=FakeSocket(fd=ours.fileno()))
            ctx, tunnel = _join(client, server, deadlines=Deadlines(asyncio.get_running_loop()))
            client.protocol.data_received(CLIENT_TEXT)
            assert client.protocol.eof_received() is None
            assert tunnel.closed and tunnel.server_end.deadline is None and not ctx.tunnels
            assert bytes(server.written) == CLIENT_TEXT and server.closed and not server.eof_written
            assert client.closed and not client.aborted and tunnel.backend.connections == 0
            assert tunnel.cause is None and not ctx.stats.balancer_closes

    _run(scenario())


def test_a_fin_with_nothing_relayed_before_it_ends_the_tunnel_without_asking_the_kernel() -> None:
    """A client that relayed nothing (it read its hello and hung up, as the benchmark's does): all the
    backend was written is the head it answered, so it has taken everything, and no kernel is asked."""

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)  # no socket to ask
        ctx, tunnel = _join(client, server, to_client=TEXT)
        assert client.protocol.eof_received() is None
        assert tunnel.closed and server.closed and not server.eof_written and not ctx.tunnels

    _run(scenario())


@pytest.mark.parametrize(("client_tls", "backend_half_close"), [(True, True), (False, False)], ids=["tls", "no-fin"])
def test_after_the_clients_close_frame_a_fin_that_cannot_be_passed_on_closes_at_once(
    client_tls: bool, backend_half_close: bool
) -> None:
    """As `test_a_client_half_close_closes_at_once_where_it_cannot_be_passed_on`, after the client's close
    frame, so that these two conditions decide and not the bare FIN's (from the review of 1acd7b0)."""

    async def scenario() -> None:
        client = FakeTransport(half_close=not client_tls, tls=client_tls)
        server = FakeTransport(half_close=backend_half_close)
        _, tunnel = _join(client, server)
        client.protocol.data_received(CLIENT_CLOSE)
        assert not client.protocol.eof_received()
        assert tunnel.closed and not server.eof_written

    _run(scenario())


@pytest.mark.parametrize("how", ["backend-close-then-ping", "our-close-sent"])
def test_after_a_finished_close_handshake_the_clients_fin_ends_the_tunnel_at_once(how: str) -> None:
    """The close handshake done (the backend's close frame seen, or ours sent), the client's FIN after its
    own close frame ends the tunnel at once: those conditions decide, not the bare FIN's."""

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server)
        if how == "backend-close-then-ping":
            server.protocol.data_received(SERVER_CLOSE)
            server.protocol.data_received(LATE_PING)
        else:
            tunnel.close_gracefully(1001, "going away", cause="shutdown")
        client.protocol.data_received(CLIENT_CLOSE)
        assert client.protocol.eof_received() is None
        assert tunnel.closed and not server.eof_written and not ctx.tunnels

    _run(scenario())


@contextlib.contextmanager
def _socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected local sockets: the kernel's answer to "what is queued" without a network."""
    pair = socket.socketpair()
    try:
        yield pair
    finally:
        for sock in pair:
            sock.close()


def test_the_send_queue_is_the_kernels_word_or_none() -> None:
    """`send_queue` (the tunnel's FIN and the admin port's slow readers ask it): bytes the peer has not
    read are counted (a local socket counts its buffers' size too), none once read; no socket, or one
    whose descriptor is gone, gives None, never a guess."""
    with _socket_pair() as (ours, theirs):
        transport = FakeTransport(sock=FakeSocket(fd=ours.fileno()))
        assert send_queue(transport) == 0
        ours.send(b"x" * 1000)
        queued = send_queue(transport)
        assert queued is not None and queued >= 1000
        assert theirs.recv(4096) == b"x" * 1000
        assert send_queue(transport) == 0
    assert send_queue(FakeTransport(sock=FakeSocket())) is None  # no descriptor
    assert send_queue(FakeTransport()) is None  # no socket


@pytest.mark.parametrize("queued", ["buffered", "in-the-kernel", "no-descriptor", "no-socket"])
def test_a_fin_with_no_close_frame_is_passed_on_while_the_backend_has_bytes_to_take(queued: str) -> None:
    """Closed with bytes still on their way, the backend's socket would answer its next ping with a reset
    and the kernel would drop them (a slow reader behind a large last message): the FIN is passed on, and
    the backend's own close ends the tunnel, as after a close frame.  So where the kernel cannot be asked."""

    async def scenario() -> None:
        with _socket_pair() as (ours, _):
            if queued == "in-the-kernel":
                ours.send(b"x" * 1000)  # not read by the other end
            sock = {"no-descriptor": FakeSocket(), "no-socket": None}.get(queued, FakeSocket(fd=ours.fileno()))
            client = FakeTransport(half_close=True)
            server = FakeTransport(1 if queued == "buffered" else 0, half_close=True, sock=sock)
            ctx, tunnel = _join(client, server, deadlines=Deadlines(asyncio.get_running_loop()))
            client.protocol.data_received(CLIENT_TEXT)  # relayed: what the backend has taken is the kernel's to say
            assert client.protocol.eof_received() is True
            assert server.eof_written and not server.closed and not tunnel.closed
            assert tunnel.server_end.deadline is not None  # the linger
            server.protocol.eof_received()
            assert tunnel.closed and not ctx.tunnels

    _run(scenario())


def test_a_backend_slow_to_finish_after_the_clients_half_close_is_closed_after_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A half-closed tunnel is not kept for a backend that never hangs up."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server)
        client.protocol.data_received(CLIENT_CLOSE)
        assert client.protocol.eof_received() is True and not tunnel.closed
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.closed and server.closed and not ctx.tunnels

    _run(scenario())


def test_an_eof_after_the_tunnel_ended_is_ignored() -> None:
    """A TLS client's close_notify comes after the backend's end let go of everything (`forget`): its
    EOF must find nothing to do, not raise (asyncio logs that as an ERROR with a traceback)."""

    async def scenario() -> None:
        client, server = FakeTransport(tls=True), FakeTransport(half_close=True)
        _, tunnel = _join(client, server)
        client_end = client.protocol
        server.protocol.eof_received()  # the backend hangs up first
        server.protocol.connection_lost(None)
        assert tunnel.closed
        assert client_end.eof_received() is None

    _run(scenario())


def test_a_close_injected_during_a_half_close_linger_replaces_its_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drain or shutdown mid-frame while the client's FIN lingers: one deadline runs, not two, and none
    fires on a tunnel that has already ended."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 0.1)

    async def scenario() -> None:
        client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
        ctx, tunnel = _join(client, server)
        server.protocol.data_received(b"\x82\x7e\x00\x10" + b"x" * 4)  # mid-frame: no boundary
        client.protocol.data_received(CLIENT_CLOSE)
        client.protocol.eof_received()
        linger = tunnel.server_end.deadline
        tunnel.close_gracefully(1001, "going away", cause="shutdown")
        assert linger is not None and linger.cancelled()
        await asyncio.sleep(0.3)
        assert tunnel.closed and client.aborted and ctx.stats.balancer_closes[("shutdown", "tcp")] == 1
        tunnel.close_or_abort()  # a late timer on an ended tunnel: nothing happens

    _run(scenario())


@pytest.mark.parametrize(("client_tls", "backend_half_close"), [(True, True), (False, False)], ids=["tls", "no-fin"])
def test_a_client_half_close_closes_at_once_where_it_cannot_be_passed_on(
    client_tls: bool, backend_half_close: bool
) -> None:
    """asyncio's TLS transport has no half-close, and a backend that cannot take a FIN cannot hear it."""

    async def scenario() -> None:
        client = FakeTransport(half_close=not client_tls, tls=client_tls)
        server = FakeTransport(half_close=backend_half_close)
        _, tunnel = _join(client, server)
        assert not client.protocol.eof_received()
        assert tunnel.closed and not server.eof_written

    _run(scenario())


def test_close_line_carries_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    """The handshake's request id given to join appears on the tunnel's close line."""

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        ctx, backend = _setup()
        tunnel = join_tunnel(ctx, backend, client, server, client_ip="1.2.3.4", pool="p", request_id="r-42")
        tunnel.close()

    with caplog.at_level("INFO", logger="lb.access"):
        _run(scenario())
    closes = [r for r in caplog.records if "tunnel_closed" in r.getMessage()]
    assert closes and "request_id=r-42" in closes[0].getMessage()


@pytest.mark.parametrize("first", ["client", "server"])
def test_a_closed_tunnel_is_freed_without_the_cycle_collector(first: str) -> None:
    """Once both connections are lost, nothing of the tunnel waits for gc: it holds no cycle."""
    import gc

    gc.collect()
    gc.disable()
    try:
        client, server = FakeTransport(), FakeTransport()
        ctx, tunnel = _join(client, server, to_client=TEXT)
        ends = {"client": client.protocol, "server": server.protocol}
        ends[first].eof_received()
        assert tunnel.closed and client.closed and server.closed and not ctx.tunnels
        for end in (ends[first], ends["server" if first == "client" else "client"]):
            end.connection_lost(None)
        # What a transport keeps after connection_lost is its protocol, and nothing leads back.
        del tunnel, ends, ctx, end
        client.protocol = server.protocol = None
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_tunnel_closed_after_a_half_close_linger_is_freed_without_the_cycle_collector() -> None:
    """The client hangs up first and the backend answers its FIN: the linger deadline the FIN armed
    is cancelled, and it leads back to nothing (a cancelled deadline holds its callback no more)."""
    import gc

    async def scenario() -> None:
        gc.collect()
        gc.disable()
        try:
            client, server = FakeTransport(half_close=True), FakeTransport(half_close=True)
            ctx, tunnel = _join(client, server, to_client=TEXT, deadlines=Deadlines(asyncio.get_running_loop()))
            client.protocol.data_received(CLIENT_CLOSE)
            assert client.protocol.eof_received() is True and tunnel.server_end.deadline is not None
            server.protocol.eof_received()
            assert tunnel.closed and tunnel.server_end.deadline.cancelled() and not ctx.tunnels
            for transport in (client, server):
                transport.protocol.connection_lost(None)
                transport.protocol = None
            del tunnel, ctx
            assert gc.collect() == 0
        finally:
            gc.enable()

    _run(scenario())


class FillingTransport(FakeTransport):
    """A transport with a small high-water mark: a write past it tells its protocol, as asyncio does."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = high
        self.reading = False
        self.paused_writing = False

    def write(self, data: bytes) -> None:
        self.written += data
        if len(self.written) > self.high and not self.paused_writing:
            self.paused_writing = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@pytest.mark.parametrize("full_side", ["client", "server"])
def test_a_flush_that_fills_a_side_leaves_its_peer_paused(full_side: str) -> None:
    """The 101 and early bytes can fill a write buffer at the switch: the peer must stay paused.

    Resumed anyway, the peer would be read into a transport that counts itself paused already,
    so nothing would pause it again: the balancer would buffer whatever the peer sends.
    """

    async def scenario() -> None:  # in a loop, as every switch is: a paused client is looked at later
        client, server = FillingTransport(high=64), FillingTransport(high=64)
        lead = b"x" * 100
        _join(client, server, **({"to_client": lead} if full_side == "client" else {"to_server": lead}))
        full, peer = (client, server) if full_side == "client" else (server, client)
        assert full.paused_writing and not peer.reading and full.reading
        full.protocol.resume_writing()  # the full side drains
        assert peer.reading

    _run(scenario())


@pytest.mark.parametrize("full_side", ["client", "server"])
def test_a_side_full_before_the_switch_keeps_its_peer_paused(full_side: str) -> None:

    async def scenario() -> None:
        client, server = FillingTransport(high=1 << 20), FillingTransport(high=1 << 20)
        _join(client, server, client_full=full_side == "client", server_full=full_side == "server")
        full, peer = (client, server) if full_side == "client" else (server, client)
        assert not peer.reading and full.reading
        full.protocol.resume_writing()
        assert peer.reading

    _run(scenario())


class CountingTransport(FakeTransport):
    """Counts the resumes of its reading."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed = 0

    def resume_reading(self) -> None:
        self.resumed += 1


@pytest.mark.parametrize("client_paused", [False, True])
@pytest.mark.parametrize("server_paused", [False, True])
def test_the_switch_resumes_only_a_side_that_may_have_been_paused(client_paused: bool, server_paused: bool) -> None:
    """A side whose reading the handshake paused reads again at the switch; one the caller knows was not
    paused (nearly every handshake's two) is not asked to, a method call for nothing."""

    async def scenario() -> None:
        client, server = CountingTransport(), CountingTransport()
        _join(client, server, client_paused=client_paused, server_paused=server_paused)
        assert (client.resumed, server.resumed) == (int(client_paused), int(server_paused))

    _run(scenario())


@pytest.mark.parametrize(("state", "left"), [(ESTABLISHED, False), (CLOSE, True), (CLOSE_WAIT, True), (4, False)])
def test_a_socket_has_left_once_its_peers_fin_or_rst_came(state: int, left: bool) -> None:
    assert has_left(state) is left


@pytest.mark.parametrize("state", [CLOSE, CLOSE_WAIT])
def test_a_client_paused_behind_its_wedged_backend_is_cut_once_it_has_left(
    monkeypatch: pytest.MonkeyPatch, state: int
) -> None:
    """Paused, the client's FIN or RST is not read: a look at its socket while the pause lasts finds it."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        sock = FakeSocket(ESTABLISHED)
        client, server = FakeTransport(sock=sock), FakeTransport(buffered=1 << 20)
        _, tunnel = _join(client, server)
        tunnel.server_end.pause_writing()  # the backend's buffer is full: its client is paused
        await asyncio.sleep(0.2)
        assert not tunnel.closed  # still there: looked at, and looked at again
        sock.tcp_state = state
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.aborted and server.aborted
        assert tunnel.backend.connections == 0

    _run(scenario())


def test_a_client_that_left_behind_a_backend_still_reading_keeps_its_tunnel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that took bytes since the last look is slow, not wedged: the upload and FIN its client
    sent before leaving are still on their way to it.  Once it takes nothing for a look, it is let go."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 1000.0)  # the looks are made here, not by the timer

    async def scenario() -> None:
        client, server = FakeTransport(sock=FakeSocket(CLOSE_WAIT)), FakeTransport(buffered=1 << 20)
        _, tunnel = _join(client, server)
        end = tunnel.server_end
        end.pause_writing()
        for _ in range(3):  # each look finds it took some
            server.buffered -= 1000
            end._look_at_paused_peer()
            assert not tunnel.closed
        end._look_at_paused_peer()
        assert tunnel.closed and client.aborted

    _run(scenario())


def test_a_backend_that_reset_behind_a_client_still_reading_keeps_its_tunnel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways: a client that takes bytes still gets what its gateway sent before a reset."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 1000.0)

    async def scenario() -> None:
        client, server = FakeTransport(buffered=1 << 20), FakeTransport(sock=FakeSocket(CLOSE))
        _, tunnel = _join(client, server)
        end = tunnel.client_end
        end.pause_writing()
        for _ in range(3):
            client.buffered -= 1000
            end._look_at_paused_peer()
            assert not tunnel.closed
        end._look_at_paused_peer()
        assert tunnel.closed and tunnel.backend.connections == 0

    _run(scenario())


def test_a_client_read_again_is_not_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once reading resumes, its own EOF tells of a client's leaving: the look ends with the pause."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(sock=FakeSocket(CLOSE_WAIT)), FakeTransport()
        _, tunnel = _join(client, server)
        tunnel.server_end.pause_writing()
        tunnel.server_end.resume_writing()
        await asyncio.sleep(0.2)
        assert not tunnel.closed and not client.aborted

    _run(scenario())


def test_a_backend_full_before_the_switch_has_its_paused_client_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(sock=FakeSocket(CLOSE)), FakeTransport(buffered=1 << 20)
        _, tunnel = _join(client, server, server_full=True)
        await asyncio.sleep(0.2)
        assert tunnel.closed and client.aborted

    _run(scenario())


def test_a_backend_paused_behind_a_client_that_stopped_reading_is_let_go_once_it_has_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paused, the backend's RST is not read either: a look at its socket while the client's buffer stays
    full finds it, and the tunnel ends as a backend lost mid-stream (no 1012: bytes may be unread)."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        sock = FakeSocket(ESTABLISHED)
        client, server = FakeTransport(buffered=1 << 20), FakeTransport(sock=sock)
        ctx, tunnel = _join(client, server)
        tunnel.server_end.data_received(TEXT)  # at a frame boundary: only the look's own rule withholds a 1012
        tunnel.client_end.pause_writing()  # the client's buffer is full: its backend is paused
        await asyncio.sleep(0.2)
        assert not tunnel.closed  # still there: looked at, and looked at again
        sock.tcp_state = CLOSE
        await asyncio.sleep(0.2)
        assert tunnel.closed and tunnel.backend.connections == 0
        assert bytes(client.written) == TEXT  # what was read, and no close frame after it
        assert ctx.stats.balancer_closes[("backend_lost", "tcp")] == 1

    _run(scenario())


def test_a_backend_that_sent_its_fin_behind_a_paused_client_is_left_for_the_client_to_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a FIN the backend's last bytes (its close frame, perhaps) wait unread for a slow client."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(buffered=1 << 20), FakeTransport(sock=FakeSocket(CLOSE_WAIT))
        _, tunnel = _join(client, server)
        tunnel.client_end.pause_writing()
        await asyncio.sleep(0.2)
        assert not tunnel.closed
        tunnel.abort()

    _run(scenario())


def test_a_backend_read_again_is_not_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the client takes bytes again the backend is read, and its own EOF tells of its leaving."""
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport(sock=FakeSocket(CLOSE))
        _, tunnel = _join(client, server)
        tunnel.client_end.pause_writing()
        tunnel.client_end.resume_writing()
        await asyncio.sleep(0.2)
        assert not tunnel.closed

    _run(scenario())


def test_a_client_full_before_the_switch_has_its_paused_backend_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_module, "PAUSED_PEER_LOOK", 0.05)

    async def scenario() -> None:
        client, server = FakeTransport(buffered=1 << 20), FakeTransport(sock=FakeSocket(CLOSE))
        _, tunnel = _join(client, server, client_full=True)
        await asyncio.sleep(0.2)
        assert tunnel.closed and tunnel.backend.connections == 0

    _run(scenario())


class _SocketOnly:
    """A transport as `taken_by` sees it: its socket, and a write buffer that never moves."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return 65536


@pytest.mark.skipif(not tunnel_module._TCP_INFO, reason="TCP_INFO is Linux's")
def test_taken_by_sees_a_slow_reader_take_bytes_that_our_buffer_does_not_show() -> None:
    """A client reading slowly takes bytes out of the kernel's send buffer below ours, which reports room
    only once a third of it is free: our buffer stays as it was, and a close waiting for a frame's end took
    such a client for a stalled one and cut it mid-frame.  What its kernel acknowledged grows as it reads."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    ours, _ = server.accept()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        ours.setblocking(False)
        sent = 0
        for _ in range(10_000):  # until the client's window and our send buffer are full
            try:
                sent += ours.send(b"x" * 65536)
            except BlockingIOError:
                break
        transport: Any = _SocketOnly(ours)
        time.sleep(0.05)
        before = tunnel_module.taken_by(transport, sent)
        assert before < sent, "the client has not taken everything: it reads nothing yet"
        taken = 0
        client.settimeout(2.0)
        while taken < 200_000:
            taken += len(client.recv(65536))
        time.sleep(0.05)
        after = tunnel_module.taken_by(transport, sent)
        assert after > before, f"the client took {taken} bytes, but taken_by says {before} -> {after}"
    finally:
        for sock in (client, ours, server):
            sock.close()


def test_ends_given_to_join_become_the_tunnel_s_without_a_new_protocol() -> None:
    """`Tunnel.join(client_end=..., server_end=...)`, as the shell joins (its protocols are the ends): the
    transports keep their protocols (none is set), the given objects are begun afresh, relay both ways and
    track frames, and the backend's loss still ends the tunnel with 1012."""
    from lb.proxy.tunnel import WebSocketClientEnd, WebSocketServerEnd

    async def scenario() -> None:
        client, server = FakeTransport(), FakeTransport()
        # Protocols that were something else before (the shell's were its handshake): begun afresh by join.
        elsewhere = Tunnel(*_setup(), "9.9.9.9", "other")
        client_end, server_end = WebSocketClientEnd(), WebSocketServerEnd()
        client_end.begin(elsewhere, FakeTransport())
        server_end.begin(elsewhere, FakeTransport())
        client_end.nbytes = server_end.nbytes = 99
        ctx, backend = _setup()
        tunnel = Tunnel.join(
            ctx, backend, client, server, client_end=client_end, server_end=server_end,  # type: ignore[arg-type]
            client_ip="1.2.3.4", pool="p", client_lead=b"101", to_server=TEXT,
        )
        assert tunnel.client_end is client_end and tunnel.server_end is server_end
        assert client.protocol is None and server.protocol is None  # no set_protocol
        assert bytes(server.written) == TEXT and bytes(client.written) == b"101"
        client_end.data_received(TEXT)
        server_end.data_received(TEXT)
        assert bytes(server.written) == TEXT * 2 and bytes(client.written) == b"101" + TEXT
        assert client_end.nbytes == 2 * len(TEXT) and server_end.nbytes == len(TEXT)
        server_end.eof_received()
        assert bytes(client.written).endswith(close_frame(1012, "backend went away"))
        assert tunnel.closed and client.closed and server.closed and not ctx.tunnels

    _run(scenario())
