"""SPEC "Errors": bad input gets a clear answer and costs nothing else.

Each case runs while a tunnel is open through the same balancer and checks the tunnel still
echoes afterwards.  Malformed upgrades go to `/spy/...`, routed to a spy backend in this process,
so "without touching a backend" is checked by the spy's request log (a valid upgrade to the same
path is the positive control).  The shared balancer has timeouts.handshake = 1 s and
limits.max_header_bytes = 16384.  The 502 cases kill gateways, so they start stacks of their own
with a slow health check (3 s interval, fall 3) that still says `up` when the ports are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time

import aiohttp
import pytest

from tests.harness import UNIT
from tests.harness.clients import (
    affinity_cookie,
    assert_echo,
    find_backend,
    recv_hello,
    status,
    tunnel,
    visit,
    wait_for_state,
    ws_connect,
)
from tests.harness.processes import SHARED_HANDSHAKE, Balancer, Launcher, Stack, lb_config
from tests.harness.raw import (
    close_raw,
    open_raw,
    raw_exchange,
    read_response,
    upgrade_request,
    wait_closed_by_peer,
    ws_key,
)

BAD_REQUESTS = [
    pytest.param(upgrade_request("/spy/ws", key=None), 400, id="no-key"),
    pytest.param(upgrade_request("/spy/ws", key="not base64!!"), 400, id="key-not-base64"),
    pytest.param(upgrade_request("/spy/ws", key="c2hvcnQ="), 400, id="key-not-16-bytes"),
    pytest.param(upgrade_request("/spy/ws", key="", version="13"), 400, id="key-empty"),
    pytest.param(upgrade_request("/spy/ws", extra=[("Sec-WebSocket-Key", ws_key())]), 400, id="two-keys"),
    pytest.param(b"GET /spy/ws HTTP/1.1\r\n\r\n", 400, id="no-host"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="garbage-request-line"),
    pytest.param(b"GET /spy/ws HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, id="bad-header-name"),
    pytest.param(
        b"GET /spy/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        id="cl-and-te",
    ),
]


async def _assert_spy_untouched(stack: Stack, before: int) -> None:
    await asyncio.sleep(0.1)  # anything forwarded would have reached the spy by now
    assert stack.spy.requests[before:] == [], "the request reached a backend"


@pytest.mark.parametrize(("request_bytes", "expected"), BAD_REQUESTS)
async def test_malformed_request_gets_400_without_backend(stack: Stack, request_bytes: bytes, expected: int) -> None:
    """A malformed upgrade or request head is answered 400 by the balancer, touching no backend."""
    lb = stack.balancer
    assert lb.port is not None
    async with tunnel(lb.ws_url()) as ws:
        before = len(stack.spy.requests)
        response = await raw_exchange(lb.port, request_bytes)
        assert response is not None, "no answer at all"
        assert response.status == expected, (response.status, response.body[:200])
        await _assert_spy_untouched(stack, before)
        await assert_echo(ws, "after")


@pytest.mark.parametrize("version", ["12", "8", "14", "abc"])
async def test_wrong_websocket_version_gets_426_without_backend(stack: Stack, version: str) -> None:
    """Sec-WebSocket-Version other than 13 → 426 with `Sec-WebSocket-Version: 13` (RFC 6455 §4.2.2),
    naming the protocol in Upgrade, listed in Connection (RFC 9110 §15.5.22, §7.8)."""
    lb = stack.balancer
    assert lb.port is not None
    async with tunnel(lb.ws_url()) as ws:
        before = len(stack.spy.requests)
        response = await raw_exchange(lb.port, upgrade_request("/spy/ws", version=version))
        assert response is not None
        assert response.status == 426, (response.status, response.body[:200])
        assert response.get("Sec-WebSocket-Version") == "13"
        assert response.get("Upgrade") == "websocket"
        assert response.get("Connection") == "Upgrade, close"
        await _assert_spy_untouched(stack, before)
        await assert_echo(ws, "after")


async def test_missing_websocket_version_is_refused_without_backend(stack: Stack) -> None:
    """An upgrade without Sec-WebSocket-Version is refused (400 or 426) and reaches no backend."""
    lb = stack.balancer
    assert lb.port is not None
    before = len(stack.spy.requests)
    response = await raw_exchange(lb.port, upgrade_request("/spy/ws", version=None))
    assert response is not None and response.status in (400, 426), response
    await _assert_spy_untouched(stack, before)


async def test_valid_upgrade_reaches_spy(stack: Stack) -> None:
    """Positive control for the cases above: a valid upgrade on the same path does reach the spy."""
    lb = stack.balancer
    before = len(stack.spy.requests)
    async with ws_connect(lb.ws_url("/spy/ws")) as (ws, headers):
        assert affinity_cookie(headers) is not None
        await assert_echo(ws, "spied")
    assert [r.path for r in stack.spy.requests[before:]] == ["/spy/ws"]


@pytest.mark.parametrize("websocket", [True, False], ids=["upgrade", "plain"])
async def test_no_route_gets_404(lb: Balancer, websocket: bool) -> None:
    """A path no route matches → 404 from the balancer."""
    assert lb.port is not None
    async with tunnel(lb.ws_url()) as ws:
        request = (
            upgrade_request("/no/such/route")
            if websocket
            else b"GET /no/such/route HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        response = await raw_exchange(lb.port, request)
        assert response is not None and response.status == 404, response
        assert affinity_cookie(response.headers) is None
        await assert_echo(ws, "after")


@pytest.mark.parametrize("websocket", [True, False], ids=["upgrade", "plain"])
async def test_all_backends_down_gets_503_with_retry_after(stack: Stack, websocket: bool) -> None:
    """No healthy backend in the route's pool → 503 with Retry-After."""
    lb = stack.balancer
    assert lb.port is not None
    for dead in stack.dead:
        await wait_for_state(lb, "dead", dead.id, "down")
    async with tunnel(lb.ws_url()) as ws:
        request = upgrade_request("/dead/ws") if websocket else b"GET /dead/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        response = await raw_exchange(lb.port, request)
        assert response is not None and response.status == 503, response
        retry_after = response.get("Retry-After")
        assert retry_after is not None and retry_after.strip().isdigit(), response.headers
        await assert_echo(ws, "after")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([("X-Big", "a" * 20_000)], id="one-huge-header"),
        pytest.param([(f"X-Many-{i}", "b" * 900) for i in range(20)], id="many-headers"),
    ],
)
async def test_head_over_max_header_bytes_gets_431(stack: Stack, extra: list[tuple[str, str]]) -> None:
    """A request head larger than limits.max_header_bytes → 431, touching no backend."""
    lb = stack.balancer
    assert lb.port is not None
    async with tunnel(lb.ws_url()) as ws:
        before = len(stack.spy.requests)
        request = upgrade_request("/spy/ws", extra=extra)
        assert len(request) > 16384
        response = await raw_exchange(lb.port, request)
        assert response is not None and response.status == 431, response
        await _assert_spy_untouched(stack, before)
        await assert_echo(ws, "after")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"X-Pad": "p" * 15_800}, id="one-header-of-15800-bytes"),
        pytest.param({f"X-Pad-{i}": "p" * 30 for i in range(300)}, id="300-headers"),
    ],
)
async def test_head_under_max_header_bytes_is_served(lb: Balancer, extra: dict[str, str]) -> None:
    """A head just under the 16 KiB limit is served normally, through to the demo gateway (whose own
    server once refused a header line over 8,190 bytes, or more than 128 headers)."""
    async with ws_connect(lb.ws_url(), headers=extra) as (ws, _):
        await recv_hello(ws)
        await assert_echo(ws, "big head ok")


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n", id="partial-head"),
    ],
)
async def test_incomplete_head_is_closed_after_handshake_timeout(lb: Balancer, opening: bytes) -> None:
    """A request head not complete within timeouts.handshake → the connection is closed."""
    assert lb.port is not None
    async with tunnel(lb.ws_url()) as ws:
        reader, writer = await open_raw(lb.port)
        try:
            writer.write(opening)
            await writer.drain()
            start = time.monotonic()
            received = await wait_closed_by_peer(reader, SHARED_HANDSHAKE + 3 * UNIT)
            elapsed = time.monotonic() - start
        finally:
            await close_raw(writer)
        assert elapsed >= 0.5 * SHARED_HANDSHAKE, f"closed after {elapsed:.2f}s, before the timeout"
        assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:100]
        await assert_echo(ws, "after")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(b"GET /spy/x\r\n", 400, id="http09"),
        pytest.param(b"HEAD /spy/x\r\n", 400, id="http09-head"),
        pytest.param(b"GET /spy/x HTTP/2.0\r\nHost: 127.0.0.1\r\n", 505, id="http2-line"),
    ],
)
async def test_a_request_line_no_head_can_mend_is_answered_at_its_crlf(
    stack: Stack, line: bytes, expected: int
) -> None:
    """HTTP/0.9's `GET /` is whole at its CRLF and its client sends nothing more: it is refused then,
    as HAProxy does, not left without an answer until timeouts.handshake closes it."""
    lb = stack.balancer
    assert lb.port is not None
    before = len(stack.spy.requests)
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(line)
        await writer.drain()
        # Before, nothing came: the close at timeouts.handshake ends the read with no status line.
        answer = await read_response(reader, within=SHARED_HANDSHAKE + 3 * UNIT, body=not line.startswith(b"HEAD"))
    finally:
        await close_raw(writer)
    assert answer.status == expected
    await _assert_spy_untouched(stack, before)


