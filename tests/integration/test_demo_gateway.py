"""The demo gateway on a real socket (in-process, port 0), and the reconnect proof against it.

No balancer here: these tests pin down what the backend does, so that the
balancer's pass-through tests can rely on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from backends_demo.app import make_app
from backends_demo.client import ProofFailed, prove_stickiness
from bench.procs import free_port
from tests.harness.raw import encode_frame, upgrade_request, ws_key

UNIT = 5.0  # seconds; every await below is bounded by a small multiple of it

StartGateway = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start gateway apps on 127.0.0.1, port 0; returns `http://127.0.0.1:PORT`. Cleans them all up."""
    runners: list[web.AppRunner] = []

    async def start(server_id: str = "gw-1", app_cookie: str | None = None) -> str:
        runner = web.AppRunner(make_app(server_id, app_cookie=app_cookie), access_log=None)
        runners.append(runner)
        await asyncio.wait_for(runner.setup(), UNIT)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await asyncio.wait_for(site.start(), UNIT)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in reversed(runners):
        await asyncio.wait_for(runner.cleanup(), 2 * UNIT)


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/ws"


async def read_hello(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.TEXT
    hello: dict[str, Any] = json.loads(msg.data)
    assert hello["type"] == "hello"
    return hello


def header_recorder() -> tuple[aiohttp.TraceConfig, list[CIMultiDictProxy[str]]]:
    """A TraceConfig that keeps each response's headers (the 101's, for a WebSocket)."""
    seen: list[CIMultiDictProxy[str]] = []

    async def on_end(_s: aiohttp.ClientSession, _c: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append(params.response.headers)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    return trace, seen


async def test_hello_reports_server_forwarded_headers_and_cookie_names(start_gateway: StartGateway) -> None:
    """The first message is one text hello with server_id, X-Forwarded-* and the sorted cookie names."""
    base = await start_gateway("gw-7")
    headers = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "play.example",
        "Cookie": "zeta=1; alpha=2",
    }
    async with asyncio.timeout(UNIT), aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(base), headers=headers) as ws:
            hello = await read_hello(ws)
        async with session.ws_connect(ws_url(base)) as ws:
            bare = await read_hello(ws)
    assert hello["server_id"] == "gw-7"
    assert hello["forwarded_for"] == "203.0.113.9"
    assert hello["forwarded_proto"] == "https"
    assert hello["forwarded_host"] == "play.example"
    assert hello["cookies"] == ["alpha", "zeta"]
    assert hello["peer"] == "127.0.0.1"
    assert bare["forwarded_for"] is None and bare["cookies"] == [] and bare["app_cookie"] is None


async def test_text_and_binary_messages_echo_unchanged(start_gateway: StartGateway) -> None:
    """Every text and binary message (here up to 1 MiB) comes back unchanged."""
    base = await start_gateway()
    blob = os.urandom(1024 * 1024)
    async with (
        asyncio.timeout(2 * UNIT),
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(base)) as ws,
    ):
        await read_hello(ws)
        await ws.send_str("héllo ✓")
        assert await ws.receive_str() == "héllo ✓"
        await ws.send_bytes(blob)
        assert await ws.receive_bytes() == blob
        await ws.send_str('{"type": "close", "code": "not a number"}')  # not a close command: echoed
        assert await ws.receive_str() == '{"type": "close", "code": "not a number"}'


async def test_subprotocol_and_permessage_deflate_are_negotiated(start_gateway: StartGateway) -> None:
    """The gateway accepts the chat/superchat subprotocols and permessage-deflate."""
    base = await start_gateway()
    async with asyncio.timeout(UNIT), aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(base), protocols=("superchat",), compress=15) as ws:
            await read_hello(ws)
            assert ws.protocol == "superchat"
            assert ws.compress == 15
            await ws.send_str("x" * 10_000)
            assert await ws.receive_str() == "x" * 10_000
        async with session.ws_connect(ws_url(base), protocols=("mqtt",), compress=0) as ws:
            await read_hello(ws)
            assert ws.protocol is None
            assert ws.compress == 0


