"""Nothing reaches a backend that did not pass the parser and the router (issue 7).

Recording raw-socket backends keep every byte the balancer sends them and
keep their connections open after answering, so anything sent behind an
answer would be seen.  Two pools: `/a` → rec-a, `/b` → rec-b.

Also here: backend faults (silent, garbage, status `000`, silence after
`100 Continue`) give 502, never a relayed answer or a 500; early data and
interim-answer floods leave the balancer's memory bounded; a slow upload is
not counted against the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lb.ws.upgrade import accept_value
from tests.harness import UNIT
from tests.harness.clients import find_backend, status
from tests.harness.ops import paused, wait_until
from tests.harness.processes import Balancer, Launcher, lb_config
from tests.harness.raw import close_raw, open_raw, read_response, upgrade_request
from tests.harness.recording import RecordingBackend, rss_kib
from tests.harness.tcp import ScriptedGateway

TCP_HEALTH = {"type": "tcp", "interval": "5s", "timeout": "1s", "rise": 1, "fall": 3}
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
# A gateway's 101 to an upgrade with KEY (the recording backend answers it, after a delay).
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + accept_value(KEY).encode() + b"\r\n\r\n"
)


@pytest.fixture
def recorders() -> Iterator[list[RecordingBackend]]:
    made: list[RecordingBackend] = []
    yield made
    for backend in made:
        backend.close()


def start(
    launcher: Launcher,
    recorders: list[RecordingBackend],
    a: dict[str, Any] | None = None,
    b: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    health: dict[str, Any] = TCP_HEALTH,
) -> tuple[Balancer, RecordingBackend, RecordingBackend]:
    rec_a = RecordingBackend("rec-a", **(a or {}))
    rec_b = RecordingBackend("rec-b", **(b or {}))
    recorders += [rec_a, rec_b]
    config = lb_config(
        pools={"a": [rec_a], "b": [rec_b]}, routes={"/a": "a", "/b": "b"}, health=health, overrides=overrides
    )
    return launcher.balancer(config), rec_a, rec_b


GET_B = b"GET /b/hidden HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Smuggled: yes\r\n\r\n"


async def test_refused_upgrade_then_hidden_request_is_routed_on_its_own(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """A request behind an Upgrade never reaches the refusing backend; it is parsed and routed to its own pool."""
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
    lb, rec_a, rec_b = start(launcher, recorders, a={"answer": refusal})
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(upgrade_request("/a/ws") + GET_B)
        first = await read_response(reader)
        assert (first.status, first.body) == (403, b"nope")
        second = await read_response(reader)
        assert (second.status, second.body) == (200, b"ok")
    finally:
        await close_raw(writer)
    await asyncio.sleep(0.2)  # anything forwarded late would have arrived by now
    sent_a = rec_a.requests()
    assert len(sent_a) == 1 and sent_a[0].count(b"\r\n\r\n") == 1, sent_a
    assert b"X-Smuggled" not in sent_a[0] and b"/b/hidden" not in sent_a[0]
    sent_b = rec_b.requests()
    assert len(sent_b) == 1 and sent_b[0].startswith(b"GET /b/hidden HTTP/1.1\r\n")
    assert b"X-Forwarded-For: 127.0.0.1" in sent_b[0]


async def test_a_frame_sent_after_a_refused_upgrade_is_a_400_at_once(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """A client that sends its first WebSocket frame right behind its upgrade, which is refused: that
    frame cannot start a request, so it gets a 400 at once (not silence until timeouts.handshake)
    and reaches no backend."""
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
    lb, rec_a, rec_b = start(launcher, recorders, a={"answer": refusal})
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(upgrade_request("/a/ws") + b"\x81\x85\x01\x02\x03\x04ijopk")  # a masked "hello"
        first = await read_response(reader)
        assert (first.status, first.body) == (403, b"nope")
        started = time.monotonic()
        second = await read_response(reader, within=2 * UNIT)
        assert second.status == 400 and time.monotonic() - started < 1.0 * UNIT
    finally:
        await close_raw(writer)
    assert len(rec_a.requests()) == 1 and not rec_b.requests()


@pytest.mark.parametrize(
    ("target", "expected"), [(b"/a/x", 501), (b"http://evil.example/a/admin", 501), (b"evil.example:443", 400)]
)
async def test_connect_is_refused_and_nothing_behind_it_is_read(
    launcher: Launcher, recorders: list[RecordingBackend], target: bytes, expected: int
) -> None:
    """CONNECT opens a tunnel (RFC 9110 §9.3.6) that llhttp and h11 read as such from the end of its
    head: a reverse proxy offers none (501; its own authority-form target is no target of ours: 400).
    Forwarded (it was, for origin- and absolute-form targets), a backend's 2xx was framed as a plain
    answer and the tunnel's bytes read as the next request."""
    lb, rec_a, rec_b = start(launcher, recorders)
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello" + GET_B)
        answer = await read_response(reader)
        assert answer.status == expected
        assert await asyncio.wait_for(reader.read(), 2 * UNIT) == b"", "the connection stays open after a CONNECT"
    finally:
        await close_raw(writer)
    assert not rec_a.requests() and not rec_b.requests()