async def test_drip_fed_head_is_closed_after_handshake_timeout(lb: Balancer) -> None:
    """The whole head must arrive within timeouts.handshake: a byte every 100 ms does not extend it."""
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    request = upgrade_request("/ws")[:-2] + b"X-Slow: " + b"z" * 200  # never finished
    start = time.monotonic()
    closed_after = None
    try:
        for byte in request:
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if reader.at_eof():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                data = await asyncio.wait_for(reader.read(4096), 0.1)
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed_after = time.monotonic() - start
                    break
            if time.monotonic() - start > SHARED_HANDSHAKE + 3 * UNIT:
                break
    except ConnectionError:
        closed_after = time.monotonic() - start
    finally:
        await close_raw(writer)
    if closed_after is None and reader.at_eof():
        closed_after = time.monotonic() - start
    assert closed_after is not None, "a drip-fed head kept the connection open past timeouts.handshake"
    assert closed_after < SHARED_HANDSHAKE + 2 * UNIT


async def test_slow_head_within_handshake_timeout_is_served(lb: Balancer) -> None:
    """A head that arrives in pieces but within timeouts.handshake is served."""
    assert lb.port is not None
    request = upgrade_request("/ws", host=f"127.0.0.1:{lb.port}")
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(request[:30])
        await writer.drain()
        await asyncio.sleep(0.4 * SHARED_HANDSHAKE)
        writer.write(request[30:])
        await writer.drain()
        response = await read_response(reader)
        assert response.status == 101
        assert affinity_cookie(response.headers) is not None
    finally:
        await close_raw(writer)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _garbage_connection(port: int, kind: int, rng: random.Random) -> None:
    reader, writer = await open_raw(port)
    try:
        if kind == 0:  # random bytes, then go away
            writer.write(rng.randbytes(rng.randint(1, 600)))
        elif kind == 1:  # half a head, then close mid-handshake
            writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        elif kind == 2:  # connect and leave
            pass
        elif kind == 3:  # a TLS ClientHello on the plain port
            writer.write(bytes.fromhex("16030100c8010000c40303") + os.urandom(32) + b"\x00" * 40)
        elif kind == 4:  # garbage head that waits for the answer
            writer.write(rng.randbytes(50).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n\r\n")
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.read(4096), 2 * UNIT)
        elif kind == 5:  # a complete upgrade, gone before the answer
            writer.write(upgrade_request("/ws"))
        elif kind == 6:  # half a head, then a reset
            writer.write(b"GET /ws HTTP/1.1\r\nHo")
            await writer.drain()
            _rst(writer)
        else:  # a complete upgrade, then a reset
            writer.write(upgrade_request("/ws"))
            await writer.drain()
            _rst(writer)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2 * UNIT)


