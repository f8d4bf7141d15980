"""The connection core as tables: bytes and events in, actions out; no socket, no loop, no clock.

In the manner of mitmproxy's Playbook: each test plays the shell, feeding the
core what the client and the backend send and checking every action it asks
for.  The point of most of them is what does NOT happen: no byte reaches a
backend that did not pass the parser and the router, and no buffer grows
without bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
from base64 import urlsafe_b64decode
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config.load import parse_config
from lb.control.memory import ReleasePolicy
from lb.errors import InvalidToken
from lb.http.head import parse_response_head, render_head
from lb.log import JsonFormatter
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
from lb.proxy.connection import (
    CLOSED,
    CONNECTING,
    HEAD,
    HELD_LIMIT,
    MAX_INTERIM,
    MAX_RESPONSE_HEAD,
    RELAY,
    STOP_HEAD_WAIT,
    TUNNEL,
    WAITING,
    Connection,
    new_request_id,
)
from lb.proxy.server import AcceptCount
from lb.state.context import ProxyContext
from lb.state.pool import AdminAction
from lb.ws.upgrade import accept_value

KEY = "k" * 40
CONFIG = f"""
listeners: [{{bind: "127.0.0.1:8080"}}]
admin: {{bind: "127.0.0.1:9000", token: "{"t" * 32}"}}
affinity: {{mode: insert, cookie: LB, secret_keys: ["{KEY}"]}}
routes:
  - {{path_prefix: /a, pool: a}}
  - {{path_prefix: /b, pool: b}}
pools:
  a:
    balance: round_robin
    backends: [{{id: a1, address: "127.0.0.1:7001"}}]
  b:
    balance: round_robin
    backends: [{{id: b1, address: "127.0.0.1:7002"}}, {{id: b2, address: "127.0.0.1:7003"}}]
timeouts: {{handshake: 5s, backend_connect: 2s}}
limits: {{max_header_bytes: 4096}}
"""
T0 = 1_700_000_000.0
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(path: str = "/a/ws") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: h\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"  # for WS_KEY (RFC 6455 §1.3)
)


def ok(body: bytes = b"hi") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


class Play:
    """One client connection and the backend it talks to, with everything the core asked for recorded."""

    def __init__(
        self, config: str = CONFIG, *, now: float = T0, client_ip: str = "192.0.2.7", tls: bool = False
    ) -> None:
        self.failures: list[tuple[str, str, str]] = []
        self.ctx = ProxyContext.build(
            parse_config(config, base_dir=Path("."), environ={}),
            lambda pool, backend, what: self.failures.append((pool, backend, what)),
            # The tables' times read as wall-clock seconds as well (T0 is a date): the wall instant of
            # an event is its time plus this offset, and a table that seals a token at T0 issued it at T0.
            wall_offset=0.0,
        )
        self.ctx.handshaking = 1
        self.conn = Connection(
            self.ctx, client_ip=client_ip, client_port=4711, tls=tls, random=lambda n: b"\x01" * n
        )
        self.now = now
        self.actions: list[Action] = []
        self.to_backend: list[bytes] = []  # per backend connection opened: what it received
        self.to_client = bytearray()
        self.opened: list[str] = []
        self.timer: float | None = None
        self.closed_client: CloseClient | None = None
        self.paused = False
        self.start = self._apply(self.conn.start(now))

    def _apply(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for action in actions:
            if isinstance(action, OpenBackend):
                self.opened.append(action.backend_id)
                self.to_backend.append(b"")
            elif isinstance(action, SendBackend):
                assert self.to_backend, "bytes for a backend before any was opened"
                self.to_backend[-1] += action.data
            elif isinstance(action, SendClient):
                assert self.closed_client is None, "bytes for the client after closing it"
                self.to_client += action.data
            elif isinstance(action, SetTimer):
                self.timer = action.at
            elif isinstance(action, CloseClient):
                self.closed_client = action
            elif isinstance(action, PauseClient):
                self.paused = True
            elif isinstance(action, ResumeClient):
                self.paused = False
        return actions

    def client(self, data: bytes, dt: float = 0.0) -> list[Action]:
        self.now += dt
        return self._apply(self.conn.receive_client(data, self.now))

    def connected(self, dt: float = 0.0) -> list[Action]:
        self.now += dt
        return self._apply(self.conn.backend_connected(self.now))

    def backend(self, data: bytes) -> list[Action]:
        return self._apply(self.conn.receive_backend(data, self.now))

    def backend_failed(self, cause: str = "connection refused") -> list[Action]:
        return self._apply(self.conn.backend_failed(cause, self.now))

    def backend_eof(self) -> list[Action]:
        return self._apply(self.conn.backend_eof(self.now))

    def fire(self) -> list[Action]:
        """Let the clock run to the timer and fire it."""
        assert self.timer is not None, "no timer set"
        self.now = self.timer
        self.timer = None
        return self._apply(self.conn.deadline(self.now))

    def shutdown(self) -> list[Action]:
        self.ctx.accepting = False
        return self._apply(self.conn.shutdown(self.now))

    def stop_bound(self) -> list[Action]:
        """The stop's bound passes with this connection still in flight (`abort_in_flight`)."""
        return self._apply(self.conn.stop_bound_passed(self.now))

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        head, _, body = bytes(self.to_client).partition(b"\r\n\r\n")
        parsed = parse_response_head(head + b"\r\n\r\n")
        return parsed.status, {k.lower(): v for k, v in parsed.head.headers}, body

    def connections(self) -> dict[str, int]:
        return {b.id: b.connections for pool in self.ctx.pools.values() for b in pool.backends.values()}


# -- the head: refused without touching a backend ----------------------------------------------

REFUSED = [
    pytest.param(b"GET /a HTTP/1.1\r\n\r\n", 400, id="no-host"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", 400, id="two-hosts"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400, id="bare-lf"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400, id="obs-fold"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost : h\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="cl-and-te"
    ),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\n", 400, id="two-lengths"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400, id="te-not-chunked"),
    pytest.param(b"GET /a HTTP/2.0\r\nHost: h\r\n\r\n", 505, id="http2-line"),  # RFC 9110 §15.6.6
    pytest.param(b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="fragment"),  # RFC 9112 §3.2
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-on-plain"),
    # Bytes that cannot start a request line: 400 at once, not after timeouts.handshake.
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, id="tls-on-plain-unfinished"),
    pytest.param(b"\x81\x85\x01\x02\x03\x04abcde", 400, id="ws-frame-unfinished"),
    pytest.param(b" GET /a HTTP/1.1", 400, id="space-first-unfinished"),
    pytest.param(b"GE\x00T /a", 400, id="nul-in-method-unfinished"),
    # A whole request line that no head can make good: 400 (505) at its CRLF, as HAProxy answers
    # HTTP/0.9's `GET /`, whose client sends nothing more and waits.
    pytest.param(b"GET /a\r\n", 400, id="http09-unfinished"),
    pytest.param(b"GET /a HTTP/1.1 \r\n", 400, id="trailing-space-line-unfinished"),
    pytest.param(b"GET /a#frag HTTP/1.1\r\nHost: h\r\n", 400, id="fragment-unfinished"),
    pytest.param(b"GET /a HTTP/2.0\r\nHost: h\r\n", 505, id="http2-line-unfinished"),
    pytest.param(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n", 404, id="no-route"),
    pytest.param(upgrade().replace(b"Version: 13", b"Version: 8"), 426, id="ws-version"),
    pytest.param(upgrade().replace(WS_KEY.encode(), b"short"), 400, id="ws-key"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nX: " + b"x" * 5000 + b"\r\n\r\n", 431, id="too-large"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nX: " + b"x" * 5000, 431, id="too-large-unfinished"),
]


@pytest.mark.parametrize(("data", "status"), REFUSED)
def test_refused_heads_never_open_a_backend(data: bytes, status: int) -> None:
    play = Play()
    play.client(data)
    assert play.opened == []
    assert play.answer()[0] == status
    assert play.closed_client is not None and play.conn.state == CLOSED


@pytest.mark.parametrize(("data", "status"), REFUSED)
def test_refused_heads_fed_byte_by_byte(data: bytes, status: int) -> None:
    play = Play()
    for i in range(len(data)):
        if play.conn.state == CLOSED:
            break
        play.client(data[i : i + 1])
    assert play.opened == []
    assert play.answer()[0] == status


@pytest.mark.parametrize(("size", "status"), [(99, None), (100, None), (101, 431)])
def test_a_small_head_limit_is_held_to_the_byte(size: int, status: int | None) -> None:
    """`max_header_bytes: 100` (a test rig's, to see its 431 without sending kilobytes): a head of 100 bytes
    with its blank line is read and routed, one of 101 is 431 without a backend."""
    head = b"GET /a HTTP/1.1\r\nHost: h\r\nX: \r\n\r\n"
    head = head.replace(b"X: ", b"X: " + b"x" * (size - len(head)))
    assert len(head) == size
    play = Play(CONFIG.replace("max_header_bytes: 4096", "max_header_bytes: 100"))
    play.client(head)
    if status is None:
        assert len(play.opened) == 1
    else:
        assert play.opened == [] and play.answer()[0] == status


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_head_fed_in_pieces_opens_the_backend_on_its_last_byte(split: int) -> None:
    """The blank line is found however reads cut it, and the search restarts for the next head."""
    play = Play()
    for path, backend in [("/a/1", "a1"), ("/b/2", "b1")]:
        data = get(path)
        for i in range(0, len(data), split):
            assert play.conn.state == HEAD
            before = len(play.opened)
            play.client(data[i : i + split])
            assert len(play.opened) == before + (i + split >= len(data))
        assert play.opened[-1] == backend
        play.connected()
        assert play.to_backend[-1].startswith(f"GET {path} HTTP/1.1\r\n".encode())
        play.backend(ok())
    assert play.to_client.count(b"HTTP/1.1 200 OK") == 2


def _sent_to_client(play: Play) -> bytes:
    """What the client got, but for its request id (one more each request) and the lengths it changes."""
    sent = bytes(play.to_client).replace(play.conn._rid.encode(), b"RID")
    return re.sub(rb"\r\nContent-Length: \d+", b"\r\nContent-Length: N", sent)


# Heads that arrive as one read (read as they came, where nothing is held) and what may come with them.
_ONE_READ = [
    pytest.param(upgrade(), id="upgrade"),
    pytest.param(get("/b/x"), id="get"),
    pytest.param(b"\r\n" + get("/a/x"), id="stray-crlf-first"),
    pytest.param(b"\r\n\r\n", id="blank-lines"),
    pytest.param(get("/a/1") + get("/b/2"), id="pipelined"),
    pytest.param(post("/a/p", b"body"), id="with-body"),
    pytest.param(get("/a/x", "X: " + "x" * (4097 - len(get("/a/x", "X: \r\n"))) + "\r\n"), id="a-byte-past-the-limit"),
    pytest.param(get("/a/x", "X: " + "x" * (4096 - len(get("/a/x", "X: \r\n"))) + "\r\n"), id="at-the-limit"),
    pytest.param(b"HEAD /a HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n\r\n", id="refused-head"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n", id="bare-lf"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\r\n", id="crlf-after"),
]


@pytest.mark.parametrize("data", _ONE_READ)
def test_a_head_read_whole_is_read_as_one_held_first(data: bytes) -> None:
    """What the core does with a read that is one whole head (no copy into its buffer) is what it does with
    the same bytes when a first byte of them was already held: the same backends, bytes and answer."""
    plays = [Play(), Play()]
    plays[0].client(data)
    plays[1].client(data[:1])
    plays[1].client(data[1:])
    for play in plays:
        if play.opened:
            play.connected()
            play.backend(ok())
    whole, held = plays
    assert (whole.opened, whole.to_backend, whole.conn.state) == (held.opened, held.to_backend, held.conn.state)
    assert _sent_to_client(whole) == _sent_to_client(held)


def test_error_body_has_status_reason_and_request_id_and_echoes_nothing() -> None:
    play = Play()
    play.client(b"GET /nowhere-SECRET HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, body = play.answer()
    assert status == 404
    rid = headers["x-request-id"]
    assert body == f"404 Not Found\nrequest id: {rid}\n".encode()
    assert b"SECRET" not in bytes(play.to_client)
    assert headers["connection"] == "close"


def test_request_ids_are_unique_and_short() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) <= 16 and int(i, 16) >= 0 for i in ids)


def test_head_must_arrive_within_the_handshake_timeout() -> None:
    play = Play()
    assert play.timer == T0 + 5
    play.client(b"GET /a HTTP/1.1\r\n", dt=4.0)
    play.fire()
    assert play.closed_client == CloseClient() and play.opened == [] and play.to_client == b""


def test_under_tls_a_head_not_in_time_is_cut_without_waiting_for_close_notify() -> None:
    """A graceful TLS close waits for the client's close_notify, which a client that sent no head in
    time does not send either: the connection is aborted instead."""
    play = Play(tls=True)
    play.client(b"GET /a HTTP/1.1\r\n", dt=1.0)
    play.fire()
    assert play.closed_client == CloseClient(abort=True) and play.to_client == b""


def test_under_tls_an_idle_keep_alive_connection_is_closed_gracefully() -> None:
    """After an answer, the end of it may still be buffered for a client that paused: the idle close
    lets it go out first (a graceful close, bounded by the TLS shutdown timeout)."""
    play = Play(tls=True)
    play.client(get("/a/1"))
    play.connected()
    play.backend(ok())
    assert play.conn.state == HEAD and play.closed_client is None
    play.fire()
    assert play.closed_client == CloseClient(abort=False)


@pytest.mark.parametrize("pieces", [[b"\r", b"\nGET /a/1 HTTP/1.1\r\nHost: h\r\n\r\n"],
                                    [b"\r\n", b"G", b"ET /a/1 HTTP/1.1\r\nHost: h\r\n\r\n"],
                                    [b"GE", b"T", b" /a/1 HTTP/1.1\r\nHost: h\r\n\r\n"]])
def test_a_request_line_that_starts_well_in_pieces_is_read(pieces: list[bytes]) -> None:
    """The early check of a head's first bytes leaves a split method, or an ignorable empty line whose
    CR and LF come in two reads, to be read whole."""
    play = Play()
    for piece in pieces:
        assert play.conn.state == HEAD
        play.client(piece)
    assert play.opened == ["a1"]


def test_a_bad_request_line_is_refused_at_its_crlf_on_every_request_of_a_connection() -> None:
    """Checked once per head, when its first CRLF comes: the field lines after a good request line are
    not read as one, and the next request on a kept-alive connection has its own line checked."""
    play = Play()
    for piece in (b"GET /a/1 HTTP/1.1\r", b"\nHo", b"st: h\r\n", b"X: y\r\n", b"\r\n"):
        assert play.conn.state == HEAD and play.to_client == b""
        play.client(piece)
    assert play.opened == ["a1"]
    play.connected()
    play.backend(ok())
    assert play.conn.state == HEAD
    answered = len(play.to_client)
    play.client(b"GET /a/2\r\n")
    assert play.opened == ["a1"] and play.conn.state == CLOSED
    assert play.to_client[answered:].startswith(b"HTTP/1.1 400 ")


def test_over_max_connections_is_503_with_retry_after() -> None:
    """A connection the shell found over the limit at accept: 503 with Retry-After, no backend opened."""
    play = Play(CONFIG.replace("limits: {", "limits: {max_connections: 1, "))
    again = Connection(play.ctx, client_ip="192.0.2.8", tls=False)
    play.to_client.clear()
    play.closed_client = None
    play._apply(again.start(T0, admitted=False))
    status, headers, _ = play.answer()
    assert status == 503 and headers["retry-after"]
    assert play.closed_client is not None and play.opened == []


