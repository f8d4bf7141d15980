"""`AcceptingServer` on loopback: the header is taken and not one byte more; every path releases its count.

In-process (the balancer's own loop): what the black-box tests cannot see, `ctx.handshaking` (so
`limits.max_connections`) and the bytes the core receives after the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_connection import CONFIG

from lb.config.load import parse_config
from lb.devcerts import write_dev_certs
from lb.http.client_address import TrustedProxies
from lb.proxy.preamble import AcceptingServer, listening_sockets
from lb.proxy.server import ClientConnection, stop_in_flight, wall_offset
from lb.state.context import ProxyContext
from lb.tls import server_ssl_context
from tests.harness.polling import wait_for as _wait

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEAD_START = b"GET /a/x HTTP/1.1\r\nHost: h\r\nX-Partial"  # incomplete: the core keeps it buffered


def _ctx(handshake: str = "5s", tls: str = "") -> ProxyContext:
    text = CONFIG.replace("timeouts: {handshake: 5s", f"timeouts: {{handshake: {handshake}")
    if tls:
        text = text.replace('listeners: [{bind: "127.0.0.1:8080"}]', tls)
    return ProxyContext.build(
        parse_config(text, base_dir=Path("."), environ={}), lambda *_: None, wall_offset=wall_offset()
    )


async def _server(
    ctx: ProxyContext, ssl_context: ssl.SSLContext | None = None, *, proxy_protocol: bool = True
) -> tuple[AcceptingServer, int]:
    (sock,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    return AcceptingServer(ctx, [sock], ssl_context, proxy_protocol=proxy_protocol), int(sock.getsockname()[1])


@pytest.fixture
async def served() -> AsyncIterator[tuple[ProxyContext, AcceptingServer, int]]:
    ctx = _ctx()
    server, port = await _server(ctx)
    try:
        yield ctx, server, port
    finally:
        server.close()
        for connection in list(ctx.in_flight):
            connection._close(abort=True)


def _only_connection(ctx: ProxyContext) -> ClientConnection:
    assert len(ctx.in_flight) == 1
    return next(iter(ctx.in_flight))


async def test_v1_header_gives_the_client_and_the_rest_reaches_the_core(
    served: tuple[ProxyContext, AcceptingServer, int],
) -> None:
    ctx, server, port = served
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + HEAD_START)
    await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
    connection = _only_connection(ctx)
    assert connection.core.client_ip == "192.0.2.1"
    assert bytes(connection.core._buf) == HEAD_START  # not one byte of the header, nothing lost
    assert ctx.handshaking == 1 and server.pending == 0
    writer.close()
    await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)


async def test_v2_header_split_byte_by_byte(served: tuple[ProxyContext, AcceptingServer, int]) -> None:
    ctx, _, port = served
    block = bytes([198, 51, 100, 4]) + bytes([127, 0, 0, 1]) + (5555).to_bytes(2, "big") + (443).to_bytes(2, "big")
    header = V2_SIGNATURE + bytes([0x21, 0x11]) + len(block).to_bytes(2, "big") + block
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for byte in header:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0)
    assert ctx.handshaking == 1  # counted while the header arrives
    writer.write(HEAD_START)
    await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
    connection = _only_connection(ctx)
    assert connection.core.client_ip == "198.51.100.4"
    assert bytes(connection.core._buf) == HEAD_START
    writer.close()
    await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00]),  # LOCAL
    # PROXY over UDP4 and UDP6: a datagram's endpoints say nothing of who holds this TCP connection
    V2_SIGNATURE + bytes([0x21, 0x12, 0, 12, 198, 51, 100, 9, 127, 0, 0, 1, 0x12, 0x67, 1, 0xBB]),
    V2_SIGNATURE + bytes([0x21, 0x22, 0, 36]) + bytes.fromhex("20010db8" + "00" * 11 + "09") + bytes(15) + b"\x01"
    + bytes([0x12, 0x67, 1, 0xBB]),
], ids=["local", "udp4", "udp6"])
async def test_local_or_udp_header_uses_the_peer(
    served: tuple[ProxyContext, AcceptingServer, int], header: bytes
) -> None:
    ctx, _, port = served
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header + HEAD_START)
    await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
    assert _only_connection(ctx).core.client_ip == "127.0.0.1"
    writer.close()
    await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"PROXY TCP4 1.2.3.4 x\r\n", b"PROXY TCP4 192.0.2.1", b""],
    ids=["http-first", "garbage", "eof-mid-header", "eof-at-once"],
)
async def test_no_valid_header_closes_without_an_answer_and_releases(
    served: tuple[ProxyContext, AcceptingServer, int], data: bytes
) -> None:
    ctx, server, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    try:
        answer = await asyncio.wait_for(reader.read(), 3)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    await _wait(lambda: ctx.handshaking == 0 and server.pending == 0)
    assert not ctx.in_flight
    writer.close()


async def test_silence_is_closed_after_the_handshake_timeout() -> None:
    ctx = _ctx("300ms")
    server, port = await _server(ctx)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 ")
        await _wait(lambda: ctx.handshaking == 1)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert loop.time() - started >= 0.25
        await _wait(lambda: ctx.handshaking == 0 and server.pending == 0)
        writer.close()
    finally:
        server.close()


async def test_close_stops_accepting_and_wait_closed_waits_for_preambles() -> None:
    ctx = _ctx("300ms")
    server, port = await _server(ctx)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _wait(lambda: server.pending == 1)
    server.close()
    server.close()  # idempotent
    assert not server.is_serving()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    waiting = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "wait_closed returned while a preamble was still running"
    await asyncio.wait_for(waiting, 3)  # the preamble times out, then it returns
    assert ctx.handshaking == 0
    writer.close()


async def test_shutdown_answers_a_connection_past_its_header(
    served: tuple[ProxyContext, AcceptingServer, int],
) -> None:
    """Past the header it is an ordinary connection: SIGTERM's stop_in_flight answers its partial head."""
    ctx, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + HEAD_START)
    await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
    ctx.accepting = False
    await stop_in_flight(ctx, within=2.0)
    assert (await asyncio.wait_for(reader.read(), 3)).startswith(b"HTTP/1.1 503 ")
    writer.close()
    await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)