async def test_garbage_connections_cost_at_most_a_log_line_each(lb: Balancer) -> None:
    """200 garbage or half-finished connections: at most one log line each, no traceback, service goes on."""
    assert lb.port is not None
    rng = random.Random(6455)
    async with tunnel(lb.ws_url()) as ws:
        await asyncio.sleep(0.2)
        lines_before = lb.log_lines()
        kinds = [i % 8 for i in range(200)]
        for batch in range(0, len(kinds), 50):
            await asyncio.wait_for(
                asyncio.gather(*(_garbage_connection(lb.port, k, rng) for k in kinds[batch : batch + 50])),
                20 * UNIT,
            )
        result = await visit(lb.ws_url())
        assert result.cookie is not None
        await assert_echo(ws, "still here")
        await asyncio.sleep(SHARED_HANDSHAKE + 0.5)  # let any late handshake timeout log
        log = lb.log_text()
    new_lines = log.splitlines()[lines_before:]
    assert "Traceback" not in log, "\n".join(new_lines[-60:])
    assert len(new_lines) <= 200 + 10, f"{len(new_lines)} log lines for 200 bad connections:\n" + "\n".join(
        new_lines[:30]
    )
    lb.assert_alive()


# -------------------------------------------------------------------------------------------------
# unreachable backends: dedicated stacks