async def test_absolute_form_reaches_the_backend_in_origin_form_with_one_host(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """`GET http://good.example/b/x` with `Host: evil.example`: routed by its path, sent as `GET /b/x`
    with Host (and X-Forwarded-Host) the target's authority; the Host that disagreed is gone."""
    lb, _, rec_b = start(launcher, recorders)
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(b"GET http://good.example/b/x?q=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        answer = await read_response(reader)
        assert (answer.status, answer.body) == (200, b"ok")
    finally:
        await close_raw(writer)
    sent = rec_b.requests()
    assert len(sent) == 1 and sent[0].startswith(b"GET /b/x?q=1 HTTP/1.1\r\n"), sent
    assert b"\r\nHost: good.example\r\n" in sent[0] and b"X-Forwarded-Host: good.example\r\n" in sent[0]
    assert b"evil.example" not in sent[0]


async def test_early_data_waits_for_the_switch(launcher: Launcher, recorders: list[RecordingBackend]) -> None:
    """Bytes sent right behind an upgrade head reach the backend only after its 101."""
    lb, rec_a, _ = start(launcher, recorders, a={"answer": SWITCH, "delay": 0.5})
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(upgrade_request("/a/ws", key=KEY) + b"EARLY-FRAME")
        await wait_until(lambda: rec_a.requests() != [], every=0.02, what="a request at rec-a")
        await asyncio.sleep(0.2)  # the backend has not answered yet (0.5 s delay)
        before = rec_a.requests()[0]
        assert b"EARLY-FRAME" not in before
        answer = await read_response(reader)
        assert answer.status == 101
        await wait_until(lambda: b"EARLY-FRAME" in rec_a.requests()[0], every=0.02, what="the early frame at rec-a")
        assert rec_a.requests()[0].endswith(b"\r\n\r\nEARLY-FRAME")
    finally:
        await close_raw(writer)


@pytest.mark.parametrize(
    ("mode", "raw"),
    [
        pytest.param("silent", b"", id="silent"),
        pytest.param("raw", b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param("raw", b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", id="status-000"),
        pytest.param("raw", b"HTTP/1.1 100 Continue\r\n\r\n", id="silence-after-100"),
    ],
)
async def test_broken_backend_gives_502(
    launcher: Launcher, recorders: list[RecordingBackend], mode: str, raw: bytes
) -> None:
    """SPEC errors: a backend answering garbage, or nothing, gives the client our 502 with a request id and none of the
    backend's bytes; the balancer lives on."""
    lb, _, _ = start(
        launcher, recorders, a={"mode": mode, "raw": raw}, overrides={"timeouts": {"backend_connect": "1s"}}
    )
    assert lb.port is not None
    for request in (
        b"GET /a/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /a/x HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    ):
        reader, writer = await open_raw(lb.port)
        try:
            writer.write(request)
            answer = await read_response(reader, within=5 * UNIT, body=False)
            while answer.status == 100:  # relayed as it came; then the 502 of our own
                answer = await read_response(reader, within=5 * UNIT, body=False)
            assert answer.status == 502, answer
            answer.body = await reader.readexactly(int(answer.get("Content-Length") or 0))
            assert answer.get("X-Request-Id"), answer.headers
            assert b"Zero" not in answer.body and b"NOT HTTP" not in answer.body
        finally:
            await close_raw(writer)
    lb.assert_alive()
    assert "Traceback" not in lb.log_text()


async def test_a_body_that_ends_at_close_cut_by_a_reset_resets_the_client(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """A backend that resets in a body that ends at close: the client is reset too, never closed cleanly,
    which would pass the half answer for a whole one (RFC 9112 §8)."""
    half = b"HTTP/1.1 200 OK\r\n\r\nhalf an answer"
    lb, _, _ = start(launcher, recorders, a={"mode": "raw-then-reset", "raw": half})
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    received, reset = bytearray(), False
    try:
        writer.write(b"GET /a/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for _ in range(100):
            chunk = await asyncio.wait_for(reader.read(65536), timeout=5 * UNIT)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        reset = True
    finally:
        await close_raw(writer)
    assert received.endswith(b"half an answer"), bytes(received)
    assert reset, "closed cleanly after a cut body"
    assert "closed before its answer was complete" in lb.log_text()


async def test_slow_upload_leaves_the_backend_up(launcher: Launcher, recorders: list[RecordingBackend]) -> None:
    """An upload slower than backend_connect (but never quiet for timeouts.handshake) is the client's time."""
    health = dict(TCP_HEALTH, fall=1)  # one failure would mark it down
    lb, rec_a, _ = start(
        launcher,
        recorders,
        a={"answer": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ngot", "answer_after": b"6789"},
        overrides={"timeouts": {"backend_connect": "1s", "handshake": "3s"}},
        health=health,
    )
    assert lb.port is not None
    body = b"0123456789"
    reader, writer = await open_raw(lb.port)
    try:
        # The backend answers once it has the whole body.
        writer.write(b"POST /a/up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n")
        started = time.monotonic()
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.25)  # 2.5 s in all: over backend_connect, each gap under handshake
        answer = await read_response(reader)
        assert answer.status == 200 and time.monotonic() - started > 2.0
    finally:
        await close_raw(writer)
    await wait_until(
        lambda: rec_a.requests() and rec_a.requests()[0].endswith(body), every=0.02, what="the whole body at rec-a"
    )
    state = find_backend(await status(lb), "a", "rec-a")["state"]
    assert state == "up"


async def test_stalled_upload_gets_408_and_leaves_the_backend_up(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """A client that stops mid-body gets 408, and the backend is not marked down for it."""
    health = dict(TCP_HEALTH, fall=1)
    lb, _, _ = start(
        launcher,
        recorders,
        a={"mode": "silent"},
        overrides={"timeouts": {"backend_connect": "1s", "handshake": "1s"}},
        health=health,
    )
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(b"POST /a/up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n01")
        answer = await read_response(reader, within=5 * UNIT)
        assert answer.status == 408, answer
    finally:
        await close_raw(writer)
    assert find_backend(await status(lb), "a", "rec-a")["state"] == "up"


def _stream_until_blocked(port: int, head: bytes, seconds: float, limit: int) -> int:
    """Send head then junk until the balancer stops reading (send blocks), `seconds` pass or `limit` bytes."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(head)
        sock.settimeout(0.5)
        chunk = b"x" * 65536
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and sent < limit:
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                break  # the balancer paused reading: this is what the test wants
            except OSError:
                break
    return sent


async def test_a_client_paused_by_early_data_is_read_again_after_the_switch(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """Past the early data the balancer holds (64 KiB), it stops reading the client until the backend answers;
    at the switch the client is read again: all it sent reaches the backend, and so does what it sends next."""
    lb, rec_a, _ = start(launcher, recorders, a={"answer": SWITCH, "delay": 1.0})
    assert lb.port is not None
    early = b"E" * (4 * 65536)  # past the held limit: reading pauses with some of it still unsent
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(upgrade_request("/a/ws", key=KEY) + early)
        answer = await read_response(reader)
        assert answer.status == 101
        writer.write(b"LATER")
        await wait_until(lambda: rec_a.requests()[0].endswith(early + b"LATER"), every=0.02,
                         what="the early bytes and the later ones at rec-a")
    finally:
        await close_raw(writer)


async def test_early_data_flood_leaves_memory_bounded(launcher: Launcher, recorders: list[RecordingBackend]) -> None:
    """A client flooding bytes after its upgrade head, before the backend answers, is not read on (memory stays bounded)
    and none of it reaches the backend before the switch."""
    lb, rec_a, _ = start(launcher, recorders, a={"mode": "silent"}, overrides={"timeouts": {"backend_connect": "10s"}})
    assert lb.port is not None and lb.proc is not None
    before = rss_kib(lb.proc.pid)
    sent = await asyncio.to_thread(_stream_until_blocked, lb.port, upgrade_request("/a/ws"), 3.0, 256 * 2**20)
    after = rss_kib(lb.proc.pid)
    assert after - before < 8 * 1024, f"RSS grew by {after - before} KiB while a client sent {sent} bytes"
    assert sent < 64 * 2**20, f"the balancer kept reading: {sent} bytes accepted"
    await wait_until(lambda: rec_a.requests() != [], every=0.02, what="a request at rec-a")
    assert rec_a.requests()[0].endswith(b"\r\n\r\n"), "early data reached the backend before a switch"


async def test_interim_flood_leaves_memory_bounded(launcher: Launcher, recorders: list[RecordingBackend]) -> None:
    """A backend flooding 100 Continue answers to a client that does not read leaves memory bounded, relays few, and
    ends in a 502."""
    lb, rec_a, _ = start(launcher, recorders, a={"mode": "interim-flood"})
    assert lb.port is not None and lb.proc is not None
    before = rss_kib(lb.proc.pid)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /a/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        after = rss_kib(lb.proc.pid)
        sock.settimeout(5)
        received = b""
        with contextlib.suppress(OSError):
            while len(received) < 2**20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    assert after - before < 8 * 1024, f"RSS grew by {after - before} KiB"
    assert b"HTTP/1.1 502 Bad Gateway" in received
    assert received.count(b"100 Continue") <= 16
    assert rec_a.interim_sent >= 1


async def _get(port: int, path: str) -> int:
    reader, writer = await open_raw(port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return (await read_response(reader, within=10 * UNIT)).status
    finally:
        await close_raw(writer)


async def test_requests_every_gateway_hangs_up_on_leave_the_pool_up(
    launcher: Launcher, recorders: list[RecordingBackend]
) -> None:
    """A client can shape a request that gateways close on without a word (s40c F03): it gets 502, tried on
    each gateway, and passive health counts none of it (with `fall: 1`, one such request took the pool down).
    A gateway that hangs up on what another one answers is still counted, and goes down."""
    rec_a, rec_b = RecordingBackend("rec-a", mode="hang-up"), RecordingBackend("rec-b", mode="hang-up")
    recorders += [rec_a, rec_b]
    config = lb_config(pools={"a": [rec_a, rec_b]}, routes={"/a": "a"}, health=dict(TCP_HEALTH, fall=1))
    lb = launcher.balancer(config)
    assert lb.port is not None
    for i in range(3):
        assert await _get(lb.port, f"/a/refused{i}") == 502
        reader, writer = await open_raw(lb.port)
        try:
            writer.write(upgrade_request(f"/a/ws{i}"))
            assert (await read_response(reader, within=10 * UNIT)).status == 502
        finally:
            await close_raw(writer)
    assert len(rec_a.requests()) == len(rec_b.requests()) == 6  # each request was tried on both
    document = await status(lb)
    assert [find_backend(document, "a", b)["state"] for b in ("rec-a", "rec-b")] == ["up", "up"]

    rec_b.mode = "answer"
    statuses = [await _get(lb.port, f"/a/answered{i}") for i in range(4)]
    assert statuses == [200] * 4
    document = await status(lb)
    assert find_backend(document, "a", "rec-a")["state"] == "down", document


@pytest.mark.parametrize("response", [None, 4.0], ids=["default", "response-4s"])
async def test_slow_plain_answers_are_not_sent_twice_and_leave_the_pool_up(
    launcher: Launcher, recorders: list[RecordingBackend], response: float | None
) -> None:
    """A plain answer slower than its deadline (a long poll, a report) is that request's 502: the GET
    is not run again on another backend, and passive health does not take the gateways down for it
    (a reviewer's four slow GETs took a whole pool's WebSocket handshakes to 503).  With a longer
    `timeouts.response` the same answers arrive, while connecting keeps `backend_connect`."""
    rec_a = RecordingBackend("rec-a", delay=2.0 * UNIT)
    rec_b = RecordingBackend("rec-b", delay=2.0 * UNIT)
    recorders += [rec_a, rec_b]
    # In UNITs, as the backends' delay is: a slow machine (LB_TEST_UNIT=2) scales both.
    timeouts = {"backend_connect": f"{UNIT:g}s"} | ({"response": f"{response * UNIT:g}s"} if response else {})
    config = lb_config(
        pools={"a": [rec_a, rec_b]}, routes={"/a": "a"}, health=dict(TCP_HEALTH, fall=1),
        overrides={"timeouts": timeouts},
    )
    lb = launcher.balancer(config)
    assert lb.port is not None
    statuses = await asyncio.gather(*(_get(lb.port, f"/a/slow{i}") for i in range(4)))
    assert statuses == [502 if response is None else 200] * 4
    sent = [request for backend in (rec_a, rec_b) for request in backend.requests()]
    assert len(sent) == 4, sent  # each GET reached one backend, once
    document = await status(lb)
    assert [find_backend(document, "a", b)["state"] for b in ("rec-a", "rec-b")] == ["up", "up"]
    if response is None:
        assert lb.log_text().count("no answer within") == 4


class _EarlyAnswer(ScriptedGateway):
    """A gateway that answers an upload from its head alone (a 413, as nginx's `client_max_body_size`
    gives) and then closes on the body it has not read: its kernel resets the connection, and the reset
    reaches the balancer behind the answer."""

    ANSWER = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
    id = "early"

    def __init__(self) -> None:
        self.has_head = threading.Event()
        self.answer_now = threading.Event()
        self.answered = threading.Event()
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        self.has_head.set()
        if self.server.stop.wait(0) or not self.answer_now.wait(10 * UNIT):
            return
        conn.sendall(self.ANSWER)
        self.answered.set()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_an_early_answer_to_an_upload_reaches_the_client_when_a_write_fails_first(
    launcher: Launcher, event_loop: str
) -> None:
    """A gateway that answers an upload early (413) and closes on the rest resets the connection.  When
    the balancer's next write of the body meets that reset before it has read the answer (the client's
    bytes came first, as they do on a busy loop), the answer the kernel holds is still the client's: a
    413, not a 502 for a backend that "closed before answering" (HAProxy and nginx relay it too).
    The balancer is stopped (SIGSTOP) while both arrive, so that its loop sees them in that order."""
    backend = _EarlyAnswer()
    try:
        lb = launcher.balancer(lb_config(
            pools={"p": [backend]}, health=TCP_HEALTH, overrides={"runtime": {"event_loop": event_loop}}
        ))
        assert lb.port is not None and lb.proc is not None
        reader, writer = await open_raw(lb.port)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n" + b"u" * 8192)
            await writer.drain()
            assert await asyncio.to_thread(backend.has_head.wait, 5 * UNIT)
            await asyncio.sleep(0.3)  # the first body bytes reach the gateway, which does not read them
            with paused(lb.proc.pid):
                writer.write(b"u" * 16384)  # more of the body: waiting for the balancer first
                await writer.drain()
                await asyncio.sleep(0.2)
                backend.answer_now.set()
                assert await asyncio.to_thread(backend.answered.wait, 5 * UNIT)
                await asyncio.sleep(0.3)  # the answer, then the reset, wait behind the client's bytes
            answer = await read_response(reader, within=5 * UNIT)
            assert (answer.status, answer.body) == (413, b"too large"), answer
        finally:
            await close_raw(writer)
        lb.assert_alive()
    finally:
        backend.close()