async def test_tls_after_the_header_and_a_failed_handshake_releases(tmp_path: Path) -> None:
    certs = write_dev_certs(tmp_path, ["127.0.0.1"])
    tls = f'{{cert: "{certs.server_cert}", key: "{certs.server_key}"}}'
    listener = f'listeners: [{{bind: "127.0.0.1:8443", tls: {tls}}}]'
    ctx = _ctx("500ms", tls=listener)
    assert ctx.config.listeners[0].tls is not None
    server, port = await _server(ctx, server_ssl_context(ctx.config.listeners[0].tls))
    try:
        client = ssl.create_default_context(cafile=str(certs.ca_cert))
        # A good one: header, then the TLS handshake, then the head, in the core in plaintext.
        _raw_r, raw_w = await asyncio.open_connection("127.0.0.1", port)
        raw_w.write(b"PROXY TCP6 2001:db8::5 ::1 5555 443\r\n")
        await raw_w.drain()
        await raw_w.start_tls(client, server_hostname="127.0.0.1")
        raw_w.write(HEAD_START)
        await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
        assert _only_connection(ctx).core.client_ip == "2001:db8::5"
        assert bytes(_only_connection(ctx).core._buf) == HEAD_START
        raw_w.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
        # A bad one: a valid header, then no TLS at all: closed, and the count comes back.
        bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
        bad_w.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + b"GET / HTTP/1.1\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            answer = await asyncio.wait_for(bad_r.read(), 3)  # at most a TLS alert, never an HTTP answer
        assert not answer.startswith(b"HTTP/"), answer
        bad_w.close()
        await _wait(lambda: ctx.handshaking == 0 and server.pending == 0 and not ctx.in_flight, within=4.0)
    finally:
        server.close()


