"""SPEC "What passes through unchanged": everything after the handshake, both ways, plus X-Forwarded-*.

All tests use the shared stack (3 demo gateways behind one balancer) and leave it as they found it.
Hand-made frames (`RawWs`) are used where aiohttp cannot say exactly what we need on the wire:
fragmentation, interleaved control frames, close reasons in both directions.
"""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp

from tests.harness import COOKIE, UNIT
from tests.harness.clients import affinity_cookie, assert_echo, recv_hello, ws_connect
from tests.harness.ops import metrics_text
from tests.harness.processes import Balancer, Stack
from tests.harness.raw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWs,
    close_payload,
    raw_exchange,
    upgrade_request,
)


async def test_text_messages_echo_in_order(lb: Balancer) -> None:
    """Text messages pass both ways unchanged and in order."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        messages = [f"message {i} " + "é✓" * (i % 7) for i in range(200)]
        for text in messages:
            await ws.send_str(text)
        for text in messages:
            msg = await asyncio.wait_for(ws.receive(), 5 * UNIT)
            assert msg.type is aiohttp.WSMsgType.TEXT
            assert msg.data == text


async def test_one_mib_binary_message_echoes_unchanged(lb: Balancer) -> None:
    """A 1 MiB binary message passes both ways unchanged."""
    payload = os.urandom(1 << 20)
    async with ws_connect(lb.ws_url(), max_msg_size=8 << 20) as (ws, _):
        await recv_hello(ws)
        await assert_echo(ws, payload, within=15 * UNIT)
        await assert_echo(ws, b"")  # and an empty one right behind it


async def test_fragmented_messages_echo_unchanged(lb: Balancer) -> None:
    """Fragmented text and binary messages pass through; a ping may sit between fragments."""
    assert lb.port is not None
    async with RawWs.connect(lb.port) as raw:
        opcode, data, _ = await raw.recv_message()
        assert opcode == OP_TEXT and json.loads(data)["type"] == "hello"

        await raw.send(OP_TEXT, b"Hel", fin=False)
        await raw.send(OP_CONT, "lo, wö".encode(), fin=False)
        await raw.send(OP_PING, b"between fragments")  # RFC 6455 §5.4: control frames may interleave
        await raw.send(OP_CONT, b"rld", fin=True)
        opcode, data, controls = await raw.recv_message()
        assert (opcode, data.decode()) == (OP_TEXT, "Hello, wörld")
        pongs = [f for f in controls if f.opcode == OP_PONG]
        if not pongs:  # the pong may come after the echo
            frame = await raw.recv_frame()
            pongs = [frame] if frame.opcode == OP_PONG else []
        assert [p.payload for p in pongs] == [b"between fragments"]

        chunks = [os.urandom(n) for n in (1, 70_000, 125, 126, 65_536)]
        for i, chunk in enumerate(chunks):
            await raw.send(OP_BINARY if i == 0 else OP_CONT, chunk, fin=i == len(chunks) - 1)
        opcode, data, _ = await raw.recv_message(within=10 * UNIT)
        assert opcode == OP_BINARY and data == b"".join(chunks)


async def test_ping_gets_pong_with_same_payload(lb: Balancer) -> None:
    """Ping/pong pass through: a client ping is answered with a pong carrying its payload."""
    async with ws_connect(lb.ws_url(), autoping=False) as (ws, _):
        await recv_hello(ws)
        await ws.ping(b"are you there")
        msg = await asyncio.wait_for(ws.receive(), 5 * UNIT)
        assert msg.type is aiohttp.WSMsgType.PONG
        assert msg.data == b"are you there"
        await assert_echo(ws, "still open")


async def test_client_close_code_and_reason_reach_backend(lb: Balancer) -> None:
    """A client's close code and reason reach the backend (which echoes them back unchanged)."""
    assert lb.port is not None
    async with RawWs.connect(lb.port) as raw:
        await raw.recv_message()
        await raw.send(OP_CLOSE, close_payload(4001, "client says bye ✓"))
        frame = await raw.recv_frame()
        assert frame.opcode == OP_CLOSE
        assert frame.payload == close_payload(4001, "client says bye ✓")


async def test_a_client_that_half_closes_after_its_close_frame_still_gets_the_backends(lb: Balancer) -> None:
    """Close frame, then FIN (SHUT_WR): the FIN is passed on and the backend's close frame still comes
    back, then the connection ends; the tunnel was torn down at the FIN, losing the answer."""
    assert lb.port is not None
    async with RawWs.connect(lb.port) as raw:
        await raw.recv_message()
        await raw.send(OP_CLOSE, close_payload(4003, "half"))
        raw.writer.write_eof()
        frame = await raw.recv_frame()
        assert (frame.opcode, frame.payload) == (OP_CLOSE, close_payload(4003, "half"))
        assert await asyncio.wait_for(raw.reader.read(), 5 * UNIT) == b""