async def test_client_close_code_is_echoed(start_gateway: StartGateway) -> None:
    """A close frame from the client is answered with the same close code."""
    base = await start_gateway()
    async with asyncio.timeout(UNIT), aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(base))
        await read_hello(ws)
        await ws.close(code=4001, message=b"client leaving")
        assert ws.close_code == 4001


async def test_client_close_code_and_reason_are_echoed_raw(start_gateway: StartGateway) -> None:
    """On the wire, the gateway's close frame repeats the client's code and reason byte for byte."""
    base = await start_gateway()
    port = int(base.rsplit(":", 1)[1])
    async with asyncio.timeout(UNIT):
        reader, writer = await _raw_ws_client(port)
        try:
            close_payload = struct.pack("!H", 4321) + "bye ✓".encode()
            writer.write(encode_frame(0x8, close_payload))
            opcode, payload = await read_frame(reader)
            assert (opcode, payload) == (0x8, close_payload)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_close_command_makes_the_gateway_close_first(start_gateway: StartGateway) -> None:
    """The text {"type":"close","code":N,"reason":R} makes the gateway close with code N and reason R."""
    base = await start_gateway()
    async with (
        asyncio.timeout(UNIT),
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(base)) as ws,
    ):
        await read_hello(ws)
        await ws.send_str(json.dumps({"type": "close", "code": 4002, "reason": "server says bye"}))
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4002, "server says bye")


async def test_app_cookie_is_set_on_the_101_and_seen_on_return(start_gateway: StartGateway) -> None:
    """With --app-cookie, the 101 sets NAME=<id>; a reconnect carrying it sees that value, unset again."""
    base = await start_gateway("gw-2", app_cookie="SID")
    trace, responses = header_recorder()
    async with (
        asyncio.timeout(UNIT),
        aiohttp.ClientSession(trace_configs=[trace], cookie_jar=aiohttp.DummyCookieJar()) as session,
    ):
        async with session.ws_connect(ws_url(base)) as ws:
            first = await read_hello(ws)
        set_cookies = responses[-1].getall("Set-Cookie", [])
        assert len(set_cookies) == 1
        assert set_cookies[0].startswith(f"SID={first['app_cookie_set']};")
        assert {part.strip().lower() for part in set_cookies[0].split(";")[1:]} == {"path=/", "httponly"}
        assert first["app_cookie"] is None

        cookie = f"SID={first['app_cookie_set']}"
        async with session.ws_connect(ws_url(base), headers={"Cookie": cookie}) as ws:
            again = await read_hello(ws)
        assert responses[-1].getall("Set-Cookie", []) == []
        assert again["app_cookie"] == first["app_cookie_set"]
        assert again["app_cookie_set"] is None
        assert again["cookies"] == ["SID"]