SLOW_HEALTH = {"interval": "3s", "timeout": "500ms", "rise": 1, "fall": 3}


async def _fragile_stack(launcher: Launcher) -> tuple[Balancer, list]:  # type: ignore[type-arg]
    gateways = launcher.gateways(2)
    spy = launcher.spy("steady-1")
    config = lb_config(
        pools={"gateways": gateways, "steady": [spy]},
        routes={"/ws": "gateways", "/whoami": "gateways", "/steady": "steady"},
        overrides={"pools": {"gateways": {"health_check": SLOW_HEALTH}}},
    )
    lb = launcher.balancer(config)
    for g in gateways:
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    await wait_for_state(lb, "steady", "steady-1", "up", within=10 * UNIT)
    return lb, gateways


async def _states(lb: Balancer, ids: list[str]) -> dict[str, str]:
    data = await status(lb)
    return {i: find_backend(data, "gateways", i)["state"] for i in ids}


async def test_unreachable_backend_is_retried_on_another(launcher: Launcher) -> None:
    """A backend that cannot be reached → another backend is tried (and the client is re-pinned)."""
    lb, gateways = await _fragile_stack(launcher)
    first = await visit(lb.ws_url())
    assert first.cookie is not None
    victim = next(g for g in gateways if g.id == first.server_id)
    survivor = next(g for g in gateways if g.id != first.server_id)
    victim.kill()
    states = await _states(lb, [victim.id])
    assert states[victim.id] == "up", f"test premise: health must still say up, got {states}"
    for _ in range(6):
        result = await visit(lb.ws_url())
        assert result.server_id == survivor.id
    moved = await visit(lb.ws_url(), cookie=first.cookie.value)
    assert moved.server_id == survivor.id
    assert moved.cookie is not None, "client was served by another backend than its cookie names; cookie not replaced"
    assert (await visit(lb.ws_url(), cookie=moved.cookie.value)).server_id == survivor.id


async def test_no_reachable_backend_gives_502_and_tunnels_survive(launcher: Launcher) -> None:
    """No backend can be reached (all ports closed, health still `up`) → 502; an open tunnel keeps echoing."""
    lb, gateways = await _fragile_stack(launcher)
    async with tunnel(lb.ws_url("/steady/ws"), hello=False) as steady:
        for g in gateways:
            g.kill()
        states = await _states(lb, [g.id for g in gateways])
        assert set(states.values()) == {"up"}, f"test premise: health must still say up, got {states}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with ws_connect(lb.ws_url()):
                pass
        assert info.value.status == 502, (
            f"expected 502, got {info.value.status} (states {await _states(lb, list(states))})"
        )
        assert lb.port is not None
        response = await raw_exchange(lb.port, b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response is not None and response.status == 502, response
        await assert_echo(steady, "steady")