async def test_a_client_that_hangs_up_without_a_close_frame_is_an_ordinary_end(lb: Balancer) -> None:
    """A killed app's FIN (no close frame): the backend closes after it, and that is not counted or
    logged as the backend lost (which an operator alerts on), whichever of the two the balancer hears."""
    assert lb.port is not None
    async def backend_lost() -> float:
        lines = (await metrics_text(lb)).splitlines()
        return sum(float(line.rpartition(" ")[2]) for line in lines
                   if line.startswith("lb_tunnel_closes_total{") and 'cause="backend_lost"' in line)

    before = await backend_lost()
    for _ in range(3):
        async with RawWs.connect(lb.port) as raw:
            await raw.recv_message()
            raw.writer.write_eof()
            assert await asyncio.wait_for(raw.reader.read(), 5 * UNIT) == b""  # no 1012 of ours either
    await asyncio.sleep(0.2)
    assert await backend_lost() == before


async def test_backend_close_code_and_reason_reach_client(lb: Balancer) -> None:
    """A backend's close code and reason reach the client unchanged."""
    async with ws_connect(lb.ws_url(), autoclose=False) as (ws, _):
        await recv_hello(ws)
        await ws.send_str(json.dumps({"type": "close", "code": 4002, "reason": "server says bye"}))
        msg = await asyncio.wait_for(ws.receive(), 5 * UNIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4002, "server says bye")


async def test_subprotocol_chat_is_negotiated(lb: Balancer) -> None:
    """Sec-WebSocket-Protocol negotiation passes through: the backend's choice reaches the client."""
    async with ws_connect(lb.ws_url(), protocols=("chat",)) as (ws, headers):
        assert headers.get("Sec-WebSocket-Protocol") == "chat"
        assert ws.protocol == "chat"
        await recv_hello(ws)
        await assert_echo(ws, "chatting")
    async with ws_connect(lb.ws_url(), protocols=("no-such-protocol",)) as (ws, headers):
        assert "Sec-WebSocket-Protocol" not in headers
        await recv_hello(ws)


async def test_permessage_deflate_is_negotiated_and_compressed_messages_echo(lb: Balancer) -> None:
    """permessage-deflate passes through: offered by the client, accepted on the 101, messages echo."""
    async with ws_connect(lb.ws_url(), compress=15) as (ws, headers):
        assert "permessage-deflate" in headers.get("Sec-WebSocket-Extensions", ""), dict(headers)
        assert ws.compress != 0
        await recv_hello(ws)
        await assert_echo(ws, "compress me " * 20_000)
        await assert_echo(ws, bytes(300_000) + os.urandom(1000))
    async with ws_connect(lb.ws_url()) as (ws, headers):
        # Not offered, not accepted: the balancer does not add extensions of its own.
        assert "Sec-WebSocket-Extensions" not in headers
        await recv_hello(ws)


async def test_forwarded_headers_reach_backend(lb: Balancer) -> None:
    """The forwarded handshake carries X-Forwarded-For, -Proto and -Host."""
    async with ws_connect(lb.ws_url(), source_ip="127.0.0.7") as (ws, _):
        hello = await recv_hello(ws)
    assert hello["forwarded_for"] == "127.0.0.7"
    assert hello["forwarded_proto"] == "http"
    assert hello["forwarded_host"] == f"127.0.0.1:{lb.port}"


async def test_forwarded_head_seen_by_backend(stack: Stack) -> None:
    """The backend receives the client's upgrade plus X-Forwarded-* (raw view from a spy backend)."""
    lb, spy = stack.balancer, stack.spy
    before = len(spy.requests)
    assert lb.port is not None
    async with RawWs.connect(lb.port, "/spy/ws?room=7", extra=[("X-Custom", "kept")]) as raw:
        await raw.send(OP_TEXT, b"through the spy")
        opcode, data, _ = await raw.recv_message()
        assert (opcode, data) == (OP_TEXT, b"through the spy")
    seen = spy.requests[before:]
    assert len(seen) == 1, seen
    request = seen[0]
    assert request.path == "/spy/ws?room=7"
    assert request.get("X-Custom") == "kept"
    assert request.get("X-Forwarded-For") == "127.0.0.1"
    assert request.get("X-Forwarded-Proto") == "http"
    assert request.get("X-Forwarded-Host") == f"127.0.0.1:{lb.port}"
    assert (request.get("Upgrade") or "").lower() == "websocket"
    assert request.get("Sec-WebSocket-Version") == "13"


async def test_backend_refusal_reaches_client_with_cookie(lb: Balancer) -> None:
    """The backend's handshake refusal (status, body) is what the client gets, plus the cookie."""
    assert lb.port is not None
    response = await raw_exchange(lb.port, upgrade_request("/ws-no-such-endpoint", host=f"127.0.0.1:{lb.port}"))
    assert response is not None
    assert response.status == 404
    assert b"404: Not Found" in response.body  # aiohttp's own body: it came from the gateway
    assert affinity_cookie(response.headers) is not None, response.headers
    assert any(v.startswith(f"{COOKIE}=") for v in response.get_all("Set-Cookie"))