async def test_health_and_whoami(start_gateway: StartGateway) -> None:
    """GET /health is 200 {status: ok, server_id}; GET /whoami is {server_id} exactly, as SPEC gives it;
    GET /whoami/details reports server_id, cookies, X-Forwarded-For."""
    base = await start_gateway("gw-3")
    async with asyncio.timeout(UNIT), aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(f"{base}/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "server_id": "gw-3"}
        headers = {"X-Forwarded-For": "198.51.100.7", "Cookie": "b=1; a=2"}
        async with session.get(f"{base}/whoami", headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"server_id": "gw-3"}
        async with session.get(f"{base}/whoami/details", headers=headers) as response:
            assert response.status == 200
            assert "Set-Cookie" not in response.headers
            whoami = await response.json()
    assert whoami["server_id"] == "gw-3"
    assert whoami["cookies"] == ["a", "b"]
    assert whoami["forwarded_for"] == "198.51.100.7"
    assert whoami["app_cookie"] is None


async def test_whoami_sets_the_app_cookie_once(start_gateway: StartGateway) -> None:
    """With --app-cookie, /whoami sets the cookie when absent; /whoami/details reports it when present."""
    base = await start_gateway("gw-4", app_cookie="SID")
    async with asyncio.timeout(UNIT), aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(f"{base}/whoami/details") as response:
            set_cookie = response.headers.getall("Set-Cookie")
            first = await response.json()
        async with session.get(f"{base}/whoami") as response:
            assert response.headers.getall("Set-Cookie")[0].startswith("SID="), "/whoami plants it too"
        cookie = {"Cookie": f"SID={first['app_cookie_set']}"}
        async with session.get(f"{base}/whoami/details", headers=cookie) as response:
            assert "Set-Cookie" not in response.headers
            again = await response.json()
    assert set_cookie[0].startswith(f"SID={first['app_cookie_set']};")
    assert again["app_cookie"] == first["app_cookie_set"]


async def test_prove_stickiness_binds_each_source_ip(start_gateway: StartGateway) -> None:
    """The proof binds the source IPs in turn, keeps the cookie, and sees one server id."""
    base = await start_gateway("gw-5", app_cookie="SID")
    attempts = await asyncio.wait_for(
        prove_stickiness(ws_url(base), 3, ["127.0.0.2", "127.0.0.3"], None, UNIT), 4 * UNIT
    )
    assert [a.number for a in attempts] == [0, 1, 2, 3]
    assert [a.source_ip for a in attempts] == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
    assert [a.seen_ip for a in attempts] == [a.source_ip for a in attempts]  # the gateway's TCP peer
    assert {a.server_id for a in attempts} == {"gw-5"}
    assert [[c.name for c in a.cookies] for a in attempts] == [["SID"]] * 4
    assert [a.cookies[0].fresh for a in attempts] == [True, False, False, False]
    assert len({a.cookies[0].digest for a in attempts}) == 1


async def test_prove_stickiness_fails_clearly_without_a_server() -> None:
    """A connection failure raises ProofFailed naming the attempt and the address."""
    with pytest.raises(ProofFailed, match=r"attempt 0 from 127\.0\.0\.2: cannot connect to 127\.0\.0\.1:1"):
        await asyncio.wait_for(prove_stickiness("ws://127.0.0.1:1/ws", 1, ["127.0.0.2"], None, UNIT), 2 * UNIT)


@contextlib.asynccontextmanager
async def gateway_process(server_id: str, port: int, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m backends_demo --id ID --port PORT ARGS`, its output piped (the banner comes first);
    killed on the way out if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backends_demo", "--id", server_id, "--port", str(port), *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), UNIT)


async def test_gateway_process_closes_sockets_with_1001_and_exits_0_on_sigterm() -> None:
    """The gateway process serves /health; SIGTERM closes live WebSockets with 1001 and exits 0."""
    port = free_port()
    async with (
        gateway_process("gw-9", port) as proc,
        asyncio.timeout(4 * UNIT),
        aiohttp.ClientSession() as session,
    ):
        assert proc.stdout is not None
        banner = await proc.stdout.readline()
        assert banner.decode().strip() == f"gateway gw-9 listening on 127.0.0.1:{port}"
        async with session.get(f"http://127.0.0.1:{port}/health") as response:
            assert await response.json() == {"status": "ok", "server_id": "gw-9"}
        async with session.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await read_hello(ws)
            proc.send_signal(signal.SIGTERM)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await proc.wait() == 0


# --- raw WebSocket frames (RFC 6455 §5.2) --------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one unmasked server frame; returns (opcode, payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    assert not second & 0x80, "server frames are not masked"
    return first & 0x0F, await reader.readexactly(length)


async def test_drain_and_undrain_change_what_health_says(start_gateway: StartGateway) -> None:
    """POST /drain: /health stays 200 but says draining (body and X-Backend-State); POST /undrain: ok."""
    base = await start_gateway("gw-4")
    async with asyncio.timeout(UNIT), aiohttp.ClientSession() as session:
        async with session.get(base + "/health") as reply:
            assert reply.status == 200 and reply.headers["X-Backend-State"] == "up"
            assert await reply.json() == {"status": "ok", "server_id": "gw-4"}
        async with session.post(base + "/drain") as reply:
            assert reply.status == 200 and (await reply.json())["status"] == "draining"
        for _ in range(2):  # it keeps saying so
            async with session.get(base + "/health") as reply:
                assert reply.status == 200 and reply.headers["X-Backend-State"] == "draining"
                assert (await reply.json())["status"] == "draining"
        async with session.ws_connect(ws_url(base)) as ws:  # a draining gateway still serves
            assert (await read_hello(ws))["server_id"] == "gw-4"
        async with session.post(base + "/undrain") as reply:
            assert reply.status == 200
        async with session.get(base + "/health") as reply:
            assert reply.headers["X-Backend-State"] == "up" and (await reply.json())["status"] == "ok"
        async with session.get(base + "/drain") as reply:
            assert reply.status == 405  # only POST changes state


async def _raw_ws_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket client on `/ws` that has read its hello; it reads only when the test says so."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/ws", host=f"127.0.0.1:{port}", key=ws_key()))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1 and json.loads(payload)["type"] == "hello"
    return reader, writer



@pytest.mark.parametrize(("spread", "code"), [(0.0, 1001), (0.6, 1012)])
async def test_sigterm_close_waits_for_the_clients_close_frame(spread: float, code: int) -> None:
    """SIGTERM's close (1001, or 1012 with `--close-spread`) leaves TCP open for the client's close frame
    (RFC 6455 §7.1.1) and closes it once that arrives.  It went out from another task while the handler
    was in receive(), and aiohttp closed the transport right after the frame: a client not reading at that
    moment saw 1006, not the code.  With a spread the closes fall one every spread/N, the last at the end,
    as the balancer's own shutdown spreads them (the first went at once)."""
    port = free_port()
    async with gateway_process("gw-s", port, "--close-spread", str(spread)) as proc:
        clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            async with asyncio.timeout(4 * UNIT):
                assert proc.stdout is not None
                await proc.stdout.readline()  # listening
                clients = [await _raw_ws_client(port) for _ in range(2)]
                loop = asyncio.get_running_loop()
                started = loop.time()
                proc.send_signal(signal.SIGTERM)
                times = []
                for reader, writer in clients:
                    opcode, payload = await read_frame(reader)
                    times.append(loop.time() - started)
                    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == code, payload
                    # The gateway waits for our close frame: no EOF while we take our time to answer.
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(reader.read(1), 0.3)
                    writer.write(encode_frame(0x8, payload[:2]))
                    await writer.drain()
                    assert await asyncio.wait_for(reader.read(), 0.5) == b""  # then it closes TCP, at once
                if spread:
                    assert times[0] >= 0.9 * spread / 2, f"the first close went out at once: {times}"
                assert await proc.wait() == 0
        finally:
            for _, writer in clients:
                writer.close()


async def test_port_0_listens_on_a_free_port_and_the_banner_names_it() -> None:
    """`--port 0` picks a free port; the banner said `listening on 127.0.0.1:0`, which no one can reach."""
    async with (
        gateway_process("gw-0", 0) as proc,
        asyncio.timeout(4 * UNIT),
        aiohttp.ClientSession() as session,
    ):
        assert proc.stdout is not None
        banner = (await proc.stdout.readline()).decode().strip()
        port = int(banner.rsplit(":", 1)[1])
        assert banner == f"gateway gw-0 listening on 127.0.0.1:{port}" and port != 0
        async with session.get(f"http://127.0.0.1:{port}/health") as response:
            assert await response.json() == {"status": "ok", "server_id": "gw-0"}
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_a_client_gone_mid_echo_is_no_error(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that resets its connection while its echo is being sent (a phone switching networks) just
    ends the handler.  It logged `Error handling request` and a traceback (ConnectionError from the echo's
    send), one per player gone, in every gateway's log; found black-box by the demo audit."""
    base = await start_gateway()
    port = int(base.rsplit(":", 1)[1])
    async with asyncio.timeout(2 * UNIT):
        _, writer = await _raw_ws_client(port)
        writer.write(encode_frame(0x2, os.urandom(8 * 1024 * 1024)))  # its echo fills both socket buffers
        await writer.drain()
        await asyncio.sleep(0.5)  # the gateway is in the echo's send, waiting for us to read
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset
        writer.close()
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as session, session.get(base + "/health") as reply:
            assert reply.status == 200  # still serving
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