async def test_a_tls_listener_counts_from_accept_and_a_failed_handshake_frees_the_slot_at_once(
    tmp_path: Path,
) -> None:
    """Every TLS listener is an AcceptingServer without a header: the handshake is a task it holds, so
    a client that sends garbage (or leaves) stops counting against max_connections when it ends, on
    any loop, not when the garbage collector finds its protocol."""
    certs = write_dev_certs(tmp_path, ["127.0.0.1"])
    tls = f'{{cert: "{certs.server_cert}", key: "{certs.server_key}"}}'
    ctx = _ctx("5s", tls=f'listeners: [{{bind: "127.0.0.1:8443", tls: {tls}}}]')
    assert ctx.config.listeners[0].tls is not None
    server, port = await _server(ctx, server_ssl_context(ctx.config.listeners[0].tls), proxy_protocol=False)
    try:
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
        await _wait(lambda: ctx.handshaking == 1 and server.pending == 1)  # counted from accept
        silent_w.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # not TLS: the handshake fails
        with contextlib.suppress(ConnectionResetError):
            assert not (await asyncio.wait_for(silent_r.read(), 3)).startswith(b"HTTP/")
        silent_w.close()
        await _wait(lambda: ctx.handshaking == 0 and server.pending == 0, within=1.0)  # well before 5 s
        assert ctx.stats.tls_failures == 1  # lb_tls_handshake_failures_total
        # A good one reaches the core in plaintext, timed from accept.
        client = ssl.create_default_context(cafile=str(certs.ca_cert))
        _good_r, good_w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
        good_w.write(HEAD_START)
        await _wait(lambda: len(ctx.in_flight) == 1 and bytes(_only_connection(ctx).core._buf) == HEAD_START)
        assert ctx.handshaking == 1 and server.pending == 0
        good_w.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()


class _ExhaustedSocket(socket.socket):
    """A listening socket whose first accepts fail as if the process were out of descriptors."""

    failures = 2

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_out_of_descriptors_pauses_accepting_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    ctx = _ctx()
    (plain,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    sock = _ExhaustedSocket(fileno=plain.detach())
    server = AcceptingServer(ctx, [sock], None)
    port = int(sock.getsockname()[1])
    try:
        with caplog.at_level(logging.ERROR, logger="lb.proxy.server"):
            _, writer = await asyncio.open_connection("127.0.0.1", port)  # queued by the kernel meanwhile
            writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + HEAD_START)
            await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf, within=5.0)
        assert sock.failures == 0
        assert _only_connection(ctx).core.client_ip == "192.0.2.1"
        lines = [r for r in caplog.records if "accept connections" in r.getMessage()]
        assert len(lines) <= 1, [r.getMessage() for r in lines]  # rate-limited: never a line per failure
        writer.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()


class _LinkLocalPeerSocket(socket.socket):
    """A listening socket whose accepted peers are reported as a link-local IPv6 peer on an interface
    (the tests reach it on loopback, the only network they use)."""

    def accept(self) -> tuple[socket.socket, Any]:
        conn, _ = super().accept()
        return conn, ("fe80::1%eth0", 4711, 0, 2)  # AF_INET6's (host, port, flowinfo, scope_id)


@pytest.mark.parametrize(
    ("proxy_from", "believed"),
    [(["fe80::/10"], True), (["fe80::1"], True), (["2001:db8::/32", "fe80::2"], False)],
    ids=["its network", "its address", "neither"],
)
async def test_a_zoned_peer_is_matched_by_its_address(proxy_from: list[str], believed: bool) -> None:
    """proxy_protocol_from: a link-local peer (`fe80::1%eth0`) is in it when its address is; the zone names
    our interface, not the peer."""
    ctx = _ctx()
    (plain,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    sock = _LinkLocalPeerSocket(fileno=plain.detach())
    networks = TrustedProxies.parse(proxy_from).networks
    server = AcceptingServer(ctx, [sock], None, proxy_from=networks)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(sock.getsockname()[1]))
        writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + HEAD_START)
        if believed:
            await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
            assert _only_connection(ctx).core.client_ip == "192.0.2.1"
        else:
            with contextlib.suppress(ConnectionResetError):  # closed at accept, unread: maybe a reset
                assert await asyncio.wait_for(reader.read(), 3) == b""  # unanswered
            assert not ctx.in_flight
        writer.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()


async def test_a_header_finished_in_a_segment_with_the_client_s_bytes_takes_only_its_rest(
    served: tuple[ProxyContext, AcceptingServer, int],
) -> None:
    """Half a header, then its other half and the head in one segment: the preamble takes the header's
    rest only (not its whole length again), and the core gets every byte of the head."""
    ctx, _, port = served
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.1 ")
    await _wait(lambda: ctx.handshaking == 1)
    await asyncio.sleep(0.05)  # taken by the preamble as header so far
    writer.write(b"127.0.0.1 5555 443\r\n" + HEAD_START)
    await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
    assert _only_connection(ctx).core.client_ip == "192.0.2.1"
    assert bytes(_only_connection(ctx).core._buf) == HEAD_START
    writer.close()
    await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)