@settings(max_examples=100, deadline=None)
@given(limit=st.integers(1, 60), burst=st.integers(0, 200), tunnels=st.integers(0, 70))
def test_a_burst_is_admitted_in_accept_order_up_to_the_limit(limit: int, burst: int, tunnels: int) -> None:
    """The rule the shell applies at each accept (ctx.count_in): in accept order, the first
    `limit - tunnels` of a burst are admitted and only the rest get 503 (carried to `start`, however
    late a TLS handshake completes: tests/integration/test_inflight.py holds that end to end)."""
    play = Play(CONFIG.replace("limits: {", f"limits: {{max_connections: {limit}, "))
    play.ctx.handshaking = 0
    play.ctx.tunnels = {object() for _ in range(tunnels)}  # type: ignore[misc]
    counts = [AcceptCount(play.ctx) for _ in range(burst)]
    admitted = [count.admitted for count in counts]
    assert admitted == [i < limit - tunnels for i in range(burst)]
    assert play.ctx.handshaking == burst
    for count in counts[: burst // 2]:  # handshakes that failed free their places...
        count.release()
        count.release()  # ...once
    assert play.ctx.handshaking == burst - burst // 2
    assert [count.admitted for count in counts] == admitted  # a decision made at accept is kept


def test_a_burst_between_two_looks_of_the_memory_release_still_releases() -> None:
    """1,500 TLS handshakes that come and go within a second were never seen by the once-a-second look
    of lb.control.memory: their heap stayed for 5 minutes (150 MB).  The peak counted at accept is."""
    play = Play()
    play.ctx.handshaking = 0
    policy = ReleasePolicy(min_drop=256, min_gap=5.0, every=300.0)
    assert not policy.due(play.ctx.own_connections(), 0.0, peak=play.ctx.take_peak())
    counts = [AcceptCount(play.ctx) for _ in range(1_500)]
    for count in counts:
        count.release()
    assert policy.due(play.ctx.own_connections(), 10.0, peak=play.ctx.take_peak())
    assert play.ctx.take_peak() == 0, "counted from those held at the last look"


# -- upgrades: nothing behind the head reaches the backend before it switches ------------------------


def test_upgrade_holds_early_data_until_101_then_joins_with_it() -> None:
    play = Play()
    play.client(upgrade() + b"\x81\x85early")
    assert play.opened == ["a1"]
    play.connected()
    assert play.to_backend[0].startswith(b"GET /a/ws HTTP/1.1\r\n")
    assert play.to_backend[0].endswith(b"\r\n\r\n")  # the head only: the frame is held
    join = play.backend(SWITCH + b"\x81\x05hello")[-1]
    assert isinstance(join, JoinTunnel)
    assert (join.to_server, join.to_client, join.pool) == (b"\x81\x85early", b"\x81\x05hello", "a")
    assert join.request_id == play.conn.request_id != "-"
    assert play.conn.state == TUNNEL and play.timer is None
    status, headers, _ = play.answer()
    assert status == 101 and "set-cookie" in headers
    assert play.connections() == {"a1": 1, "b1": 0, "b2": 0}  # the tunnel releases it


TRUSTING = CONFIG + 'trusted_proxies: ["203.0.113.0/24"]\n'


def test_a_trusted_proxy_is_recognised_once_and_its_chain_believed() -> None:
    """A trusted peer (here as a dual-stack socket reports it): its X-Forwarded-For names the client."""
    play = Play(TRUSTING, client_ip="::ffff:203.0.113.7")
    play.client(get("/a/x", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    assert b"X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n" in play.to_backend[0]
    assert (play.conn.client_ip, play.conn.client_port) == ("198.51.100.1", 0)
    play.backend(ok())
    play.client(get("/a/y"))  # no chain: the proxy itself is the client, port and all
    assert (play.conn.client_ip, play.conn.client_port) == ("203.0.113.7", 4711)


def test_a_link_local_trusted_proxy_is_believed_whatever_interface_it_comes_in_on() -> None:
    """`trusted_proxies: [fe80::/10]` holds a peer the socket reports as `fe80::1%eth0` (the zone names our
    interface), as `proxy_protocol_from` does: its chain names the client."""
    play = Play(CONFIG + 'trusted_proxies: ["fe80::/10"]\n', client_ip="fe80::1%eth0")
    play.client(get("/a/x", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    assert b"X-Forwarded-For: 198.51.100.1, fe80::1\r\n" in play.to_backend[0]
    assert play.conn.client_ip == "198.51.100.1"


def test_a_refused_head_after_a_trusted_proxys_request_is_logged_as_the_peers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a trusted proxy's keep-alive connection, a head that does not parse names no hop: its line says
    the peer, not the client of the request before it (who did not send it)."""
    play = Play(TRUSTING, client_ip="::ffff:203.0.113.7")
    play.client(get("/a/x", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    play.backend(ok())
    caplog.clear()  # the first request's line, captured too if a test before this one left lb.access at INFO
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.client(b"GET /a/y HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "status=400" in lines[0], lines
    assert "client=203.0.113.7" in lines[0], lines


def test_a_reload_reaches_a_keep_alive_connection_at_its_next_request() -> None:
    """A connection's configuration was taken at accept and kept to its end: a proxy taken out of
    `trusted_proxies` by a reload went on having its X-Forwarded-For believed on a keep-alive connection, and
    its requests routed by the old routes, to the old pools, for as long as it stayed busy."""
    play = Play(TRUSTING, client_ip="::ffff:203.0.113.7")
    play.client(get("/a/x", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    assert play.opened == ["a1"] and play.conn.client_ip == "198.51.100.1"
    play.backend(ok())
    # What the balancer's reload swaps in, in one step: no trusted proxy, and /a now routed to pool b.
    reloaded = ProxyContext.build(
        parse_config(CONFIG.replace("pool: a}", "pool: b}"), base_dir=Path("."), environ={}),
        lambda *_: None, wall_offset=0.0,
    )
    ctx = play.ctx
    ctx.pools, ctx.routes, ctx.codec = reloaded.pools, reloaded.routes, reloaded.codec
    ctx.protected, ctx.trusted_proxies, ctx.config = reloaded.protected, reloaded.trusted_proxies, reloaded.config
    play.client(get("/a/y", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    assert play.opened[-1] in ("b1", "b2")
    assert b"X-Forwarded-For: 203.0.113.7\r\n" in play.to_backend[-1] and b"198.51.100.1" not in play.to_backend[-1]
    assert (play.conn.client_ip, play.conn.client_port) == ("203.0.113.7", 4711)


def test_an_untrusted_peer_is_never_asked_for_its_chain() -> None:
    """With trusted_proxies set, any other peer's X-Forwarded-For is replaced by its own address."""
    play = Play(TRUSTING, client_ip="::ffff:192.0.2.9")
    assert play.conn.client_ip == "192.0.2.9"
    play.client(get("/a/x", "X-Forwarded-For: 198.51.100.1\r\n"))
    play.connected()
    assert b"X-Forwarded-For: 192.0.2.9\r\n" in play.to_backend[0]
    assert b"198.51.100.1" not in play.to_backend[0]
    assert (play.conn.client_ip, play.conn.client_port) == ("192.0.2.9", 4711)


def test_refused_upgrade_is_an_answer_and_what_follows_is_the_next_request() -> None:
    """The smuggling case: a second request hidden behind an Upgrade is parsed and routed on its own."""
    play = Play()
    hidden = get("/b/admin", "X-Smuggled: 1\r\n")
    play.client(upgrade() + hidden)
    play.connected()
    assert b"X-Smuggled" not in play.to_backend[0]
    play.backend(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
    # The refusal is relayed, the backend connection dropped, and the hidden request goes to ITS route.
    assert play.opened == ["a1", "b1"]
    assert b"X-Smuggled" not in play.to_backend[0]
    play.connected()
    assert play.to_backend[1].startswith(b"GET /b/admin HTTP/1.1\r\n")
    assert b"X-Forwarded-For: 192.0.2.7" in play.to_backend[1]
    assert play.connections() == {"a1": 0, "b1": 1, "b2": 0}
    status, headers, body = play.answer()
    assert (status, body) == (403, b"nope") and headers.get("connection") != "close"


def test_unasked_101_is_a_502() -> None:
    """And the backend's fault at once: the request carried no upgrade (hop-by-hop, it is not passed on)."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(SWITCH)
    assert play.answer()[0] == 502 and play.conn.state == CLOSED
    assert [failure[:2] for failure in play.failures] == [("a", "a1")]


@pytest.mark.parametrize("bad", [
    pytest.param(SWITCH.replace(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", b""), id="no-accept"),
    pytest.param(SWITCH.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="), id="wrong-accept"),
    pytest.param(SWITCH.replace(b"Upgrade: websocket", b"Upgrade: h2c"), id="upgrade-h2c"),
    pytest.param(SWITCH.replace(b"Upgrade: websocket\r\n", b""), id="no-upgrade"),
    pytest.param(SWITCH.replace(b"Connection: Upgrade", b"Connection: keep-alive"), id="no-connection-upgrade"),
    pytest.param(SWITCH.replace(b"Upgrade: websocket", b"Upgrade: h2c, websocket"), id="upgrade-list"),
])
def test_a_101_the_client_would_reject_is_a_failed_backend(bad: bytes) -> None:
    """A gateway whose 101 fails the client's checks (RFC 6455 §4.1) is broken: retried elsewhere, and blamed
    once the other answers (which shows the request was not the cause)."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play.connected()
    play.backend(bad)
    assert play.conn.state == CONNECTING and len(play.opened) == 2
    play.connected()
    play.backend(SWITCH)
    assert play.answer()[0] == 101 and play.conn.state == TUNNEL
    assert len(play.failures) == 1 and "malformed answer: 101 with" in play.failures[0][2]


@pytest.mark.parametrize("extra", [
    pytest.param(b"Sec-WebSocket-Protocol: graphql-ws\r\n", id="protocol-not-offered"),
    pytest.param(b"Sec-WebSocket-Extensions: permessage-deflate\r\n", id="extension-not-offered"),
])
def test_a_101_naming_what_this_client_did_not_offer_is_its_502_alone(extra: bytes) -> None:
    """A gateway that always names a subprotocol is right for the clients that offer it: one that did not
    gets a 502 (it would fail the 101), with no retry elsewhere (every gateway may answer so) and no
    health verdict, so such clients cannot take a pool down."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play.connected()
    play.backend(SWITCH[:-2] + extra + b"\r\n")
    assert play.answer()[0] == 502 and len(play.opened) == 1 and play.failures == []
    assert play.ctx.observations.backend_errors[("b", play.opened[0], "bad_answer")] == 1


@pytest.mark.parametrize("answer", [
    pytest.param(b"SSH-2.0-OpenSSH_9.2p1\r\n", id="ssh-banner"),
    pytest.param(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", id="http2-settings"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="bare-lf"),
])
def test_an_answer_that_is_not_http_fails_at_once_as_a_bad_answer(answer: bytes) -> None:
    """Not after backend_connect of waiting for a CRLFCRLF that never comes, and not as a timeout."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(answer)
    assert play.answer()[0] == 502 and play.now == T0
    assert "not an HTTP/1.x head" in play.failures[0][2]


@pytest.mark.parametrize("answer", [
    pytest.param(b"garbage garbage\r\n\r\n", id="garbage"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX: a\nb\r\nContent-Length: 0\r\n\r\n", id="bare-lf"),
])
@pytest.mark.parametrize("reads", [1, 2])
def test_an_answer_that_is_not_http_is_blamed_at_once_however_it_is_read(answer: bytes, reads: int) -> None:
    """Whole in one read (its blank line included) or in two: the same verdict, at once, with no other
    backend answering the request (a POST is not retried).  Whole, it went on trial, never to be blamed."""
    play = Play()
    play.client(post("/a/x", b"data"))
    play.connected()
    cut = answer.index(b"\r\n") + 2 if reads == 2 else len(answer)
    play.backend(answer[:cut])
    if answer[cut:]:
        play.backend(answer[cut:])
    assert play.answer()[0] == 502 and play.opened == ["a1"]
    assert [failure[:2] for failure in play.failures] == [("a", "a1")]


def test_an_http10_client_gets_no_interim_answer() -> None:
    """An HTTP/1.0 client would take a 103 or 100 for the answer (RFC 9110 §15.2): only the final one."""
    play = Play()
    play.client(b"GET /a/x HTTP/1.0\r\nHost: h\r\n\r\n")
    play.connected()
    assert play.to_backend[0].startswith(b"GET /a/x HTTP/1.0\r\n")
    play.backend(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
    assert play.to_client == b""
    play.backend(ok())
    assert play.answer()[0] == 200 and play.to_client.count(b"HTTP/1.1") == 1


def test_a_chunked_answer_to_an_http10_client_is_a_502() -> None:
    """Forbidden to a 1.0 request (RFC 9112 §6.1), and its client would read the chunk sizes as the body."""
    play = Play()
    play.client(b"GET /a/x HTTP/1.0\r\nHost: h\r\n\r\n")
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert play.answer()[0] == 502 and b"hello" not in play.to_client
    # The client picks the version: no failed check, no retry (one request must not mark a pool down).
    assert play.failures == [] and play.opened == ["a1"] and play.connections()["a1"] == 0


def test_a_higher_minor_version_is_served_and_sent_on_as_http11() -> None:
    """RFC 9110 §2.5: HTTP/1.2 is read as the highest minor version we implement, and a backend (llhttp
    refuses 1.2) gets our own, HTTP/1.1 (§2.5: an intermediary sends its own version); HAProxy does the same."""
    play = Play()
    play.client(b"POST /a/x HTTP/1.2\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    play.connected()
    assert play.to_backend[0].startswith(b"POST /a/x HTTP/1.1\r\n") and b"HTTP/1.2" not in play.to_backend[0]
    play.backend(b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert play.answer()[0] == 200 and play.to_client.startswith(b"HTTP/1.1 200 OK\r\n")
    assert play.conn.state == HEAD  # kept alive, as for HTTP/1.1


def test_a_websocket_upgrade_in_a_higher_minor_version_and_its_101_are_read_as_http11() -> None:
    play = Play()
    play.client(upgrade().replace(b" HTTP/1.1\r\n", b" HTTP/1.9\r\n", 1))
    play.connected()
    assert play.to_backend[0].startswith(b"GET /a/ws HTTP/1.1\r\n")
    join = play.backend(SWITCH.replace(b"HTTP/1.1", b"HTTP/1.2", 1))[-1]
    assert isinstance(join, JoinTunnel) and play.conn.state == TUNNEL
    assert play.to_client.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and play.answer()[0] == 101


def test_accept_value_is_rfc_6455s_worked_example() -> None:
    assert accept_value(WS_KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- keep-alive and pipelining -------------------------------------------------------------------


def test_keep_alive_three_requests_each_routed_by_its_own_path() -> None:
    play = Play()
    for i, (path, backend) in enumerate([("/a/1", "a1"), ("/b/2", "b1"), ("/a/3", "a1")]):
        play.client(get(path))
        assert play.opened[-1] == backend
        play.connected()
        assert play.to_backend[i].startswith(f"GET {path} HTTP/1.1\r\n".encode())
        assert b"Connection: close" in play.to_backend[i]  # one request per backend connection
        play.backend(ok(path.encode()))
        assert play.conn.state == HEAD
        assert play.timer == play.now + 5  # idle keep-alive: timeouts.handshake
    assert play.to_client.count(b"HTTP/1.1 200 OK") == 3
    assert play.closed_client is None
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}


@pytest.mark.parametrize("failure", ["refused", "silent"])
def test_each_request_of_a_keep_alive_connection_has_its_own_retries(failure: str) -> None:
    """What one request spent (the backends it tried, its waits against `retries`) does not shorten the
    next one's: the first choice of both failing, each still goes on to the other backend."""
    play = Play(CONFIG.replace('address: "127.0.0.1:7003"}]', 'address: "127.0.0.1:7003"}]\n    retries: 1'))
    for n in (1, 2):
        play.to_client.clear()
        play.client(get(f"/b/{n}"))
        if failure == "refused":
            play.backend_failed()
        else:
            play.fire()  # not connected within timeouts.backend_connect: a wait
        play.connected()
        play.backend(ok())
        assert play.answer()[0] == 200, n
    assert len(play.opened) == 4 and set(play.opened[:2]) == set(play.opened[2:]) == {"b1", "b2"}


def test_a_head_refused_after_an_answered_request_is_a_request_of_its_own() -> None:
    """Its own request id, and its own method: the HEAD before it does not take the 400's body away."""
    play = Play()
    play.client(b"HEAD /a/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    first = play.conn.request_id
    assert play.conn.state == HEAD
    play.to_client.clear()
    play.client(b"GET /a/2 HTTP/1.1\r\n\r\n")  # no Host: refused as it is read, before it is routed
    status, headers, body = play.answer()
    assert status == 400 and headers["x-request-id"] not in ("-", first) and body.startswith(b"400 Bad Request")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
])
def test_an_answer_without_a_body_ends_the_request_with_its_head(answer: bytes) -> None:
    """No body to wait for: the backend is released and the next request goes out at once, not after
    the body's quiet-spell deadline."""
    play = Play()
    play.client(get("/a/1") + get("/a/2"))
    play.connected()
    play.backend(answer)
    assert play.opened == ["a1", "a1"] and play.conn.state == CONNECTING
    assert play.to_client.startswith(answer.split(b"\r\n")[0]) and play.connections()["a1"] == 1


def test_an_answer_before_the_end_of_the_upload_closes_the_connection_after_it() -> None:
    """The rest of the body still comes: read as the next request's head it would smuggle one past the
    router, so the answer says Connection: close and the connection ends with it."""
    play = Play()
    play.client(post("/a/x", b"x" * 10)[:-5])
    play.connected()
    play.backend(ok())
    assert play.answer()[1]["connection"] == "close"
    play.client(b"GET /")
    play.client(b"b/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert play.opened == ["a1"] and play.closed_client is not None


def test_a_client_that_half_closes_while_its_answer_streams_is_closed_at_its_end() -> None:
    """Nothing more will come from it: closed as its answer ends, not left to the head timer."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    play._apply(play.conn.client_eof(play.now))
    assert play.closed_client is None
    play.backend(b"cd")
    assert play.closed_client == CloseClient() and play.conn.state == CLOSED


def test_pipelined_requests_are_sent_one_at_a_time() -> None:
    play = Play()
    play.client(get("/a/1") + get("/b/2") + get("/a/3"))
    assert play.opened == ["a1"]
    play.connected()
    assert play.to_backend[0].count(b"GET ") == 1
    play.backend(ok())
    assert play.opened == ["a1", "b1"]
    play.connected()
    assert play.to_backend[1].count(b"GET ") == 1 and play.to_backend[1].startswith(b"GET /b/2 ")
    play.backend(ok())
    play.connected()
    play.backend(ok())
    assert play.opened == ["a1", "b1", "a1"]
    assert [len(x.split(b"\r\n\r\n")) for x in play.to_backend] == [2, 2, 2]


def test_body_is_framed_and_what_follows_is_not_forwarded() -> None:
    play = Play()
    play.client(post("/a/up", b"0123456789") + get("/b/next"))
    play.connected()
    _head, _, body = play.to_backend[0].partition(b"\r\n\r\n")
    assert body == b"0123456789"
    play.backend(ok())
    assert play.opened == ["a1", "b1"]


def test_chunked_body_is_framed_to_its_last_chunk() -> None:
    play = Play()
    body = b"5\r\nhello\r\n0\r\n\r\n"
    play.client(b"POST /a/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body[:7])
    play.connected()
    play.client(body[7:] + get("/b/after"))
    assert play.to_backend[0].partition(b"\r\n\r\n")[2] == body
    play.backend(ok())
    assert play.opened == ["a1", "b1"]


@pytest.mark.parametrize("coding", [b",chunked", b"chunked,", b" , chunked, ,"])
def test_empty_transfer_coding_elements_are_ignored_and_not_sent_on(coding: bytes) -> None:
    """RFC 9110 §5.6.1.2 (a recipient MUST ignore them); the backend gets `chunked` alone, since parsers
    read the empties apart (llhttp refuses `chunked,`, HAProxy 2.6 answers `,chunked` 422)."""
    play = Play()
    body = b"5\r\nhello\r\n0\r\n\r\n"
    play.client(b"POST /a/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + coding + b"\r\n\r\n" + body + get("/b/after"))
    play.connected()
    head, _, sent_body = play.to_backend[0].partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head + b"\r\n" and head.count(b"Transfer-Encoding") == 1
    assert sent_body == body
    play.backend(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert play.to_client.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked\r\n" in play.to_client
    assert coding not in play.to_client and play.to_client.endswith(b"2\r\nhi\r\n0\r\n\r\n")
    assert play.opened == ["a1", "b1"]  # the next request is read where the chunked body ends


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"Connection: Upgrade", b"Connection: , Upgrade"), (b"Upgrade: websocket", b"Upgrade: , websocket"),
     (b"Connection: Upgrade", b"Connection: Upgrade,,"), (b"Upgrade: websocket", b"Upgrade: websocket,")],
)
def test_empty_elements_of_an_upgrades_lists_are_ignored(old: bytes, new: bytes) -> None:
    """RFC 9110 §5.6.1.2, as HAProxy does; the backend gets our own `Connection: Upgrade`, `Upgrade: websocket`."""
    play = Play()
    play.client(upgrade().replace(old, new, 1))
    play.connected()
    assert b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" in play.to_backend[0] and new not in play.to_backend[0]
    play.backend(SWITCH)
    assert play.conn.state == TUNNEL and play.answer()[0] == 101


def test_a_trailer_named_like_our_headers_never_reaches_the_backend() -> None:
    """A request trailer `X-Forwarded-For` (or the configured affinity header) is a 400 before its
    line is forwarded: a backend that merges trailers into the head would read it as ours."""
    for name in ("X-Forwarded-For", "x_forwarded_for", "X-Game-Affinity"):
        play = Play(CONFIG.replace("affinity: {", "affinity: {header: X-Game-Affinity, "))
        play.client(b"POST /a/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        play.connected()
        play.client(b"0\r\nX-Checksum: 1\r\n" + name.encode() + b": 6.6.6.6\r\n\r\n")
        assert play.answer()[0] == 400, name
        assert b"6.6.6.6" not in b"".join(play.to_backend), name


HASHED = CONFIG.replace(
    "balance: round_robin\n    backends: [{id: a1",
    "balance: hash\n    hash_key: header:X-User-Id\n    backends: [{id: a1",
)


def test_the_header_a_pool_routes_by_is_protected_as_ours_are() -> None:
    """`hash_key: header:X-User-Id`: a client's `X_User_Id` is dropped (a backend that reads `_` as `-`
    would see another user than the one the balancer hashed), and a trailer so named is a 400."""
    assert "hash_key: header:X-User-Id" in HASHED
    play = Play(HASHED)
    play.client(get("/a/x", "X-User-Id: u1\r\nX_User_Id: u2\r\nX_Other: kept\r\n"))
    play.connected()
    forwarded = b"".join(play.to_backend)
    assert b"X-User-Id: u1\r\n" in forwarded and b"u2" not in forwarded and b"X_Other: kept\r\n" in forwarded
    for name in ("X-User-Id", "x_user_id"):
        play = Play(HASHED)
        play.client(b"POST /a/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        play.connected()
        play.client(b"0\r\n" + name.encode() + b": u9\r\n\r\n")
        assert play.answer()[0] == 400, name
        assert b"u9" not in b"".join(play.to_backend), name
    # Without a pool that hashes by it, the name is the client's own: an `_` spelling passes.
    play = Play()
    play.client(get("/a/x", "X_User_Id: u2\r\n"))
    play.connected()
    assert b"X_User_Id: u2\r\n" in b"".join(play.to_backend)


def test_connection_close_and_http10_end_after_the_answer() -> None:
    for request in (get("/a/x", "Connection: close\r\n"), b"GET /a/x HTTP/1.0\r\n\r\n"):
        play = Play()
        play.client(request)
        play.connected()
        play.backend(ok())
        assert play.closed_client == CloseClient()
        assert play.answer()[1]["connection"] == "close"


def test_answer_until_eof_closes_the_client_after_it() -> None:
    play = Play()
    play.client(get("/a/x") + get("/a/y"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\n\r\nstream")
    assert play.conn.state == RELAY and play.closed_client is None
    play.backend(b"ing")
    play.backend_eof()
    assert bytes(play.to_client).endswith(b"\r\n\r\nstreaming")
    assert play.closed_client == CloseClient() and play.opened == ["a1"]


def test_answer_until_eof_cut_by_a_reset_resets_the_client() -> None:
    """A body that ends at close, then a reset: the client is cut at TCP level too (RFC 9112 §8), as a
    FIN would have it take the half answer for a whole one."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\n\r\nhalf an ans")
    play.backend_failed("connection lost: [Errno 104] Connection reset by peer")
    assert bytes(play.to_client).endswith(b"\r\n\r\nhalf an ans")
    assert play.closed_client == CloseClient(abort=True)
    assert play.connections()["a1"] == 0


# -- bounds ---------------------------------------------------------------------------------------


def test_early_data_pauses_reading_past_the_limit_and_sends_nothing() -> None:
    play = Play()
    play.client(upgrade())
    play.connected()
    sent = len(play.to_backend[0])
    for _ in range(10):
        play.client(b"x" * 16384)
    assert play.paused
    assert len(play.to_backend[0]) == sent
    assert play.actions.count(PauseClient()) == 1


def test_pipelined_flood_behind_a_slow_answer_pauses() -> None:
    play = Play()
    play.client(get("/a/1"))
    play.connected()
    play.client(get("/a/2") * (2 * HELD_LIMIT // len(get("/a/2"))))
    assert play.paused
    play.backend(ok())
    assert play.opened == ["a1", "a1"]  # the next request is served; the rest (still too much) waits its turn
    assert play.paused


def test_interim_answers_are_relayed_up_to_a_bound_then_502() -> None:
    play = Play()
    play.client(post("/a/x", b"", "Expect: 100-continue\r\n"))
    play.connected()
    for _ in range(MAX_INTERIM):
        play.backend(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert play.to_client.count(b"HTTP/1.1 100 Continue") == MAX_INTERIM
    play.backend(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    assert b"502 Bad Gateway" in play.to_client and play.conn.state == CLOSED
    assert play.failures and play.failures[0][:2] == ("a", "a1")


def test_interim_answers_do_not_extend_the_deadline() -> None:
    play = Play()
    play.client(post("/a/x", b"", "Expect: 100-continue\r\n"))
    deadline = play.timer
    play.connected()
    play.backend(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert play.timer == deadline
    play.fire()
    assert play.now == T0 + 2
    assert b"502 Bad Gateway" in play.to_client


EXPECTING = b"POST /a/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"


def expecting(head: bytes = EXPECTING) -> Play:
    """`head` (with Expect: 100-continue, no body yet) out to its backend; timeouts.response 8 s, handshake 5 s."""
    play = Play(CONFIG.replace("backend_connect: 2s}", "backend_connect: 2s, response: 8s}"))
    play.client(head)
    play.connected()
    return play


def test_an_expect_100_continue_left_unanswered_is_the_backends_502_not_the_clients_408() -> None:
    """The client may wait for 100 Continue before its body (RFC 9110 §10.1.1): a backend that says nothing
    is silent as to a request sent whole (502 after timeouts.response), not a client that stopped uploading."""
    play = expecting()
    assert play.timer == play.now + 8  # the backend's time, not the client's 5 s (timeouts.handshake)
    play.fire()
    assert play.answer()[0] == 502 and play.opened == ["a1"] and play.failures == []
    assert play.ctx.stats.rejected[408] == 0


def test_early_hints_are_no_100_continue() -> None:
    """A 103 before the 100 is not the leave the client waits for: the wait stays the backend's."""
    play = expecting()
    play.now += 1
    play.backend(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    play.fire()
    assert play.now == T0 + 8 and b"502 Bad Gateway" in play.to_client and play.failures == []
    assert play.ctx.stats.rejected[408] == 0


def test_an_http10_expect_100_continue_is_ignored() -> None:
    """RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored (and that client gets
    no 1xx): a body that does not come is the client's 408 after timeouts.handshake, the backend unblamed."""
    play = expecting(EXPECTING.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert play.timer == play.now + 5
    play.fire()
    assert b"408 Request Timeout" in play.to_client and play.failures == []
    assert play.ctx.observations.backend_errors[("a", "a1", "timeout")] == 0


def test_a_body_sent_without_waiting_for_100_continue_is_the_clients_time() -> None:
    """The client may also send its body at once: a quiet spell in it is the client's 408 after
    timeouts.handshake from its last byte, not after the backend's timeouts.response set for the 100."""
    play = expecting()
    play.client(b"a", dt=1)
    assert play.timer == T0 + 1 + 5
    play.fire()
    assert b"408 Request Timeout" in play.to_client and play.failures == []


def test_after_100_continue_the_body_is_the_clients_time() -> None:
    play = expecting()
    play.now += 1
    play.backend(b"HTTP/1.1 100 Continue\r\n\r\n")
    play.fire()  # set for the backend's 8 s; the client's 5 s run from the 100
    assert play.now == T0 + 6 and b"408 Request Timeout" in play.to_client


def test_answer_head_is_bounded() -> None:
    play = Play()
    play.client(post("/a/x", b"1"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_RESPONSE_HEAD)
    assert b"502 Bad Gateway" in play.to_client


# Backend reads whose first head is whole (taken from the read as it came, where nothing is held), and
# what may follow it in the same read, for the request each answers (an upgrade, or a POST expecting 100).
_ANSWERS_IN_ONE_READ = [
    pytest.param(upgrade(), SWITCH, id="101"),
    pytest.param(upgrade(), SWITCH + b"\x81\x05hello", id="101-and-a-frame"),
    pytest.param(upgrade(), b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + SWITCH + b"\x81\x01x", id="103-101"),
    pytest.param(upgrade(), SWITCH.replace(b"HTTP/1.1", b"HTTP/1.2", 1) + b"\x81\x01x", id="101-read-the-long-way"),
    pytest.param(upgrade(), SWITCH.replace(b"s3pPLMB", b"AAAAAAA"), id="101-wrong-accept"),
    pytest.param(upgrade(), ok(b"no"), id="refused-upgrade"),
    pytest.param(upgrade(), b"HTTP/1.1 000 Zero\r\n\r\n", id="status-000"),
    pytest.param(upgrade(), b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"x" * 70000 + b"\r\n\r\n", id="too-large"),
    pytest.param(post("/a/x", b"", "Expect: 100-continue\r\n"), b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"done"),
                 id="100-200"),
    pytest.param(post("/a/x", b"", "Expect: 100-continue\r\n"), b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2",
                 id="100-then-part"),
    pytest.param(get("/a/x"), ok(b"body") + b"HTTP/1.1 200 OK\r\n", id="200-and-more"),
]


@pytest.mark.parametrize(("request_head", "answer"), _ANSWERS_IN_ONE_READ)
def test_an_answer_read_whole_is_read_as_one_held_first(request_head: bytes, answer: bytes) -> None:
    """What the core does with a backend read whose head is whole (taken from the read, what follows it
    not held) is what it does with the same bytes when a first byte of them was already held: the same
    bytes to the client, the same tunnel's bytes, state and failures."""
    plays = [Play(), Play()]
    results: list[list[Action]] = []
    for play, reads in zip(plays, ([answer], [answer[:1], answer[1:]]), strict=True):
        play.client(request_head)
        play.connected()
        results.append([action for data in reads for action in play.backend(data)])
    joins = [[(a.to_server, a.to_client) for a in actions if isinstance(a, JoinTunnel)] for actions in results]
    assert joins[0] == joins[1]
    whole, held = plays
    assert (whole.opened, whole.to_backend, whole.conn.state, whole.failures) == (
        held.opened, held.to_backend, held.conn.state, held.failures)
    assert _sent_to_client(whole) == _sent_to_client(held)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_answer_heads_fed_in_pieces_are_each_found(split: int) -> None:
    """An interim then a final answer, cut anywhere: both relayed, the search restarting after each."""
    play = Play()
    play.client(post("/a/x", b"", "Expect: 100-continue\r\n"))
    play.connected()
    data = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"done")
    for i in range(0, len(data), split):
        play.backend(data[i : i + split])
    assert play.to_client.count(b"HTTP/1.1 100 Continue\r\n\r\n") == 1
    assert b"HTTP/1.1 200 OK" in play.to_client and play.to_client.endswith(b"done")


def test_short_answer_after_a_long_interim_in_the_same_read_is_found() -> None:
    """The search position of a long interim head does not carry over to the head after it."""
    play = Play()
    play.client(post("/a/x", b"", "Expect: 100-continue\r\n"))
    play.connected()
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"s" * 200 + b">\r\n\r\n"
    play.backend(interim[:-4])
    play.backend(interim[-4:] + ok(b"done"))
    assert b"HTTP/1.1 103 Early Hints" in play.to_client
    assert b"HTTP/1.1 200 OK" in play.to_client and play.to_client.endswith(b"done")


@pytest.mark.parametrize(("mode", "cookie"), [("insert", "LB"), ("rewrite", "SID")])
def test_an_interim_answer_sets_no_cookie_of_the_affinity_name(mode: str, cookie: str) -> None:
    """A 103's Set-Cookie of `affinity.cookie` is left out, other cookies pass: in insert mode it would replace
    the client's pin, in rewrite mode give it the backend's session unsealed (a 1xx is never rewritten)."""
    play = Play(REWRITE_CONFIG if mode == "rewrite" else CONFIG)
    play.client(get("/a/x"))
    play.connected()
    play.backend(
        f"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nSet-Cookie: {cookie}=raw-secret; Path=/\r\n"
        f"Set-Cookie: theme=dark\r\nset-cookie: {cookie} = ; Max-Age=0\r\n\r\n".encode()
    )
    interim = parse_response_head(bytes(play.to_client))
    assert interim.status == 103
    assert interim.head.headers == (("Link", "</s.css>"), ("Set-Cookie", "theme=dark"))
    assert b"raw-secret" not in play.to_client
    play.to_client.clear()
    play.backend(ok())
    status, headers, _ = play.answer()
    assert status == 200
    # The final answer still sets the cookie as the mode says: insert mode's own pin for a new client.
    if mode == "insert":
        assert headers["set-cookie"].startswith("LB=")
    else:
        assert "set-cookie" not in headers


HEADER_CONFIG = CONFIG.replace("mode: insert, cookie: LB,", "mode: insert, cookie: LB, header: X-Aff,")


@pytest.mark.parametrize("config", [CONFIG, HEADER_CONFIG], ids=["cookie", "cookie-and-header"])
def test_a_plain_101_reaches_the_client_as_render_head_writes_it_with_our_fields_last(config: str) -> None:
    """A 101 that plain_switch passes is passed on byte for byte, our Set-Cookie (and the affinity header)
    after its fields: the bytes render_head makes of its status line, its fields and ours."""
    play = Play(config)
    play.client(upgrade())
    play.connected()
    play.backend(SWITCH)
    sent = bytes(play.to_client)
    _, headers, rest = play.answer()
    assert rest == b""
    ours = [("Set-Cookie", headers["set-cookie"])]
    if config == HEADER_CONFIG:
        ours.append(("X-Aff", headers["x-aff"]))
    status_line, *fields = SWITCH[:-4].decode("latin-1").split("\r\n")
    theirs = [(name, value) for name, _, value in (field.partition(": ") for field in fields)]
    assert sent == render_head(status_line, theirs + ours)
    assert sent.startswith(SWITCH[:-2])


def _pin(play: Play) -> str:
    """The token of the LB cookie the client was given."""
    _, headers, _ = play.answer()
    return headers["set-cookie"].split(";", 1)[0].removeprefix("LB=")


def test_a_plain_101_seals_a_new_clients_pin_and_reissues_a_returning_ones_with_its_session() -> None:
    """Through the plain 101: a new client's token names its backend and pool, is dated at the handshake's
    wall clock floored to the millisecond, and carries the session drawn with its nonce; a token past half
    its life is sealed again with the client's own session, a fresh nonce and the new date."""
    first = Play(now=T0 + 0.0017)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH)
    token = _pin(first)
    claim = first.ctx.codec.open(token, T0 + 1)
    assert (claim.backend_id, claim.pool, claim.session, claim.issued_at) == ("a1", "a", b"\x01" * 8, T0 + 0.001)
    assert urlsafe_b64decode(token + "==")[3:15] == b"\x01" * 12  # the nonce drawn with the session

    half_life = first.ctx.config.affinity.max_age / 2
    later = Play(now=T0 + half_life + 1.0042)
    later.conn._random = lambda n: b"\x02" * n  # type: ignore[attr-defined]  # another draw than the first's
    later.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: LB={token}\r\n\r\n".encode()))
    later.connected()
    later.backend(SWITCH)
    again = _pin(later)
    reissued = later.ctx.codec.open(again, later.now)
    assert (reissued.backend_id, reissued.pool, reissued.session) == ("a1", "a", b"\x01" * 8)
    assert reissued.issued_at == T0 + half_life + 1.004
    assert urlsafe_b64decode(again + "==")[3:15] == b"\x02" * 12


UNPINNED_CONFIG = CONFIG.replace(
    "    balance: round_robin\n    backends: [{id: a1,",
    "    balance: source\n    sticky: false\n    backends: [{id: a1,",
)


@pytest.mark.parametrize("request_bytes", [upgrade(), get("/a/x")], ids=["101", "200"])
def test_an_answer_that_seals_nothing_draws_no_randomness(request_bytes: bytes) -> None:
    """A new client of a pool without pins (`sticky: false`) is issued no token: its answer, a 101 or an
    ordinary one, is sent without a session or a nonce drawn for it."""
    assert UNPINNED_CONFIG != CONFIG
    drawn: list[int] = []
    play = Play(UNPINNED_CONFIG)
    play.conn._random = lambda n: drawn.append(n) or b"\x02" * n  # type: ignore[attr-defined]
    play.client(request_bytes)
    play.connected()
    play.backend(SWITCH if request_bytes == upgrade() else ok())
    status, headers, _ = play.answer()
    assert status in (101, 200) and "set-cookie" not in headers
    assert drawn == []


BACKENDS_OWN = b"X-Aff: backend-said\r\nSet-Cookie: SID=abc\r\n"  # SID: rewrite mode's cookie, so a token is sealed
OK_WITH_OWN = ok()[:17] + BACKENDS_OWN + ok()[17:]
OWN_HEADER_ANSWERS = [
    pytest.param(upgrade(), SWITCH[:-2] + BACKENDS_OWN + b"\r\n", id="101"),
    pytest.param(get("/a/x"), OK_WITH_OWN, id="200"),
    pytest.param(get("/a/x"), b"HTTP/1.1 103 Early Hints\r\nx-aff: backend-said\r\n\r\n" + OK_WITH_OWN, id="103"),
]


@pytest.mark.parametrize("mode", ["insert", "rewrite"])
@pytest.mark.parametrize(("request_bytes", "answer"), OWN_HEADER_ANSWERS)
def test_the_backends_own_affinity_header_never_reaches_the_client(
    mode: str, request_bytes: bytes, answer: bytes
) -> None:
    """`affinity.header` is ours, as insert mode's cookie name is: a backend's field of that name is left out of
    every answer (a 101, a plain one, an interim one), or a native client reading its token there would take
    the backend's value for it (the first of two, or the only one when we issue none) and lose its pin."""
    cookie = "LB" if mode == "insert" else "SID"
    config = HEADER_CONFIG.replace("mode: insert, cookie: LB", f"mode: {mode}, cookie: {cookie}")
    new = Play(config)
    new.client(request_bytes)
    new.connected()
    new.backend(answer)
    assert b"backend-said" not in new.to_client
    final = b"HTTP/1.1 " + bytes(new.to_client).rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    ours = parse_response_head(final).head.get_all("x-aff")
    assert len(ours) == 1 and new.ctx.codec.open(ours[0], T0).backend_id == "a1"
    if mode == "insert":  # a returning client: no token of ours to issue, and still none of the backend's
        back = Play(config)
        back.client(request_bytes.replace(b"\r\n\r\n", f"\r\nX-Aff: {ours[0]}\r\n\r\n".encode()))
        back.connected()
        back.backend(answer.replace(b"Set-Cookie: SID=abc\r\n", b""))  # a 101 as gateways write it
        assert back.opened == ["a1"] and b"x-aff:" not in bytes(back.to_client).lower()


@pytest.mark.parametrize("balance", ["source", "hash\n    hash_key: header:X-User-Id"], ids=["source", "hash"])
def test_an_interim_answer_of_a_pool_that_does_not_pin_passes_the_backends_cookie(balance: str) -> None:
    """Rewrite mode, `sticky: false`: a pool routed by the hash alone seals nothing, so a 103's Set-Cookie
    of the backend's cookie passes unchanged, as its final answer's does."""
    config = REWRITE_CONFIG.replace(
        "balance: round_robin\n    backends: [{id: a1",
        f"balance: {balance}\n    sticky: false\n    backends: [{{id: a1",
    )
    assert "sticky: false" in config
    play = Play(config)
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nSet-Cookie: SID=early; Path=/\r\n\r\n")
    interim = parse_response_head(bytes(play.to_client))
    assert interim.head.headers == (("Link", "</s.css>"), ("Set-Cookie", "SID=early; Path=/"))
    play.to_client.clear()
    play.backend(b"HTTP/1.1 200 OK\r\nSet-Cookie: SID=final; Path=/\r\nContent-Length: 0\r\n\r\n")
    status, headers, _ = play.answer()
    assert (status, headers["set-cookie"]) == (200, "SID=final; Path=/")


# -- backend faults: 502, retried when safe --------------------------------------------------------

# Not HTTP/1.x at all, though whole in one read (a blank line and all): counted at once, as in pieces.
NOT_HTTP_WHOLE = [
    pytest.param(b"garbage garbage\r\n\r\n", id="garbage"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", id="bare-lf"),
]
BAD_ANSWERS = [
    *NOT_HTTP_WHOLE,
    pytest.param(b"HTTP/1.1 000 Zero\r\n\r\n", id="status-000"),
    pytest.param(b"HTTP/1.1 99 Low\r\n\r\n", id="two-digits"),
    pytest.param(b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n", id="status-600"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", id="cl-and-te"),
]


def not_http(answer: bytes) -> bool:
    return any(answer in param.values for param in NOT_HTTP_WHOLE)


@pytest.mark.parametrize("answer", BAD_ANSWERS)
def test_malformed_answer_is_502_never_relayed(answer: bytes) -> None:
    """Blamed only if it is not HTTP at all: a POST goes to no other backend, so nothing shows the request
    was not the cause."""
    play = Play()
    play.client(post("/a/x", b"data"))
    play.connected()
    play.backend(answer)
    status, _headers, _ = play.answer()
    assert status == 502 and play.to_client.count(b"HTTP/1.1") == 1
    assert answer.split(b"\r\n")[0] not in play.to_client
    assert [failure[:2] for failure in play.failures] == ([("a", "a1")] if not_http(answer) else [])
    assert play.ctx.observations.backend_errors[("a", "a1", "bad_answer")] == 1
    # An answer came: no failure to connect (lb_handshakes_total{outcome}).
    assert dict(play.ctx.stats.handshakes) == {("a", "a1", "bad_answer"): 1}
    assert play.connections()["a1"] == 0


@pytest.mark.parametrize("answer", BAD_ANSWERS)
def test_malformed_answer_to_a_get_is_retried_on_another_backend(answer: bytes) -> None:
    """And blamed once the other answers."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play.backend(answer)
    assert len(play.opened) == 2 and set(play.opened) == {"b1", "b2"}
    play.connected()
    assert len(play.failures) == not_http(answer)  # else on trial
    play.backend(ok())
    assert play.answer()[0] == 200
    assert [failure[:2] for failure in play.failures] == [("b", play.opened[0])]


@pytest.mark.parametrize(("answer", "reason"), [
    pytest.param(b"HTTP/1.1 000 Zero\r\n\r\n", "no_backend_gave_a_well-formed_answer", id="malformed"),
    pytest.param(None, "no_backend_could_be_reached", id="refused"),
    pytest.param(b"", "no_backend_answered_in_time", id="not-connected-in-time"),
])
def test_the_502s_access_line_says_why_the_last_backend_failed(
    answer: bytes | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed answer's 502 said `no_backend_could_be_reached`, as if none had been."""
    play = Play()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.client(post("/a/x", b"data"))
        if answer is None:
            play.backend_failed("connection refused")
        elif not answer:
            play.fire()
        else:
            play.connected()
            play.backend(answer)
    assert play.answer()[0] == 502
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and f"reason={reason}" in lines[0], lines


@pytest.mark.parametrize("then", ["eof", "reset"])
@pytest.mark.parametrize("request_bytes", [
    pytest.param(post("/a/x", b"data"), id="post-sent-whole"),
    pytest.param(post("/a/x", b"data")[:-2], id="post-body-under-way"),
    pytest.param(get("/b/x"), id="get-retried-on-each-backend"),
])
def test_the_502_of_a_backend_that_closed_on_the_request_does_not_say_none_was_reached(
    request_bytes: bytes, then: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend that was connected and given the request, then closed or reset without an answer, was
    reached: the 502's access line said `no_backend_could_be_reached`, as for a refused connect."""
    play = Play()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.client(request_bytes)
        while play.closed_client is None:
            play.connected()
            if then == "eof":
                play.backend_eof()
            else:
                play.backend_failed("connection lost: [Errno 104] Connection reset by peer")
    assert play.answer()[0] == 502
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "reason=the_backend_closed_before_answering" in lines[0], lines


def test_a_connect_that_fails_oddly_is_no_answer_on_trial() -> None:
    """A connect that fails with an exception of no known kind (error_kind: bad_answer) reached no answer
    the request could have shaped: counted at once, as a refusal is, and not against `retries`."""
    play = Play(SIX_BACKENDS.replace("RETRIES", "0"))
    play.client(get("/b/x"))
    play._apply(play.conn.backend_failed("a connect awaited None, not a future", play.now, "bad_answer"))
    assert [failure[:2] for failure in play.failures] == [("b", play.opened[0])]
    assert len(play.opened) == 2 and play.conn.state == CONNECTING


# What a gateway that writes the client's input into its answer's head may send for one request alone.
REFLECTED = [
    pytest.param(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=a\x01b\r\nContent-Length: 0\r\n\r\n", id="control-byte"),
    pytest.param(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=" + b"x" * 70000 + b"\r\n\r\n", id="head-too-large"),
]


@pytest.mark.parametrize("answer", REFLECTED)
def test_a_request_every_backend_answers_badly_blames_none(answer: bytes) -> None:
    """One request answered with a head that cannot pass by every backend it is tried on: 502, and no backend
    counted a failure.  Counted, two such requests took every gateway of a pool down (fall 2), a 503 for
    everyone; and, as hang-ups, they count against `retries`."""
    play = Play(SIX_BACKENDS.replace("RETRIES", "1"))
    play.client(get("/b/x"))
    while play.closed_client is None and play.conn.state == CONNECTING:
        play.connected()
        play.backend(answer)
    assert play.answer()[0] == 502 and len(play.opened) == 2
    assert play.failures == []


def test_a_plain_request_answered_late_is_502_for_it_alone() -> None:
    """Sent whole, then silence past timeouts.response: a slow endpoint, not a broken backend.  A GET
    is not sent again elsewhere (the backend may be acting on it) and passive health hears nothing
    (four slow GETs used to take every backend of a pool down)."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play.fire()
    assert play.answer()[0] == 502
    assert play.opened == ["b1"] and play.failures == []
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}
    assert play.ctx.stats.handshakes[("b", "b1", "answer_late")] == 1
    assert play.ctx.stats.handshakes[("b", "b1", "connect_failed")] == 0


def test_a_silent_backend_fails_an_upgrade_and_counts_against_it() -> None:
    """An upgrade's answer is part of reaching the backend (timeouts.backend_connect): silence there is
    the backend's failure, and the handshake goes to another one."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play.connected()
    play.fire()
    assert [f[:2] for f in play.failures] == [("b", "b1")]
    assert play.opened == ["b1", "b2"]


def test_a_plain_answer_has_timeouts_response_from_the_request_and_connect_has_backend_connect() -> None:
    play = Play(CONFIG.replace("backend_connect: 2s}", "backend_connect: 2s, response: 60s}"))
    play.client(get("/b/x"))
    assert play.timer == play.now + 2  # the connect: backend_connect
    play.connected(dt=1.5)
    assert play.timer == play.now + 60
    play.fire()
    assert play.answer()[0] == 502 and play.failures == []
    default = Play()
    default.client(get("/b/x"))
    default.connected(dt=1.5)
    assert default.timer == default.now + 2  # without `response`: as long as backend_connect
    upgrading = Play(CONFIG.replace("backend_connect: 2s}", "backend_connect: 2s, response: 60s}"))
    upgrading.client(upgrade("/b/ws"))
    upgrading.connected(dt=1.5)
    assert upgrading.timer == upgrading.now - 1.5 + 2  # an upgrade's answer: within backend_connect of the connect


def test_refused_connect_tries_the_next_backend_then_502() -> None:
    play = Play()
    play.client(post("/b/x", b"abc"))
    play.backend_failed()
    assert len(play.opened) == 2
    play.backend_failed()
    assert play.answer()[0] == 502
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}
    assert len(play.failures) == 2


def test_why_a_request_failed_carries_its_request_id_pool_and_backend_as_json_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In `logging.format: json` the 502's access line names no backend; the warning that does is found by
    its `request_id` field, as the access line is (it was only inside its message)."""
    play = Play()
    with caplog.at_level(logging.WARNING, logger="lb.proxy"):
        play.client(post("/b/x", b"abc"))
        play.backend_failed()
        play.backend_failed()
    status, headers, _ = play.answer()
    assert status == 502
    lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records if "failed request" in
             record.getMessage()]
    assert len(lines) == 2
    assert {line["backend"] for line in lines} == {"b1", "b2"}
    assert all(line["request_id"] == headers["x-request-id"] and line["pool"] == "b" for line in lines), lines


def test_a_backend_that_starts_an_answer_and_closes_is_502_and_blamed() -> None:
    """Half an answer is the backend's fault whatever the request: passive health hears of it at once."""
    play = Play()
    play.client(post("/a/x", b"abc"))
    play.connected()
    play.backend(b"HTTP/1.1 2")
    play.backend_eof()
    assert play.answer()[0] == 502
    assert [f[:2] for f in play.failures] == [("a", "a1")]


@pytest.mark.parametrize("hang_up", ["eof", "reset"])
@pytest.mark.parametrize("request_bytes", [upgrade("/b/ws"), get("/b/x")], ids=["upgrade", "get"])
def test_a_request_every_backend_hangs_up_on_blames_none(hang_up: str, request_bytes: bytes) -> None:
    """Closing on a request without a word may be the request's doing (a gateway closes on one it will not
    take): when every backend tried does, the client gets 502 and no backend is counted a failure.  Counted,
    one such request was a failure for every gateway, and `fall` of them took the pool down."""
    play = Play()
    play.client(request_bytes)
    for _ in range(2):
        play.connected()
        if hang_up == "eof":
            play.backend_eof()
        else:
            play.backend_failed("connection reset by peer")
    assert play.answer()[0] == 502 and play.opened == ["b1", "b2"]
    assert play.failures == []
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}


def test_a_request_every_backend_hangs_up_on_is_tried_on_at_most_1_plus_retries() -> None:
    """Hang-ups count against `retries` as waits do: a request every gateway closes on costs 1 + retries
    backend connections, not one to each gateway of the pool (unblamed, it would go on for ever)."""
    play = Play(SIX_BACKENDS.replace("RETRIES", "1"))
    play.client(upgrade("/b/ws"))
    while play.closed_client is None:
        play.connected()
        play.backend_eof()
    assert play.answer()[0] == 502 and play.failures == [] and len(play.opened) == 2


def test_a_backend_that_hung_up_is_blamed_once_another_answers_the_same_request() -> None:
    """Another backend answering the request shows the request was not the cause: the one that hung up is
    counted then, and the one that answered starts afresh."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play.connected()
    play.backend_eof()
    play.connected()
    assert play.failures == []
    play.backend(SWITCH)
    assert play.answer()[0] == 101
    assert play.failures == [("b", "b1", "closed the connection before answering")]


def test_slow_upload_is_the_clients_time_not_the_backends() -> None:
    play = Play()
    play.client(post("/a/up", b"0123456789")[:-8])  # head and 2 bytes of 10
    play.connected()
    for _ in range(5):  # a byte every 4s: over backend_connect (2s), under handshake (5s)
        play.now += 4.0
        while play.timer is not None and play.timer <= play.now:
            play._apply(play.conn.deadline(play.timer))
        play.client(b"x")
    assert play.closed_client is None and play.failures == []
    play.now += 6.0
    play.fire()
    if play.timer is not None:
        play.fire()
    assert play.answer()[0] == 408
    assert play.failures == []  # passive health never hears of it
    assert play.connections()["a1"] == 0


def test_completed_upload_gives_the_backend_its_full_deadline() -> None:
    play = Play()
    play.client(post("/a/up", b"01234")[:-3])
    play.connected()
    play.client(b"234", dt=3.0)
    assert play.timer == play.now + 2
    play.backend(ok())
    assert play.answer()[0] == 200


def test_truncated_answer_body_closes_the_client() -> None:
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    play.backend_eof()
    assert play.closed_client is not None and bytes(play.to_client).endswith(b"abc")


@pytest.mark.parametrize(
    ("head", "body", "end", "kind"),
    [
        (b"Content-Length: 10", b"abc", "eof", "reset"),
        (b"Transfer-Encoding: chunked", b"5\r\nab", "eof", "reset"),
        (b"Content-Length: 10", b"abc", "reset", "reset"),
        (b"Connection: close", b"abc", "reset", "reset"),  # a body that ends at close, cut by a reset
        (b"Transfer-Encoding: chunked", b"zz\r\nabc", None, "bad_answer"),
        (b"Transfer-Encoding: chunked", b"ffffffffffffffffffff\r\n", None, "bad_answer"),
    ],
    ids=["length-eof", "chunked-eof", "length-reset", "close-reset", "bad-hex", "huge-chunk"],
)
def test_an_answer_failed_in_its_body_is_counted_against_the_backend(
    head: bytes, body: bytes, end: str | None, kind: str
) -> None:
    """A backend that closes, resets or breaks the chunked framing in an answer's body is in
    lb_backend_errors_total, as one silent there is; passive health does not hear of it."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body)
    if end == "eof":
        play.backend_eof()
    elif end == "reset":
        play.backend_failed("connection lost: [Errno 104] Connection reset by peer")
    assert play.closed_client is not None and play.connections()["a1"] == 0
    assert dict(play.ctx.observations.backend_errors) == {("a", "a1", kind): 1}
    assert play.failures == []


# -- shutdown ---------------------------------------------------------------------------------------


def test_shutdown_answers_503_to_what_has_not_reached_a_backend() -> None:
    partial = Play()
    partial.client(b"GET /a HTTP/1.1\r\nHo")
    partial.shutdown()
    status, headers, _ = partial.answer()
    assert status == 503 and headers["retry-after"]

    connecting = Play()
    connecting.client(get("/a/x"))
    connecting.shutdown()
    assert connecting.answer()[0] == 503
    assert CloseBackend() in connecting.actions and connecting.connections()["a1"] == 0

    # Idle between two requests: closed, nothing is lost.
    idle = Play()
    idle.client(get("/a/1"))
    idle.connected()
    idle.backend(ok())
    idle.answer()
    idle.shutdown()
    assert idle.closed_client == CloseClient()

    # Accepted as the stop began, its head still on its way: not closed with no word, but its 503 as
    # the head comes (a FIN and no answer before).
    fresh = Play()
    fresh.shutdown()
    assert fresh.closed_client is None and fresh.to_client == b""
    fresh.client(get("/a/x"))
    assert fresh.answer()[0] == 503 and fresh.opened == []
    # For a moment only: a silent one must not hold the stop for its whole handshake deadline.
    silent = Play()
    stop_at = silent.now
    silent.shutdown()
    assert silent.timer == stop_at + STOP_HEAD_WAIT
    silent.fire()
    assert silent.closed_client == CloseClient() and silent.to_client == b""


def test_under_tls_a_stop_cuts_a_connection_that_never_sent_a_request() -> None:
    """A stop, like the head timer, does not wait for the close_notify of a TLS client that sent
    nothing (the stop waits for every connection to go); after an answer it still closes gracefully."""
    silent = Play(tls=True)
    silent.shutdown()  # its head may be on its way: kept until it comes or the stop's bound
    silent.stop_bound()
    assert silent.closed_client == CloseClient(abort=True) and silent.to_client == b""
    timed_out = Play(tls=True)
    timed_out.shutdown()
    timed_out.fire()  # the head timer
    assert timed_out.closed_client == CloseClient(abort=True)

    answered = Play(tls=True)
    answered.client(get("/a/1"))
    answered.connected()
    answered.backend(ok())
    answered.shutdown()
    assert answered.closed_client == CloseClient(abort=False)


def test_shutdown_lets_a_request_at_a_backend_complete_then_closes() -> None:
    play = Play()
    play.client(get("/a/x") + get("/a/y"))
    play.connected()
    play.shutdown()
    assert play.to_client == b""
    play.backend(ok())
    assert play.answer()[0] == 200 and play.answer()[1]["connection"] == "close"
    assert play.closed_client == CloseClient() and play.opened == ["a1"]


@pytest.mark.parametrize("stage", ["waiting", "waiting-after-100"])
def test_the_stop_bound_answers_503_to_a_request_still_waiting(stage: str, caplog: pytest.LogCaptureFixture) -> None:
    """At the end of a stop's bound a request still waiting for its answer gets the 503 (with
    Retry-After) that its access line says it got, not a bare close; its backend connection goes."""
    play = Play()
    play.client(post("/a/x", b"hi", "Expect: 100-continue\r\n") if stage == "waiting-after-100" else get("/a/x"))
    play.connected()
    if stage == "waiting-after-100":
        play.backend(b"HTTP/1.1 100 Continue\r\n\r\n")
        play.to_client.clear()
    play.shutdown()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.stop_bound()
    status, headers, _ = play.answer()
    assert status == 503 and headers.get("retry-after")
    assert play.closed_client == CloseClient(abort=False) and play.connections()["a1"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "status=503" in lines[0] and "reason=balancer_is_shutting_down" in lines[0]


def test_the_stop_bound_cuts_an_answer_still_streaming() -> None:
    """Its head is out: nothing can be answered any more, so the connection is cut (and its backend's)."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    play.shutdown()
    play.stop_bound()
    assert play.closed_client == CloseClient(abort=True) and play.connections()["a1"] == 0


def test_a_handshake_whose_backend_fails_after_sigterm_gets_503_not_another_backend() -> None:
    """A stop answers 503 to what has not reached a backend (SPEC); a failed one is not tried elsewhere,
    where the stop's bound could cut it between two attempts."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play.connected()
    play.shutdown()  # at its backend: it may complete
    play.backend_eof()
    status, headers, _ = play.answer()
    assert status == 503 and headers.get("retry-after") and play.opened == ["b1"]


SIX_BACKENDS = CONFIG.replace(
    """backends: [{id: b1, address: "127.0.0.1:7002"}, {id: b2, address: "127.0.0.1:7003"}]""",
    "backends: [" + ", ".join(f'{{id: b{n}, address: "127.0.0.1:{7001 + n}"}}' for n in range(1, 7)) + "]"
    + "\n    retries: RETRIES",
)


@pytest.mark.parametrize(("retries", "tried"), [(3, 4), (0, 1), (10, 6)])
def test_a_handshake_waits_out_at_most_1_plus_retries_silent_backends(retries: int, tried: int) -> None:
    """HAProxy's `retries`: a pool of wedged gateways answers 502 after (1 + retries) waits, not one
    timeouts.backend_connect per gateway (with 20 of them, a minute)."""
    play = Play(SIX_BACKENDS.replace("RETRIES", str(retries)))
    play.client(upgrade("/b/ws"))
    while play.closed_client is None:
        play.connected()
        play.fire()  # silent: timeouts.backend_connect
    assert len(play.opened) == tried and len(set(play.opened)) == tried
    assert play.answer()[0] == 502 and len(play.failures) == tried


def test_refusals_cost_no_wait_and_go_on_through_the_pool() -> None:
    """SPEC: a backend that cannot be reached, another is tried; a refusal costs a round trip, so only
    waits count against `retries` (with `retries: 0`, four refusals and then the fifth answers)."""
    play = Play(SIX_BACKENDS.replace("RETRIES", "0"))
    play.client(upgrade("/b/ws"))
    for _ in range(4):
        play.backend_failed()
    play.connected()
    play.backend(SWITCH)
    assert len(play.opened) == 5 and play.answer()[0] == 101


GRACE_CONFIG = SIX_BACKENDS.replace("RETRIES", "3").replace(
    "affinity: {mode: insert, cookie: LB,", "affinity: {mode: insert, cookie: LB, redispatch_grace: 30s,"
)


def _pinned_cookie() -> tuple[str, str]:
    """A client's first handshake on pool b: its cookie pair and the backend it pins."""
    first = Play(GRACE_CONFIG)
    first.client(upgrade("/b/ws"))
    first.connected()
    first.backend(SWITCH)
    return first.answer()[1]["set-cookie"].partition(";")[0], first.opened[0]


@pytest.mark.parametrize("refusals", [0, 1, 2])
@pytest.mark.parametrize("why", ["down within redispatch_grace", "full"])
def test_a_kept_pin_stays_kept_when_the_stand_in_refuses(why: str, refusals: int) -> None:
    """A pinned client served by a stand-in keeps its cookie (its backend is briefly down, or full), and so it
    does when that stand-in refuses and another serves it: the retry decided afresh and issued a cookie."""
    cookie, pinned = _pinned_cookie()
    play = Play(GRACE_CONFIG, now=T0 + 5)
    pool = play.ctx.pools["b"]
    if why == "full":
        backend = pool.backends[pinned]
        backend.config = dataclasses.replace(backend.config, max_connections=1)
        backend.connections = 1
    else:
        for _ in range(pool.config.health_check.fall):
            pool.record_probe(pinned, False, T0 + 1, "refused")
    play.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: {cookie}\r\n\r\n".encode()))
    for _ in range(refusals):
        play.backend_failed()  # a stand-in refuses
    play.connected()
    play.backend(SWITCH)
    status, headers, _ = play.answer()
    assert status == 101 and len(play.opened) == 1 + refusals and pinned not in play.opened
    assert "set-cookie" not in headers, headers


def test_a_final_answer_starts_the_backends_failed_handshakes_afresh() -> None:
    """Passive health counts failed handshakes in a row: an answer from the backend ends the row."""
    for answer in (SWITCH, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"):
        play = Play()
        backend = play.ctx.pools["a"].backends["a1"]
        backend.handshake_failures = 1
        play.client(upgrade())
        play.connected()
        play.backend(answer)
        assert backend.handshake_failures == 0


def test_half_closed_client_still_gets_its_answer() -> None:
    """A client that sends its request and then shuts down its side (nc, HTTP/1.0 tools) is answered."""
    play = Play()
    play.client(get("/a/x"))
    play._apply(play.conn.client_eof(play.now))
    assert play.closed_client is None
    play.connected()
    play.backend(ok())
    assert play.answer()[0] == 200 and play.answer()[1]["connection"] == "close"
    assert play.closed_client == CloseClient() and play.connections()["a1"] == 0


def _answers(to_client: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, Connection value) of each answer in what the client received (ok() bodies)."""
    found = []
    for head in to_client.split(b"HTTP/1.1 ")[1:]:
        lines = head.split(b"\r\n")
        connection = next((line.split(b": ", 1)[1] for line in lines if line.lower().startswith(b"connection:")), b"")
        found.append((lines[0], connection))
    return found


@pytest.mark.parametrize("eof_at", ["with the requests", "while waiting", "while relaying"])
def test_half_closed_client_gets_every_request_it_pipelined_answered(eof_at: str) -> None:
    """`printf 'GET…GET…GET…' | nc -N`: each request already sent is routed and answered, in order,
    then the connection closes (HAProxy and nginx do the same); only the last says Connection: close."""
    play = Play()
    play.client(get("/a/1") + get("/b/2") + get("/a/3"))
    if eof_at == "with the requests":
        play._apply(play.conn.client_eof(play.now))
    play.connected()
    if eof_at == "while waiting":
        play._apply(play.conn.client_eof(play.now))
    if eof_at == "while relaying":
        play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh")
        play._apply(play.conn.client_eof(play.now))
        play.backend(b"i")
    else:
        play.backend(ok())
    for _ in range(2):
        assert play.closed_client is None
        play.connected()
        play.backend(ok())
    assert play.opened == ["a1", "b1", "a1"]
    assert [head.partition(b" HTTP")[0] for head in play.to_backend] == [b"GET /a/1", b"GET /b/2", b"GET /a/3"]
    assert [connection for _, connection in _answers(bytes(play.to_client))] == [b"", b"", b"close"]
    assert play.closed_client == CloseClient() and play.connections() == {"a1": 0, "b1": 0, "b2": 0}


def test_half_closed_client_a_partial_request_behind_its_answers_is_dropped() -> None:
    """What follows the last whole request is no request: it never reaches a backend, and we close."""
    play = Play()
    play.client(get("/a/1") + b"GET /b/2 HTTP/1.1\r\nHost:")
    play._apply(play.conn.client_eof(play.now))
    play.connected()
    play.backend(ok())
    assert play.opened == ["a1"] and len(play.to_backend) == 1
    assert _answers(bytes(play.to_client)) == [(b"200 OK", b"close")]  # it says so (RFC 9112 §9.6)
    assert play.closed_client == CloseClient() and play.connections()["a1"] == 0


def test_half_closed_client_an_upgrade_pipelined_behind_an_answer_opens_no_tunnel() -> None:
    """A tunnel to a client that has said its last could carry nothing to the backend: the upgrade is
    dropped, as one whose client half-closes before its 101 is, and no backend is opened for it."""
    play = Play()
    play.client(get("/a/1") + upgrade("/b/ws"))
    play._apply(play.conn.client_eof(play.now))
    play.connected()
    play.backend(ok())
    assert play.opened == ["a1"]
    assert play.closed_client == CloseClient() and play.connections() == {"a1": 0, "b1": 0, "b2": 0}


CHUNKED_POST = b"POST /a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("request_bytes", [
    pytest.param(post("/a/x", b"hello"), id="content-length"),
    pytest.param(CHUNKED_POST + b"5\r\nhello\r\n0\r\n\r\n", id="chunked"),
])
def test_half_closed_client_with_a_whole_body_still_gets_its_answer(request_bytes: bytes) -> None:
    """The body is held until the backend connects; a half-close before that must not lose the request."""
    play = Play()
    play.client(request_bytes)
    play._apply(play.conn.client_eof(play.now))
    assert play.closed_client is None
    play.connected()
    assert play.to_backend[0].endswith(b"hello") or play.to_backend[0].endswith(b"0\r\n\r\n")
    play.backend(ok())
    assert play.answer()[0] == 200 and play.answer()[1]["connection"] == "close"
    assert play.closed_client == CloseClient() and play.connections()["a1"] == 0


@pytest.mark.parametrize("connected_first", [False, True], ids=["connecting", "waiting"])
def test_half_close_before_the_end_of_the_body_is_a_400(connected_first: bool) -> None:
    """The rest of the body can never come: the client hears why, and the backend is not blamed."""
    play = Play()
    play.client(post("/a/x", b"hello")[:-2])
    if connected_first:
        play.connected()
    play._apply(play.conn.client_eof(play.now))
    if not connected_first:
        play.connected()
    assert play.answer()[0] == 400 and b"request id" in play.answer()[2]
    assert play.closed_client == CloseClient() and play.connections()["a1"] == 0 and play.failures == []


def test_a_body_cut_short_while_connecting_never_reaches_the_backend() -> None:
    """A half-close during the connect leaves the body incomplete: the backend gets nothing to act on."""
    play = Play()
    play.client(post("/a/x", b"x" * 100)[:-60])
    play._apply(play.conn.client_eof(play.now))
    play.connected()
    assert play.answer()[0] == 400 and play.to_backend == [b""]


@pytest.mark.parametrize("idle", ["", ", idle: 1s"], ids=["idle-off", "idle-is-for-tunnels"])
def test_an_answers_body_has_timeouts_response_between_its_bytes(idle: str) -> None:
    """A quiet spell, as HAProxy's `timeout server`: an answer still sending every 2 s lives past 3 s from its
    head; one that stops mid-body is cut (it cannot pass for complete) and counted, with no health verdict."""
    play = Play(CONFIG.replace("backend_connect: 2s", f"backend_connect: 2s, response: 3s{idle}"))
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert play.timer == T0 + 3
    for last_byte in (T0 + 2, T0 + 4):
        play.now = last_byte
        play.backend(b"x")
        play.fire()  # set for 3 s after the previous bytes: moved on to 3 s after these
        assert play.closed_client is None and play.timer == last_byte + 3
    play.fire()  # quiet for 3 s since the last byte
    assert play.closed_client is not None and play.closed_client.abort and play.conn.state == CLOSED
    assert play.ctx.observations.backend_errors[("a", "a1", "timeout")] == 1
    assert play.failures == [] and play.connections()["a1"] == 0


@pytest.mark.parametrize("refused", [False, True], ids=["plain", "refused-upgrade"])
def test_without_timeouts_response_a_body_may_be_quiet_for_a_minute(refused: bool) -> None:
    """Server-sent events and long polls send a heartbeat every 15-30 s: not backend_connect's 3 s."""
    play = Play()
    play.client(upgrade() if refused else get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nno" if refused
                 else b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
    assert play.timer == T0 + 60
    play.fire()
    assert play.closed_client is not None and play.closed_client.abort


def test_a_full_client_is_never_cut_for_the_backend_it_is_not_read_for() -> None:
    """While the client's buffer is full the backend is not read: its silence is not its fault, and a slow
    reader (a big download on a poor link) that drains its buffer now and then is not cut either.
    Reading again hands the wait back."""
    play = Play(CONFIG.replace("backend_connect: 2s", "backend_connect: 2s, response: 3s"))
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    play._apply(play.conn.client_blocked(True, play.now + 1))
    play.fire()  # at 3 s: the backend's silence is not judged while the client is full
    assert play.closed_client is None and play.timer == T0 + 1 + 3  # the client's own bound
    play.now = T0 + 3.5
    play._apply(play.conn.client_blocked(False, play.now))  # it read: the backend's time again, whole
    assert play.timer == T0 + 3.5 + 3
    play.backend(b"cde")
    assert play.conn.state == HEAD and play.ctx.observations.backend_errors[("a", "a1", "timeout")] == 0


def test_a_client_that_takes_nothing_of_its_answer_for_the_body_bound_is_cut() -> None:
    """nginx's send_timeout: a client that reads nothing at all held its connection and a backend's for
    good; after as long as a backend may stay silent mid-body (timeouts.response, here 3 s) it is cut,
    and the backend is not blamed."""
    play = Play(CONFIG.replace("backend_connect: 2s", "backend_connect: 2s, response: 3s"))
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\nab")
    play._apply(play.conn.client_blocked(True, play.now + 1))
    play.fire()
    play.fire()
    assert play.now == T0 + 1 + 3 and play.closed_client == CloseClient(abort=True)
    assert play.connections()["a1"] == 0 and play.ctx.observations.backend_errors[("a", "a1", "timeout")] == 0


def test_an_upload_that_stalls_after_the_answer_began_is_closed_on_time() -> None:
    """A backend that answers early (a streaming echo) does not lift the client's quiet-spell deadline."""
    play = Play()
    play.client(post("/a/x", b"x" * 100)[:-95])
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    assert play.conn.state == RELAY and play.timer == T0 + 5  # timeouts.handshake after the last byte
    play.client(b"x" * 10, dt=4)
    play.fire()  # at T0 + 5 the client is 1 s quiet: not yet
    assert play.closed_client is None and play.timer == T0 + 9
    play.fire()
    assert play.closed_client == CloseClient(abort=True) and play.connections()["a1"] == 0
    assert play.failures == []


def test_an_upload_finished_while_the_answer_is_relayed_hands_the_deadline_to_the_backend() -> None:
    play = Play()
    play.client(post("/a/x", b"12345")[:-3])
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
    assert play.timer == T0 + 5  # the upload's quiet spell: timeouts.handshake
    play.client(b"345", dt=1)
    assert play.timer == T0 + 1 + 60  # now the body's quiet spell: timeouts.answer_body
    play.backend(b"ially")
    assert play.answer()[2] == b"partially" and play.connections()["a1"] == 0


def test_a_malformed_chunk_after_the_answer_began_aborts_instead_of_a_second_answer() -> None:
    play = Play()
    play.client(CHUNKED_POST + b"5\r\nhello\r\n")
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    play.client(b"zz\r\n")
    assert play.to_client.count(b"HTTP/1.1") == 1 and b"400" not in play.to_client
    assert play.closed_client == CloseClient(abort=True) and play.connections()["a1"] == 0


def test_an_upgrade_with_a_body_is_400_without_reaching_a_backend() -> None:
    """A gateway library (websockets) hangs up on a handshake's body, which passive health counted
    against it (s40c F03): refused before any backend, as no WebSocket client sends one."""
    play = Play()
    play.client(upgrade("/b/ws")[:-2] + b"Content-Length: 5\r\n\r\nhello")
    assert play.opened == [] and play.answer()[0] == 400


def test_a_request_whose_body_went_out_is_not_retried() -> None:
    """A retry would send the next backend the head without the body it announces."""
    play = Play()
    play.client(post("/a/x", b"hello"))
    play.connected()
    play.backend_eof()
    assert len(play.opened) == 1 and play.answer()[0] == 502


@pytest.mark.parametrize(("request_bytes", "retried"), [
    pytest.param(get("/b/x"), True, id="GET"),
    pytest.param(b"HEAD /b/x HTTP/1.1\r\nHost: h\r\n\r\n", True, id="HEAD"),
    pytest.param(b"OPTIONS /b/x HTTP/1.1\r\nHost: h\r\n\r\n", True, id="OPTIONS"),
    pytest.param(upgrade("/b/ws"), True, id="upgrade"),
    pytest.param(post("/b/x", b""), False, id="POST-no-body"),
    pytest.param(b"DELETE /b/x HTTP/1.1\r\nHost: h\r\n\r\n", False, id="DELETE"),
    pytest.param(post("/b/x", b"hello"), False, id="POST-body"),
    pytest.param(get("/b/x", "Content-Length: 5\r\n") + b"hello", False, id="GET-body"),
])
def test_only_a_bodiless_get_head_options_or_upgrade_is_retried_once_it_reached_a_backend(
    request_bytes: bytes, retried: bool
) -> None:
    """A backend that took the request and answered garbage: another backend gets only what a retry cannot
    repeat harmfully or send short (it sends the head again, never the body); the rest get their 502."""
    play = Play()
    play.client(request_bytes)
    play.connected()
    play.backend(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert play.opened == (["b1", "b2"] if retried else ["b1"])
    assert (play.closed_client is None) == retried and play.failures[0][:2] == ("b", "b1")
    if not retried:
        assert play.answer()[0] == 502


@pytest.mark.parametrize(("then", "cause"), [
    ("eof", "closed the connection before answering"),
    ("reflected", "malformed answer"),
    ("too-many", "too many interim answers"),
])
def test_a_backend_whose_interim_answer_reached_the_client_is_not_replaced_and_is_blamed_at_once(
    then: str, cause: str
) -> None:
    """After a 1xx reached the client, a failure is this backend's alone (it answered, so no hang-up or
    reflected head on trial) and the request's 502: no other backend's answer follows its interim ones."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play.backend(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    if then == "eof":
        play.backend_eof()
    elif then == "reflected":
        play.backend(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=a\x01b\r\nContent-Length: 0\r\n\r\n")
    else:
        for _ in range(MAX_INTERIM):
            play.backend(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    assert play.opened == ["b1"] and b"502 Bad Gateway" in play.to_client
    assert len(play.failures) == 1 and play.failures[0][:2] == ("b", "b1") and cause in play.failures[0][2]
    assert play.to_client.count(b" 103 ") == MAX_INTERIM if then == "too-many" else 1


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize(("then", "at_once"), [
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True, id="not-http"),
    pytest.param(EARLY_HINTS * MAX_INTERIM, True, id="too-many"),
    pytest.param(b"HTTP/1.1 000 Zero\r\n\r\n", False, id="malformed-head"),
    pytest.param(REFLECTED[0].values[0], False, id="reflected-head"),
])
def test_a_get_whose_interim_answer_came_in_the_read_that_failed_goes_to_another_backend(
    then: bytes, at_once: bool
) -> None:
    """A 1xx read together with its backend's failure is dropped unsent: nothing of that backend reached the
    client, so an idempotent request is retried (it was held to its 502), and the failure is judged as
    without the 1xx: an HTTP head that cannot pass is on trial until another backend answers, or a request
    every gateway answers so would count a failure against each."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play.backend(EARLY_HINTS + then)
    assert play.opened == ["b1", "b2"] and play.to_client == b"" and play.closed_client is None
    assert [failure[:2] for failure in play.failures] == ([("b", "b1")] if at_once else [])
    play.connected()
    play.backend(EARLY_HINTS + ok())
    assert play.answer()[0] == 103 and play.to_client.count(b" 103 ") == 1
    assert b"HTTP/1.1 200 OK\r\n" in play.to_client and play.to_client.endswith(b"\r\n\r\nhi")
    assert [failure[:2] for failure in play.failures] == [("b", "b1")]


def test_a_post_whose_interim_answer_came_in_the_read_that_failed_gets_its_502_without_it() -> None:
    """Not idempotent: its 502, as without the 1xx, and the 1xx never went out."""
    play = Play()
    play.client(post("/b/x", b"data"))
    play.connected()
    play.backend(EARLY_HINTS + b"HTTP/1.1 000 Zero\r\n\r\n")
    assert play.opened == ["b1"] and play.answer()[0] == 502 and b" 103 " not in play.to_client


@pytest.mark.parametrize("then", ["eof", "reset"])
def test_the_502_after_a_relayed_interim_answer_does_not_say_no_backend_was_reached(
    then: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend answered (its 103 reached the client), then closed: the access line said
    `no_backend_could_be_reached`, as for a refused connect, where the operator must look at that backend."""
    play = Play()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.client(get("/b/x"))
        play.connected()
        play.backend(b"HTTP/1.1 103 Early Hints\r\n\r\n")
        if then == "eof":
            play.backend_eof()
        else:
            play.backend_failed("connection reset by peer")
    assert play.opened == ["b1"] and b"502 Bad Gateway" in play.to_client
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "reason=the_backend_closed_after_its_interim_answer" in lines[0], lines


def test_an_http10_clients_request_goes_on_after_an_interim_answer_it_never_got() -> None:
    """An HTTP/1.0 client is sent no 1xx: nothing of the failed backend's reached it, so a GET is retried."""
    play = Play()
    play.client(b"GET /b/x HTTP/1.0\r\nHost: h\r\n\r\n")
    play.connected()
    play.backend(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    play.backend_eof()
    assert play.opened == ["b1", "b2"] and play.to_client == b""


def test_one_empty_line_before_a_request_is_ignored() -> None:
    """RFC 9112 §2.2: the stray CRLF some clients send after a body does not make the next request a 400."""
    play = Play()
    play.client(post("/a/x", b"hi") + b"\r\n" + get("/a/y"))
    play.connected()
    play.backend(ok())
    play.connected()
    assert play.opened == ["a1", "a1"] and play.to_backend[1].startswith(b"GET /a/y HTTP/1.1\r\n")


def test_a_pipelined_head_larger_than_the_hold_limit_still_arrives() -> None:
    """max_header_bytes may exceed HELD_LIMIT: back in HEAD, reading resumes for the rest of the head."""
    play = Play(CONFIG.replace("max_header_bytes: 4096", "max_header_bytes: 200000"))
    big = b"GET /a/b HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 100_000 + b"\r\n\r\n"
    play.client(get("/a/a"))
    play.connected()
    play.client(big[:HELD_LIMIT + 1000])
    assert play.paused
    play.backend(ok())
    assert not play.paused and play.conn.state == HEAD
    play.client(big[HELD_LIMIT + 1000:])
    play.connected()
    assert play.opened == ["a1", "a1"] and play.to_backend[1].startswith(b"GET /a/b ")


def test_a_backend_that_does_not_read_the_upload_is_blamed_not_the_client() -> None:
    """The client is paused because the backend's buffer is full: its silence is the backend's fault."""
    play = Play()
    play.client(post("/a/x", b"x" * 100)[:-50])
    play.connected()
    play.client(b"x" * 10, dt=1)
    play._apply(play.conn.backend_blocked(True, play.now))  # the write of those bytes filled it
    assert play.timer == T0 + 1 + 2  # backend_connect, not the client's quiet spell (T0 + 5)
    play._apply(play.conn.deadline(T0 + 2.5))  # early: armed again, nobody blamed yet
    assert play.timer == T0 + 3 and play.closed_client is None and play.failures == []
    play.fire()
    assert play.answer()[0] == 502 and b"408" not in play.to_client
    assert play.failures and "stopped reading the request body" in play.failures[0][2]


def test_a_backend_that_stopped_reading_one_request_is_not_blamed_for_the_next() -> None:
    """The full buffer belongs to the backend connection: dropped with it, not carried to the next request."""
    play = Play()
    play.client(post("/a/x", b"x" * 10)[:-5])
    play.connected()
    play._apply(play.conn.backend_blocked(True, play.now))
    play.client(b"x" * 5)
    play.backend(ok())  # answered: the connection goes, the client's connection stays
    play.client(post("/a/y", b"y" * 10)[:-5], dt=1)
    play.connected()
    play.fire()
    assert play.answer()[0] == 200 and b"408 Request Timeout" in play.to_client and play.failures == []


def test_a_backend_that_reads_again_gives_the_client_a_whole_quiet_spell() -> None:
    play = Play()
    play.client(post("/a/x", b"x" * 100)[:-50])
    play.connected()
    play._apply(play.conn.backend_blocked(True, play.now))
    play.now += 1.5
    play._apply(play.conn.backend_blocked(False, play.now))
    play.fire()  # T0 + 5: the client has been able to send for 3.5 s only
    assert play.closed_client is None and play.timer == T0 + 6.5
    play.fire()
    assert play.answer()[0] == 408 and play.failures == []


def test_a_client_that_does_not_read_does_not_get_its_backend_blamed() -> None:
    """While the client's buffer is full the backend is not read: its answer may be waiting unread."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play._apply(play.conn.client_blocked(True, play.now))
    play.fire()  # backend_connect (T0 + 2): not the backend's time
    assert play.closed_client is None and play.failures == [] and play.timer == T0 + 5
    play.now += 2
    play._apply(play.conn.client_blocked(False, play.now))
    assert play.timer == T0 + 4 + 2  # unblocked at T0 + 4: the backend gets its whole backend_connect
    play.backend(ok())
    assert play.answer()[0] == 200 and play.failures == []


def test_a_client_that_never_reads_is_closed_without_blaming_the_backend(caplog: pytest.LogCaptureFixture) -> None:
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play._apply(play.conn.client_blocked(True, play.now))
    play.fire()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.fire()  # timeouts.handshake after it stopped reading
    assert play.closed_client == CloseClient(abort=True) and play.failures == []
    assert play.connections()["a1"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "status=408" in lines[0] and "reason=client_not_reading" in lines[0]


@pytest.mark.parametrize("routed", [True, False], ids=["forwarded", "refused"])
def test_the_access_line_of_options_asterisk_names_the_asterisk(routed: bool, caplog: pytest.LogCaptureFixture) -> None:
    """`OPTIONS *` (asterisk-form, routed as `/`) is logged with `path=*`, as its request line says, not `/`."""
    play = Play(CONFIG.replace("  - {path_prefix: /a, pool: a}", "  - {path_prefix: /, pool: a}") if routed else CONFIG)
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.client(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
        if routed:
            play.connected()
            assert play.to_backend[0].startswith(b"OPTIONS * HTTP/1.1\r\n")
            play.backend(ok())
    assert play.answer()[0] == (200 if routed else 404)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert " method=OPTIONS path=* " in line, line


def test_headers_dropped_as_aliases_of_ours_are_named_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """The backend never sees `X_Forwarded_For` (it would read it as ours): whoever looks for it finds why."""
    play = Play()
    with caplog.at_level(logging.DEBUG, logger="lb.proxy"):
        play.client(get("/a/x", "X_Forwarded_For: 6.6.6.6\r\nX_LB_Affinity: forged\r\n"))
    play.connected()
    assert b"6.6.6.6" not in play.to_backend[0] and b"forged" not in play.to_backend[0]
    (line,) = [r.getMessage() for r in caplog.records if "spelt like ours" in r.getMessage()]
    assert "dropped 2 header(s)" in line and "X_Forwarded_For, X_LB_Affinity" in line
    assert f"(request {play.conn.request_id})" in line


def test_a_client_still_connecting_gets_no_excuse_for_a_backend_that_does_not_connect() -> None:
    """Nothing is read from a backend that is still connecting: a full client buffer changes nothing."""
    play = Play()
    play.client(get("/b/x"))
    play._apply(play.conn.client_blocked(True, play.now))
    play.fire()
    assert play.failures and len(play.opened) == 2


@pytest.mark.parametrize("stage", ["connecting", "waiting", "relaying"])
def test_client_eof_mid_request_releases_the_backend(stage: str) -> None:
    """A client that goes away mid-handshake must not leave its backend counted (least_conn would shun it)."""
    play = Play()
    play.client(upgrade() if stage != "relaying" else post("/a/x", b"1"))
    if stage != "connecting":
        play.connected()
    if stage == "relaying":
        play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    play._apply(play.conn.client_eof(play.now))
    play._apply(play.conn.client_lost())
    assert play.connections()["a1"] == 0
    assert play.conn.state == CLOSED or (stage == "relaying" and play.conn.state == RELAY)
    if play.conn.state == RELAY:
        play.backend(b"cde")
        assert play.closed_client is not None and play.connections()["a1"] == 0


def test_client_leaving_releases_the_backend() -> None:
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play._apply(play.conn.client_lost())
    assert CloseBackend() in play.actions and play.connections()["a1"] == 0


@pytest.mark.parametrize("how", ["lost", "eof"])
def test_a_request_its_client_abandoned_still_gets_an_access_line(how: str, caplog: pytest.LogCaptureFixture) -> None:
    """One line per request (SPEC): a client gone before the answer is logged as 499, as nginx does."""
    play = Play()
    play.client(upgrade())
    play.connected()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play._apply(play.conn.client_lost() if how == "lost" else play.conn.client_eof(play.now))
        play._apply(play.conn.client_lost())  # the shell's connection_lost always follows: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "status=499" in lines[0] and "reason=client_closed_request" in lines[0]
    assert "backend=a1" in lines[0] and f"request_id={play.conn.request_id}" in lines[0]


@pytest.mark.parametrize(("status", "reason"), [(500, "internal_error"), (503, "balancer_is_shutting_down")])
def test_a_connection_the_shell_drops_is_logged_with_its_cause(
    status: int, reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play._apply(play.conn.client_lost(status, reason))
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and f"status={status}" in lines[0] and f"reason={reason}" in lines[0]


# -- hostile input: whatever the bytes, the invariants hold ---------------------------------------


_REQUESTS = [get("/a/1"), get("/b/2"), upgrade(), get("/nowhere"), get("/a/x", "Connection: close\r\n"),
             b"GET /a/1 HTTP/1.0\r\n\r\n"]


@st.composite
def _near_requests(draw: st.DrawFn) -> bytes:
    """A bodiless request with one byte replaced, dropped or inserted, maybe cut short."""
    request = draw(st.sampled_from(_REQUESTS))
    at = draw(st.integers(0, len(request) - 1))
    byte = bytes([draw(st.sampled_from(b" \r\n:/\x00a") | st.integers(0, 255))])
    request = request[:at] + draw(st.sampled_from([b"", byte, byte + request[at : at + 1]])) + request[at + 1 :]
    return request[: draw(st.integers(0, len(request)))] if draw(st.booleans()) else request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Whole requests one chunk in two (two strategy objects: st.one_of keeps one of each).
    chunks=st.lists(st.one_of(st.binary(max_size=300), st.sampled_from(_REQUESTS), st.sampled_from(_REQUESTS),
                              _near_requests()), max_size=12),
    head=st.sampled_from([b"", upgrade(), get("/a/1")]),
    answer=st.booleans(),
)
def test_hostile_client_bytes_keep_the_invariants(chunks: list[bytes], head: bytes, answer: bool) -> None:
    """Random bytes, whole requests and requests one byte off, in any order, with a backend that
    answers each request (or never does): only whole heads reach a backend, the held bytes stay
    bounded, and no backend connection stays counted."""
    play = Play()
    play.client(head)
    if play.opened:
        play.connected()
    for chunk in chunks:
        play.client(chunk)
        while play.conn.state == CONNECTING or (answer and play.conn.state == WAITING):
            if play.conn.state == CONNECTING:
                play.connected()
            else:
                play.backend(ok())
        if play.conn.state == CLOSED:
            break
    # Only complete, parsed heads reach a backend, each one ending its head.
    for sent in play.to_backend:
        assert sent == b"" or sent.endswith(b"\r\n\r\n")
    assert len(play.conn._buf) <= HELD_LIMIT + 300 + 4096
    assert all(n >= 0 for n in play.connections().values())
    play._apply(play.conn.client_eof(play.now))
    play._apply(play.conn.client_lost())
    assert all(n == 0 for n in play.connections().values()), "a backend connection stayed counted"


_ANSWERS = [
    ok(), ok(b""), SWITCH, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"HTTP/1.0 404 Not Found\r\n\r\n",
]


@st.composite
def _near_answers(draw: st.DrawFn) -> list[bytes]:
    """An answer (or two), with one byte replaced, dropped or inserted, cut into reads anywhere."""
    answer = b"".join(draw(st.lists(st.sampled_from(_ANSWERS), min_size=1, max_size=2)))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(answer) - 1))
        byte = bytes([draw(st.sampled_from(b" \r\n:0\x00") | st.integers(0, 255))])
        answer = answer[:at] + draw(st.sampled_from([b"", byte, byte + answer[at : at + 1]])) + answer[at + 1 :]
    cuts = sorted(draw(st.lists(st.integers(0, len(answer)), max_size=4)))
    return [answer[a:b] for a, b in itertools.pairwise([0, *cuts, len(answer)])]


@settings(max_examples=150, deadline=None)
@given(
    answer=st.lists(st.binary(max_size=200), max_size=8) | _near_answers() | _near_answers(),
    request=st.sampled_from([post("/a/x", b"q"), upgrade()]),
)
def test_hostile_backend_bytes_never_give_a_500(answer: list[bytes], request: bytes) -> None:
    """Random bytes, and answers (a 101 among them) one byte off, however read: never a 500, and the
    backend connection is not left counted."""
    play = Play()
    play.client(request)
    play.connected()
    for chunk in answer:
        play.backend(chunk)
    play.backend_eof()
    if play.to_client:
        assert not play.to_client.startswith(b"HTTP/1.1 500")
    if play.conn.state != TUNNEL:
        play._apply(play.conn.client_lost())
        assert play.connections()["a1"] == 0, "a backend connection stayed counted"
    assert play.connections()["a1"] == 0 or play.conn.state != CLOSED
    assert play.conn.state in (CLOSED, HEAD, RELAY, TUNNEL) or play.to_client == b""


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for size in sizes:
        if i >= len(body):
            break
        piece = body[i : i + max(size, 1)]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        i += len(piece)
    if i < len(body):
        out += f"{len(body) - i:x}\r\n".encode() + body[i:] + b"\r\n"
    return out + b"0\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(
        st.tuples(st.binary(max_size=40), st.booleans(), st.lists(st.integers(1, 9), max_size=5)),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_pipelined_bodies_reach_their_own_backend_connection_exactly(
    bodies: list[tuple[bytes, bool, list[int]]], cuts: list[int]
) -> None:
    """However a pipeline of requests with bodies is split into reads, each backend connection gets
    exactly one head and that request's body bytes: nothing of the next request rides along."""
    wire, expected = b"", []
    for i, (body, chunked, sizes) in enumerate(bodies):
        if chunked:
            framed = _chunked(body, sizes)
            wire += f"POST /a/{i} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + framed
        else:
            framed = body
            wire += f"POST /a/{i} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode() + framed
        expected.append((f"/a/{i}".encode(), framed))
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    play = Play()

    def serve() -> None:
        while True:
            if play.conn.state == CONNECTING:
                play.connected()
            elif play.conn.state == WAITING and not play.conn._body_left:  # the request is complete
                play.backend(ok())
            else:
                return

    for start, end in itertools.pairwise(points):
        play.client(wire[start:end])
        serve()
    assert len(play.to_backend) == len(expected)
    for sent, (path, framed) in zip(play.to_backend, expected, strict=True):
        head, _, body = sent.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == path
        assert body == framed
    assert play.to_client.count(b"HTTP/1.1 200 OK") == len(expected)
    assert play.conn.state == HEAD and play.connections()["a1"] == 0


# -- rewrite mode: the backend's cookie carries the route ----------------------------------------

REWRITE_CONFIG = CONFIG.replace(
    "affinity: {mode: insert, cookie: LB,", "affinity: {mode: rewrite, cookie: SID, max_age: 100s,"
)
SWITCH_SETTING_SID = SWITCH[:-2] + b"Set-Cookie: SID=abc; Path=/; HttpOnly\r\n\r\n"


def _returning(cookie: str, now: float) -> Play:
    """A rewrite-mode handshake at `now` from a client that sends `Cookie: {cookie}`, its backend connected."""
    play = Play(REWRITE_CONFIG, now=now)
    play.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: {cookie}\r\n\r\n".encode()))
    play.connected()
    return play


def _rewrite_token(play: Play) -> str:
    cookie = play.answer()[1]["set-cookie"]
    assert cookie.startswith("SID=") and cookie.endswith("; Path=/; Max-Age=100; HttpOnly; SameSite=Lax"), cookie
    return cookie.partition(";")[0].partition("=")[2]


@pytest.mark.parametrize(("age", "refreshed"), [(10.0, False), (49.0, False), (50.0, False), (51.0, True),
                                                (99.0, True)])
def test_rewrite_mode_reissues_the_backends_value_past_half_the_tokens_life(age: float, refreshed: bool) -> None:
    """An active client keeps its backend and the session value it set, however long it plays."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)

    later = _returning(f"SID={token}", T0 + age)
    assert b"\r\nCookie: SID=abc\r\n" in later.to_backend[0], "the backend sees the value it set"
    later.backend(SWITCH)  # the backend sets nothing new
    assert later.opened == first.opened == ["a1"]
    if not refreshed:
        assert "set-cookie" not in later.answer()[1]
        return
    fresh = _rewrite_token(later)
    assert fresh != token
    claim = later.ctx.codec.open(fresh, T0 + age + 99)  # a full max_age from now: still opens
    assert (claim.backend_id, claim.app_value) == ("a1", "abc")


@pytest.mark.parametrize("why", ["disabled", "down", "migrating"])
def test_rewrite_mode_replaces_the_cookie_of_a_redispatched_client_whose_stand_in_sets_none(why: str) -> None:
    """SPEC: a token for a down or disabled backend is redispatched and the cookie replaced.  A stand-in that
    sets no cookie of its own (it saw none: the old session is not its) gets a pin with no session, so
    the client stays with it once the old backend is back, and the stand-in still sees no cookie."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade("/b/ws"))
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)
    old = first.opened[0]

    later = Play(REWRITE_CONFIG, now=T0 + 5)
    pool = later.ctx.pools["b"]
    if why == "disabled":
        pool.apply_admin(old, AdminAction.DISABLE, T0 + 1)
    elif why == "migrating":  # a drain closing its tunnels: its cookie holders go elsewhere now
        pool.backends[old].migrating = True
    else:
        for _ in range(pool.config.health_check.fall):
            pool.record_probe(old, False, T0 + 1, "refused")
    later.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: SID={token}\r\n\r\n".encode()))
    later.connected()
    assert b"Cookie:" not in later.to_backend[0], "the stand-in never sees the old backend's session"
    later.backend(SWITCH)  # and sets no cookie of its own
    (stand_in,) = later.opened
    assert stand_in != old
    fresh = _rewrite_token(later)
    claim = later.ctx.codec.open(fresh, T0 + 6)
    session = first.ctx.codec.open(token, T0).session
    assert (claim.backend_id, claim.app_value, claim.session) == (stand_in, None, session)

    back = Play(REWRITE_CONFIG, now=T0 + 10)  # the old backend is up and enabled again
    back.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: SID={fresh}\r\n\r\n".encode()))
    back.connected()
    assert back.opened == [stand_in] and b"Cookie:" not in back.to_backend[0]


def test_rewrite_mode_a_retry_past_a_healthy_pinned_backend_keeps_the_clients_session() -> None:
    """A pinned backend that refuses one connection and is still up keeps its client's session: the stand-in
    that served this handshake and set no cookie does not replace the cookie with a pin of no value."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade("/b/ws"))
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)
    later = Play(REWRITE_CONFIG, now=T0 + 5)
    later.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: SID={token}\r\n\r\n".encode()))
    later.backend_failed()  # the pinned backend refuses, once; it is still up
    later.connected()
    later.backend(SWITCH)
    assert later.opened[0] == first.opened[0] and len(later.opened) == 2
    assert "set-cookie" not in later.answer()[1]


def test_rewrite_mode_a_hang_up_on_the_pinned_backends_own_session_is_not_blamed() -> None:
    """A client replays a token whose session its gateway now drops without a word: the stand-in, which
    gets no session, answers, and that does not show the request was not the cause.  Blamed, `fall`
    replays of one stored cookie took the gateway down for everyone."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade("/b/ws"))
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)
    for i in range(3):
        play = Play(REWRITE_CONFIG, now=T0 + 5 + i)
        play.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: SID={token}\r\n\r\n".encode()))
        play.connected()
        assert b"Cookie: SID=abc" in play.to_backend[0]
        play.backend_eof()  # the pinned gateway will not take session abc
        play.connected()
        assert b"Cookie:" not in play.to_backend[1], "the stand-in got a different request"
        play.backend(SWITCH)
        assert play.answer()[0] == 101 and play.failures == []


def test_rewrite_mode_reissues_once_beside_a_backend_cookie_with_its_own_path() -> None:
    """Past half its life, a backend cookie set with `Path=/game` is re-issued with `Path=/` (its own
    path is not known then), and the browser keeps both, sending the older, more specific one first.
    The younger routes the next handshake, which then needs no re-issue."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH[:-2] + b"Set-Cookie: SID=abc; Path=/game; HttpOnly\r\n\r\n")
    old = bytes(first.to_client).split(b"Set-Cookie: SID=")[1].partition(b";")[0].decode()

    later = _returning(f"SID={old}", T0 + 60)
    later.backend(SWITCH)
    young = _rewrite_token(later)

    again = _returning(f"SID={old}; SID={young}", T0 + 61)
    assert b"\r\nCookie: SID=abc\r\n" in again.to_backend[0], "the backend sees the value it set, once"
    again.backend(SWITCH)
    assert again.opened == ["a1"] and "set-cookie" not in again.answer()[1]


@pytest.mark.parametrize(
    ("said", "copy_deleted"),
    [
        ("SID=; Max-Age=0", True),  # a logout at the browser's default path (/a for /a/ws): not the copy's
        ("SID=; Max-Age=0; Path=/game", True),
        ("SID=; Max-Age=0; Path=/; Domain=example.com", True),  # a domain cookie: not the host-only copy
        ("SID=new", True),  # a new login at the default path: the copy, re-issued later, would route the old
        ("SID=; Max-Age=0; Path=/game\r\nSet-Cookie: SID=anon; Path=/game", True),
        ("SID=; Max-Age=0; Path=/", False),  # the copy's own scope: the backend's line reaches it
        ("SID=new; Path=/", False),
    ],
    ids=["logout at default path", "logout at own path", "logout of domain", "login", "logout and login",
         "logout at root", "login at root"],
)
def test_what_the_backend_says_of_its_cookie_elsewhere_deletes_the_copy_a_reissue_left_first(
    said: str, copy_deleted: bool
) -> None:
    """A re-issue past half the token's life is host-only with `Path=/` (the backend's own scope is not
    known then), beside the backend's cookie at its own scope, and what the backend says of its cookie
    reaches only its own: after a logout the copy kept routing and gave the session back; after a new
    login the copy was re-issued in turn, became the youngest and routed the old session.  So the copy
    is deleted first, and the backend's own lines have the last word (a browser applies them in order)."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH[:-2] + b"Set-Cookie: SID=abc; HttpOnly\r\n\r\n")  # no Path: /a, where it was set
    assert len(_set_cookie_lines(first)) == 1  # a client that sent no cookie of ours holds no copy
    old = bytes(first.to_client).split(b"Set-Cookie: SID=")[1].partition(b";")[0].decode()
    later = _returning(f"SID={old}", T0 + 60)
    later.backend(SWITCH)
    young = _rewrite_token(later)  # the copy: Path=/

    answer = _returning(f"SID={old}; SID={young}", T0 + 61)
    answer.backend(SWITCH[:-2] + f"Set-Cookie: {said}\r\n\r\n".encode())
    lines = _set_cookie_lines(answer)
    copy = "SID=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
    assert (lines[0] == copy) is copy_deleted and lines.count(copy) == int(copy_deleted), lines
    own = lines[1:] if copy_deleted else lines
    assert len(own) == said.count("SID=")  # the backend's own lines follow, one each
    for line, wrote in zip(own, said.split("\r\nSet-Cookie: "), strict=True):
        assert line == wrote if "Max-Age=0" in wrote else line.startswith("SID=A"), (line, wrote)  # sealed


@pytest.mark.parametrize(
    "set_cookie", ["SID=; Max-Age=0; Path=/", "SID=" + "v" * 4000 + "; Path=/"], ids=["logout", "too-large"]
)
def test_rewrite_mode_never_reissues_over_what_the_backend_said_of_its_cookie(set_cookie: str) -> None:
    """Past half the token's life, a backend that deletes its cookie (a logout) or sets one too large to
    seal has the last word: sealing the old value again after its line would undo it in the browser."""
    first = Play(REWRITE_CONFIG)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)
    later = _returning(f"SID={token}", T0 + 60)
    later.backend(SWITCH[:-2] + f"Set-Cookie: {set_cookie}\r\n\r\n".encode())
    head = bytes(later.to_client).partition(b"\r\n\r\n")[0].decode()
    assert [line for line in head.split("\r\n") if line.startswith("Set-Cookie:")] == [f"Set-Cookie: {set_cookie}"]


@pytest.mark.parametrize(("mode", "backend_sets"), [("insert", False), ("rewrite", True), ("rewrite", False)])
def test_a_token_an_older_key_opens_is_reissued_under_the_first_key(mode: str, backend_sets: bool) -> None:
    """A key rotation (`[NEW, OLD]`): a returning client keeps its backend and is re-sealed under NEW, so
    dropping OLD later logs out only clients who did not come back.  In rewrite mode that waits for the
    backend to set its cookie: a re-issue of our own would not know its Path and Domain, and the browser
    would keep the old cookie beside the new one and be re-issued one on every visit."""
    old, new = "o" * 40, "n" * 40
    config = (REWRITE_CONFIG if mode == "rewrite" else CONFIG).replace(f'["{KEY}"]', f'["{old}"]')
    first = Play(config)
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH_SETTING_SID if mode == "rewrite" else SWITCH)
    cookie = first.answer()[1]["set-cookie"].partition(";")[0]

    rotated = config.replace(f'["{old}"]', f'["{new}", "{old}"]')
    later = Play(rotated, now=T0 + 10)  # far from half the token's life
    later.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: {cookie}\r\n\r\n".encode()))
    later.connected()
    later.backend(SWITCH_SETTING_SID if backend_sets else SWITCH)
    assert later.opened == first.opened == ["a1"]
    if mode == "rewrite" and not backend_sets:
        assert "set-cookie" not in later.answer()[1]
        return
    fresh = later.answer()[1]["set-cookie"].partition(";")[0]
    assert fresh.partition("=")[0] == cookie.partition("=")[0] and fresh != cookie
    claim = Play(rotated.replace(f', "{old}"]', "]")).ctx.codec.open(fresh.partition("=")[2], T0 + 20)
    assert claim.backend_id == "a1" and not claim.older_key
    assert claim.app_value == ("abc" if mode == "rewrite" else None)

    again = Play(rotated, now=T0 + 20)  # sealed under the first key now: no cookie on the next visit
    again.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: {fresh}\r\n\r\n".encode()))
    again.connected()
    again.backend(SWITCH)
    assert "set-cookie" not in again.answer()[1]


def _set_cookie_lines(play: Play) -> list[str]:
    head = bytes(play.to_client).partition(b"\r\n\r\n")[0].decode()
    return [line.partition(": ")[2] for line in head.split("\r\n") if line.lower().startswith("set-cookie:")]


@pytest.mark.parametrize("theirs", ["LB=evil; Path=/; Max-Age=999999", "LB=; Max-Age=0", " LB = spaced ; Path=/"])
@pytest.mark.parametrize("returning", [True, False], ids=["returning", "new"])
def test_insert_mode_leaves_out_a_backends_set_cookie_of_our_cookies_name(theirs: str, returning: bool) -> None:
    """The name is ours: a returning client gets no cookie from us, so the backend's line would be the
    only one of that name and replace (or delete) its pins.  Its other cookies pass."""
    first = Play()
    first.client(upgrade())
    first.connected()
    first.backend(SWITCH)
    ours = first.answer()[1]["set-cookie"].partition(";")[0]

    play = Play(now=T0 + 10)
    play.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: {ours}\r\n\r\n".encode()) if returning else upgrade())
    play.connected()
    play.backend(SWITCH[:-2] + f"Set-Cookie: {theirs}\r\nSet-Cookie: SID=abc; Path=/\r\n\r\n".encode())
    assert play.answer()[0] == 101
    lines = _set_cookie_lines(play)
    assert "SID=abc; Path=/" in lines
    assert [line for line in lines if line.startswith("LB=")] == ([] if returning else [lines[-1]])
    assert not any("evil" in line or "spaced" in line or "Max-Age=0" in line for line in lines)


@pytest.mark.parametrize(("fraction", "issued_fraction"), [(0.0, 0.0), (0.9004, 0.9), (0.9996, 0.999)])
def test_a_token_expires_max_age_after_it_was_issued_to_the_millisecond(
    fraction: float, issued_fraction: float
) -> None:
    """Issue times are the wall clock floored to the millisecond: never in the future, so a token never
    expires before max_age (rounded down to the second, it died up to 1 s early) nor opens past it
    (rounded up to the second, it opened up to 1 s late)."""
    play = Play(REWRITE_CONFIG, now=T0 + fraction)
    play.client(upgrade())
    play.connected()
    play.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(play)
    issued = T0 + issued_fraction
    assert play.ctx.codec.open(token, issued).issued_at == issued
    assert play.ctx.codec.open(token, issued + 100 - 0.001).app_value == "abc"  # max_age: 100 s
    with pytest.raises(InvalidToken, match="expired"):
        play.ctx.codec.open(token, issued + 100 + 0.001)


@pytest.mark.parametrize(("max_age", "cookie_max_age"), [("500ms", 1), ("1500ms", 2), ("2s", 2), ("1h", 3600)])
def test_the_cookies_max_age_is_whole_seconds_rounded_up_and_never_0(max_age: str, cookie_max_age: int) -> None:
    """Max-Age=0 tells a browser to delete the cookie at once; rounded down, the cookie died before its token."""
    play = Play(CONFIG.replace("affinity: {", f"affinity: {{max_age: {max_age}, "))
    play.client(upgrade())
    play.connected()
    play.backend(SWITCH)
    cookie = next(v for k, v in play.answer()[1].items() if k == "set-cookie")
    assert f"; Max-Age={cookie_max_age};" in cookie, cookie


def test_tokens_are_dated_and_judged_by_the_wall_clock_not_the_events_clock() -> None:
    """Events carry the monotonic clock (deadlines: `test_a_connections_deadline_is_on_the_monotonic_clock`);
    a token is issued and judged at the wall-clock instant, `now + ctx.wall_offset`, so every instance
    agrees on its expiry, also after the wall clock stepped back an hour (an NTP step, a VM resumed)."""
    play = Play(now=100.0)  # a monotonic reading: seconds since boot
    play.ctx.wall_offset = T0 - 100.0
    play.ctx.wall_offset -= 3600  # the wall clock steps back an hour
    play.client(upgrade("/a/ws"), dt=1.0)
    play.connected(dt=0.5)
    play.backend(SWITCH)
    token = next(line for line in _set_cookie_lines(play) if line.startswith("LB=")).partition(";")[0][3:]
    issued = T0 - 3600 + 1  # the head was complete at 101.0
    assert play.ctx.codec.open(token, issued + 1).issued_at == issued
    # ...and a returning client's token is judged by the wall clock too (max_age: 1 h by default),
    # whatever the monotonic clock says: the same monotonic instant, a second inside or outside.
    for age, expired in ((3599, 0), (3601, 1)):
        later = Play(now=100.0)
        later.ctx.wall_offset = issued + age - 100.0
        later.client(upgrade("/a/ws").replace(b"\r\n\r\n", f"\r\nCookie: LB={token}\r\n\r\n".encode()))
        assert later.ctx.stats.invalid_tokens["expired"] == expired, age


def test_our_own_answer_to_a_head_ends_at_its_head() -> None:
    """RFC 9110 §9.3.2: a body after the head of a HEAD's answer would be read as the next answer."""
    play = Play()
    play.client(b"HEAD /nowhere HTTP/1.1\r\nHost: h\r\n\r\n")
    head, _, rest = bytes(play.to_client).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and rest == b""
    assert int(play.answer()[1]["content-length"]) > 0  # what a GET's answer would carry
    failed = Play()
    failed.client(b"HEAD /b/x HTTP/1.1\r\nHost: h\r\n\r\n")
    failed.backend_failed()
    failed.backend_failed()
    head, _, rest = bytes(failed.to_client).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and rest == b""
    got = Play()
    got.client(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n")
    assert got.answer()[2].startswith(b"404 Not Found")


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD /b/x HTTP/2.0\r\nHost: h\r\n\r\n",  # 505
        b"HEAD /b/x#f HTTP/1.1\r\nHost: h\r\n\r\n",  # 400
        b"HEAD /b/x HTTP/1.1\r\nHost: h\r\nBad Header: y\r\n\r\n",  # 400
        b"HEAD /b/x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",  # 431
    ],
    ids=["505", "fragment", "bad-field", "431"],
)
def test_a_head_refused_while_it_is_read_gets_no_body_either(head: bytes) -> None:
    """The request never parsed, so its method is read from its first bytes (a verifier's case)."""
    play = Play()
    play.client(head)
    status_line, _, rest = bytes(play.to_client).partition(b"\r\n\r\n")
    assert status_line.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")) and rest == b""


def test_a_request_abandoned_before_its_answer_is_counted_as_logged() -> None:
    """Its access line says `affinity=new status=499`: the counters say it too (a reviewer found the
    log's affinity lines and lb_affinity_decisions_total apart)."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play._apply(play.conn.client_lost())
    stats = play.ctx.stats
    assert stats.handshakes[("b", "b1", "abandoned")] == 1
    assert stats.decisions[("b", "b1", "new")] == 1
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}


@pytest.mark.parametrize(("how", "outcome"), [
    ("refused", "connect_failed"),
    ("garbage", "bad_answer"),
    ("404 to an upgrade", "refused"),
    ("200", "answered"),
])
def test_each_attempt_is_counted_by_its_outcome(how: str, outcome: str) -> None:
    """lb_handshakes_total{outcome}: a connect that failed, an answer that was not HTTP, an upgrade the
    backend answered without switching, and a plain answer are four outcomes, each the attempt's own."""
    play = Play()
    play.client(upgrade("/b/ws") if how == "404 to an upgrade" else get("/b/x"))
    if how == "refused":
        play.backend_failed()
    else:
        play.connected()
        play.backend({"garbage": b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "200": ok()}.get(
            how, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    counted = {key: n for key, n in play.ctx.stats.handshakes.items() if n}
    assert counted == {("b", "b1", outcome): 1}


def test_a_client_that_half_closes_before_its_upgrade_is_answered_is_closed_at_once() -> None:
    """An upgrade whose client ends before its 101 is dropped: the backend released, the request logged 499."""
    play = Play()
    play.client(upgrade("/b/ws"))
    play._apply(play.conn.client_eof(play.now))
    assert play.closed_client == CloseClient() and CloseBackend() in play.actions
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}
    assert play.ctx.stats.handshakes[("b", "b1", "abandoned")] == 1


def test_a_client_gone_while_its_answer_streams_is_not_counted_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    """Its answer was given (one access line, `answered`): leaving during the body adds no 499 line."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    with caplog.at_level(logging.INFO, logger="lb.access"):
        play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        play._apply(play.conn.client_lost())
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.access"]
    assert len(lines) == 1 and "status=200" in lines[0]
    assert play.ctx.stats.handshakes[("b", "b1", "abandoned")] == 0
    assert play.connections() == {"a1": 0, "b1": 0, "b2": 0}


def test_a_buffer_reported_full_again_keeps_the_time_it_first_filled() -> None:
    """The client's bound, and the backend's stall, count from when the buffer first filled, however often
    the shell says it again."""
    client = Play()
    client.client(get("/a/x"))
    client.connected()
    client._apply(client.conn.client_blocked(True, client.now))
    client._apply(client.conn.client_blocked(True, client.now + 4))
    client._apply(client.conn.deadline(T0 + 6))  # the client's 5 s (timeouts.handshake) from T0 have passed
    assert client.closed_client == CloseClient(abort=True)
    backend = Play()
    backend.client(post("/a/x", b"x" * 100)[:-50])
    backend.connected()
    backend._apply(backend.conn.backend_blocked(True, backend.now))
    backend._apply(backend.conn.backend_blocked(True, backend.now + 1.5))
    assert backend.timer == T0 + 2  # backend_connect from the first report


def test_a_backend_that_stops_reading_an_upload_after_answering_has_backend_connect() -> None:
    """The upload goes on behind an early answer: a full backend buffer then is the backend's stall."""
    play = Play()
    play.client(post("/a/x", b"x" * 100)[:-50])
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    assert play.conn.state == RELAY and play.timer == T0 + 5
    play._apply(play.conn.backend_blocked(True, play.now + 1))
    assert play.timer == T0 + 1 + 2


def test_a_final_answer_instead_of_100_continue_gives_the_upload_back_to_the_client() -> None:
    """RFC 9110 §10.1.1: the final answer ends the wait for leave to send; the rest of the body (the
    connection is then closed) is the client's time from that answer, not the backend's 8 s."""
    play = expecting()
    play.now += 1
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nx")
    assert play.conn.state == RELAY and play.timer == T0 + 1 + 5


def test_a_stop_waits_no_longer_for_a_head_than_timeouts_handshake() -> None:
    """STOP_HEAD_WAIT, or timeouts.handshake where that is shorter."""
    play = Play(CONFIG.replace("handshake: 5s", "handshake: 200ms"))
    play.shutdown()
    assert play.timer == T0 + 0.2


def test_a_stop_during_an_answer_already_promised_keep_alive_closes_after_it() -> None:
    """The head went out without Connection: close; the stop still ends the connection with the body."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.backend(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    play.shutdown()
    play.backend(b"cd")
    assert play.closed_client == CloseClient() and play.conn.state == CLOSED


def test_an_answer_after_the_listeners_stopped_accepting_asks_its_client_to_go() -> None:
    """Between `accepting = False` and the stop reaching each connection (the accept queue drains), an
    answer already says Connection: close."""
    play = Play()
    play.client(get("/a/x"))
    play.connected()
    play.ctx.accepting = False
    play.backend(ok())
    assert play.answer()[1]["connection"] == "close" and play.closed_client == CloseClient()


def test_after_sigterm_answers_ask_keep_alive_clients_to_go() -> None:
    """During `shutdown_delay` (/readyz 503, still serving) a keep-alive client is told Connection: close,
    so it reconnects to an instance that stays, not lose its connection when this one stops accepting."""
    play = Play()
    play.client(get("/b/x"))
    play.connected()
    play.backend(ok())
    assert "connection" not in play.answer()[1]  # kept alive
    play.ctx.deregistering = True
    play.to_client.clear()
    play.client(get("/b/y"))
    play.connected()
    play.backend(ok())
    assert play.answer()[1]["connection"] == "close"


# -- boundaries the earlier tables left open ------------------------------------------------------

PIPELINED = b"GET /a/222 HTTP/1.1\r\nHost: h\r\n\r\n"  # 32 bytes: HELD_LIMIT holds 2048 of them exactly


def test_held_bytes_pause_reading_past_held_limit_and_resume_at_it() -> None:
    """Held behind a request in flight: exactly HELD_LIMIT bytes do not pause reading, one request more does;
    once the next head is taken and HELD_LIMIT bytes are left, reading resumes."""
    assert HELD_LIMIT % len(PIPELINED) == 0
    play = Play()
    play.client(get("/a/1"))
    play.connected()
    play.client(PIPELINED * (HELD_LIMIT // len(PIPELINED)))
    assert not play.paused
    play.client(PIPELINED)
    assert play.paused and len(play.conn._buf) == HELD_LIMIT + len(PIPELINED)
    play.backend(ok())
    assert play.opened == ["a1", "a1"] and len(play.conn._buf) == HELD_LIMIT
    assert not play.paused


def test_a_pipelined_tail_behind_a_streamed_body_pauses_reading() -> None:
    """The end of a body streamed to the backend, and more than HELD_LIMIT bytes of requests behind it in the
    same read: those are held, and reading pauses."""
    play = Play()
    play.client(b"POST /a/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
    play.connected()
    play.client(b"abc" + PIPELINED * (HELD_LIMIT // len(PIPELINED) + 1))
    assert play.to_backend[0].endswith(b"\r\n\r\nabc")
    assert play.paused


def test_a_body_held_while_connecting_resumes_reading_once_it_went_out() -> None:
    """A body larger than HELD_LIMIT arrives before the backend is connected: reading pauses; once it is out
    (on connect), reading resumes for what follows."""
    body = b"x" * (HELD_LIMIT + 100)
    play = Play()
    play.client(f"POST /a/x HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    play.client(body)
    assert play.paused and play.conn.state == CONNECTING
    play.connected()
    assert play.to_backend[0].endswith(body) and not play.paused


def test_a_body_in_the_same_read_as_an_expect_100_continue_head_is_no_wait_for_100() -> None:
    """A client that sent body bytes with its head did not wait for 100 Continue: what is left of its body is
    the client's time (timeouts.handshake, 5 s), and its silence is its 408, not the backend's 502."""
    play = expecting(EXPECTING + b"a")
    assert play.to_backend[0].endswith(b"\r\n\r\na")
    assert play.timer == play.now + 5
    play.fire()
    assert b"408 Request Timeout" in play.to_client and play.failures == []


@pytest.mark.parametrize("stage", ["head", "waiting", "tunnel"])
def test_a_local_failure_outside_a_connect_changes_nothing(stage: str) -> None:
    """The balancer's own shortage reported for a connection not connecting (a late report): no 503, nothing
    released."""
    play = Play()
    if stage != "head":
        play.client(upgrade("/a/ws") if stage == "tunnel" else get("/a/x"))
        play.connected()
        if stage == "tunnel":
            play.backend(SWITCH)
    state, connections = play.conn.state, play.connections()
    assert play._apply(play.conn.local_failure(play.now)) == []
    assert (play.conn.state, play.connections()) == (state, connections)
    assert b"503" not in play.to_client


def test_an_upgrade_s_answer_wait_after_the_client_drains_is_backend_connect() -> None:
    """A client full while its upgrade waits for the 101 drains again: the backend has timeouts.backend_connect
    again (an upgrade's answer wait), not timeouts.response, and its silence then is its timeout."""
    play = Play(CONFIG.replace("backend_connect: 2s}", "backend_connect: 2s, response: 60s}"))
    play.client(upgrade("/a/ws"))
    play.connected()
    play._apply(play.conn.client_blocked(True, play.now + 0.5))
    play.now += 1.0
    play._apply(play.conn.client_blocked(False, play.now))
    assert play.timer == play.now + 2
    play.fire()
    assert play.answer()[0] == 502 and "no answer within 2s" in play.failures[0][2]


def test_a_101_with_a_wrong_accept_from_the_only_backend_is_on_trial_never_blamed() -> None:
    """A 101 the client would reject (here a wrong Sec-WebSocket-Accept) may be the request's doing: with no
    other backend to show otherwise, it is a 502 and no health verdict."""
    play = Play()
    play.client(upgrade("/a/ws"))
    play.connected()
    play.backend(SWITCH.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="))
    assert play.answer()[0] == 502 and play.failures == []


@pytest.mark.parametrize(("secure", "tls", "flagged"), [
    ("auto", False, False), ("auto", True, True), ("never", True, False), ("always", False, True),
])
def test_the_inserted_cookie_is_secure_as_affinity_secure_says(secure: str, tls: bool, flagged: bool) -> None:
    """`auto`: Secure under TLS only; `never`: not even under TLS; `always`: on plain listeners too."""
    play = Play(CONFIG.replace("mode: insert, cookie: LB,", f"mode: insert, cookie: LB, secure: {secure},"), tls=tls)
    play.client(upgrade())
    play.connected()
    play.backend(SWITCH)
    assert ("; Secure" in play.answer()[1]["set-cookie"]) is flagged


def test_a_token_naming_a_backend_the_pool_lacks_is_counted_as_unknown_backend() -> None:
    """A cookie pinned to a backend this pool no longer has: balanced as new, counted in
    lb_affinity_invalid_tokens_total{reason="unknown_backend"}."""
    elsewhere = Play(CONFIG.replace("{id: a1,", "{id: a9,"))
    elsewhere.client(upgrade())
    elsewhere.connected()
    elsewhere.backend(SWITCH)
    cookie = elsewhere.answer()[1]["set-cookie"].partition(";")[0]
    play = Play()
    play.client(upgrade().replace(b"\r\n\r\n", f"\r\nCookie: {cookie}\r\n\r\n".encode()))
    assert play.opened == ["a1"]
    assert dict(play.ctx.stats.invalid_tokens) == {"unknown_backend": 1}


def test_rewrite_mode_a_stand_in_that_hangs_up_is_on_trial_and_blamed_once_another_answers() -> None:
    """The pinned backend refuses; the stand-in it was redispatched to hangs up on a request that carries no
    session of its own: on trial like any hang-up (not spared as the pinned backend's own session would be),
    and blamed once a third backend answers the same request."""
    config = SIX_BACKENDS.replace("RETRIES", "3").replace(
        "affinity: {mode: insert, cookie: LB,", "affinity: {mode: rewrite, cookie: SID, max_age: 100s,")
    first = Play(config)
    first.client(upgrade("/b/ws"))
    first.connected()
    first.backend(SWITCH_SETTING_SID)
    token = _rewrite_token(first)
    play = Play(config, now=T0 + 5)
    play.client(upgrade("/b/ws").replace(b"\r\n\r\n", f"\r\nCookie: SID={token}\r\n\r\n".encode()))
    play.backend_failed()  # the pinned backend refuses: blamed at once
    play.connected()
    play.backend_eof()  # the stand-in hangs up
    assert [f[1] for f in play.failures] == [first.opened[0]]
    play.connected()
    play.backend(SWITCH)
    assert play.answer()[0] == 101 and len(play.opened) == 3
    assert [f[1] for f in play.failures] == play.opened[:2]