async def test_a_connection_closed_before_a_byte_is_not_warned_of(
    served: tuple[ProxyContext, AcceptingServer, int], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connected and closed without a byte is an L4 balancer's TCP health check: no warning, only a count back."""
    from lb.proxy import preamble

    monkeypatch.setattr(preamble, "_refusals", preamble._RateLimitedRefusals())  # its next refusal would warn
    ctx, server, port = served
    with caplog.at_level(logging.WARNING, logger="lb.proxy.server"):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _wait(lambda: ctx.handshaking == 1)
        writer.close()
        await _wait(lambda: ctx.handshaking == 0 and server.pending == 0)
    assert caplog.records == []


@pytest.mark.parametrize("proxy_protocol", [True, False], ids=["proxy protocol", "plain"])
async def test_past_the_answered_overflow_a_header_first_listener_sheds_and_a_plain_one_answers_503(
    proxy_protocol: bool,
) -> None:
    """Over max_connections and its answered overflow, a PROXY-protocol listener closes a connection as it is
    accepted (counted in lb_connections_shed_total); a plain one (asyncio's loop) still answers it 503."""
    ctx = _ctx()
    server, port = await _server(ctx, proxy_protocol=proxy_protocol)
    ctx.handshaking = 10**6  # as many handshakes in flight: past any limit
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" if proxy_protocol else b""
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # shed: closed, maybe already
            writer.write(header + b"GET /a/x HTTP/1.1\r\nHost: h\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 3)
        if proxy_protocol:
            assert (answer, ctx.stats.shed) == (b"", 1)
        else:
            assert answer.startswith(b"HTTP/1.1 503 ") and ctx.stats.shed == 0
        writer.close()
    finally:
        ctx.handshaking -= 10**6
        server.close()
        for connection in list(ctx.in_flight):
            connection._close(abort=True)


async def test_abort_pending_drops_headers_and_tls_handshakes_and_then_wait_closed_returns(tmp_path: Path) -> None:
    """At the end of a stop, a silent PROXY header and a silent TLS handshake are dropped at once (well
    before timeouts.handshake), their counts released; wait_closed waits for both until then."""
    certs = write_dev_certs(tmp_path, ["127.0.0.1"])
    tls = f'{{cert: "{certs.server_cert}", key: "{certs.server_key}"}}'
    ctx = _ctx("30s", tls=f'listeners: [{{bind: "127.0.0.1:8443", tls: {tls}}}]')
    assert ctx.config.listeners[0].tls is not None
    header_server, header_port = await _server(ctx)
    tls_server, tls_port = await _server(ctx, server_ssl_context(ctx.config.listeners[0].tls), proxy_protocol=False)
    header_r, header_w = await asyncio.open_connection("127.0.0.1", header_port)
    header_w.write(b"PROXY TCP4 ")
    tls_r, tls_w = await asyncio.open_connection("127.0.0.1", tls_port)
    await _wait(lambda: header_server.pending == 1 and tls_server.pending == 1 and ctx.handshaking == 2)
    waits = [asyncio.ensure_future(server.wait_closed()) for server in (header_server, tls_server)]
    for server in (header_server, tls_server):
        server.close()
    await asyncio.sleep(0.05)
    assert not any(wait.done() for wait in waits), "wait_closed returned with a connection still pending"
    for server in (header_server, tls_server):
        server.abort_pending()
    await asyncio.wait_for(asyncio.gather(*waits), 2)
    assert ctx.handshaking == 0
    for reader in (header_r, tls_r):
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 2) == b""
    header_w.close()
    tls_w.close()


async def test_accepting_pauses_longer_at_each_failure_up_to_a_second_and_again_briefly_after_a_success() -> None:
    """Out of descriptors: 0.1 s, 0.2, 0.4, 0.8, then 1 s at most; an accept that succeeds brings the next
    pause back to 0.1 s; close() cancels a pending resume."""
    ctx = _ctx()
    (plain,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    sock = _ExhaustedSocket(fileno=plain.detach())
    sock.failures = 5
    server = AcceptingServer(ctx, [sock], None, start_serving=False)
    loop = asyncio.get_running_loop()

    def pause_after_an_accept() -> float:
        server._accept(sock)
        handle = server._resume.pop(sock)
        handle.cancel()
        return handle.when() - loop.time()

    try:
        pauses = [pause_after_an_accept() for _ in range(5)]
        assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0], abs=0.05)
        _, writer = await asyncio.open_connection("127.0.0.1", int(sock.getsockname()[1]))
        server._accept(sock)  # this one succeeds
        await _wait(lambda: server.pending == 1)
        sock.failures = 1
        assert pause_after_an_accept() == pytest.approx(0.1, abs=0.05)
        sock.failures = 1
        server._accept(sock)
        resume = server._resume[sock]
        server.close()
        assert resume.cancelled()
        writer.close()
    finally:
        server.close()
        server.abort_pending()


async def test_a_listener_closed_before_it_served_never_starts() -> None:
    """start_serving after close does nothing: its sockets are closed."""
    ctx = _ctx()
    (sock,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    server = AcceptingServer(ctx, [sock], None, start_serving=False)
    server.close()
    server.start_serving_now()
    await server.start_serving()
    assert not server.is_serving()
    await asyncio.wait_for(server.wait_closed(), 1)


async def test_the_header_and_the_tls_handshake_share_one_handshake_timeout_from_accept(tmp_path: Path) -> None:
    """A header that takes 0.6 s of a 1 s timeouts.handshake leaves the TLS handshake the rest (0.4 s), not
    a whole second of its own: a silent client is closed about 1 s after accept."""
    certs = write_dev_certs(tmp_path, ["127.0.0.1"])
    tls = f'{{cert: "{certs.server_cert}", key: "{certs.server_key}"}}'
    ctx = _ctx("1s", tls=f'listeners: [{{bind: "127.0.0.1:8443", tls: {tls}}}]')
    assert ctx.config.listeners[0].tls is not None
    server, port = await _server(ctx, server_ssl_context(ctx.config.listeners[0].tls))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.6)
        writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n")  # then no ClientHello
        await _wait(lambda: server.pending == 1 and not server._preambles)  # in its TLS handshake now
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 3)
        assert loop.time() - started < 1.4
        await _wait(lambda: ctx.handshaking == 0 and server.pending == 0)
        writer.close()
    finally:
        server.close()


@pytest.mark.parametrize("proxy_protocol", [True, False], ids=["header read", "plain"])
async def test_a_hand_over_aborted_in_the_turn_it_began_releases_its_count_and_socket(proxy_protocol: bool) -> None:
    """abort_pending in the same turn of the loop as a hand-over cancels its task before its first step: the
    connection's count and socket are still released (they were held for good, the stop's count never 0)."""
    from lb.proxy.preamble import _Accepted

    ctx = _ctx()
    server, _ = await _server(ctx, proxy_protocol=proxy_protocol)
    ours, theirs = socket.socketpair()
    try:
        accepted = _Accepted(server, ours, ("127.0.0.1", 4711))
        assert ctx.handshaking == 1
        server._hand_over(accepted, ("192.0.2.1", 5555))
        server.abort_pending()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 2)
        assert (ctx.handshaking, server.pending, ours.fileno()) == (0, 0, -1)
    finally:
        ours.close()
        theirs.close()


async def test_a_reload_changes_whom_a_kept_listener_believes() -> None:
    """proxy_protocol_from changed by a reload that keeps the listener: from then on, a peer now in it is
    believed, where before it was closed unread."""
    ctx = _ctx()
    (sock,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
    port = int(sock.getsockname()[1])
    server = AcceptingServer(ctx, [sock], None, proxy_from=TrustedProxies.parse(["127.0.0.2/32"]).networks)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 3) == b""  # not in it: closed unread
        writer.close()
        server.believe_proxy_headers_from(TrustedProxies.parse(["127.0.0.1/32"]).networks)
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n" + HEAD_START)
        await _wait(lambda: len(ctx.in_flight) == 1 and _only_connection(ctx).core._buf)
        assert _only_connection(ctx).core.client_ip == "192.0.2.1"
        writer.close()
        await _wait(lambda: ctx.handshaking == 0 and not ctx.in_flight)
    finally:
        server.close()
