"""A close never waits for ever on a peer that does not read.

`transport.close()` flushes what is buffered first, with no time limit.  When a tunnel ends (the
backend hung up, or the client's FIN after a finished close handshake), or a plain answer is complete,
while the client reads nothing, that flush never ends: the descriptor and the buffer were held for
ever (a tunnel's counted nowhere once it was gone, an answer's place in limits.max_connections
taken for good).  Once the peer has taken nothing for FLUSH_STALL (10 s; 0.5 s here) they are cut;
a slow reader that keeps taking bytes is not.

Real sockets and the real `Tunnel` and `ClientConnection`, in this process: the balancer's own socket
towards the client gets a 4 KiB send buffer, so what the client does not read stays in the transport's
buffer rather than the kernel's, as it does once a slow client has filled the kernel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from lb.config.load import parse_config
from lb.proxy import tunnel as tunnel_module
from lb.proxy.server import client_factory, wall_offset
from lb.state.context import ProxyContext
from lb.ws.frames import close_frame
from tests.harness import HOST, UNIT
from tests.harness.fake_tunnels import join_tunnel, one_backend_context
from tests.harness.ops import wait_until

FRAME = b"\x82\x7e\x03\xfc" + b"x" * 1020  # a 1 KiB binary frame, unmasked
STALL = 0.5  # FLUSH_STALL for these tests


@pytest.fixture(autouse=True)
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_module, "FLUSH_STALL", STALL)


class Accepted(asyncio.Protocol):
    """Holds an accepted transport until the tunnel takes it over."""

    def __init__(self, ready: asyncio.Future[asyncio.Transport]) -> None:
        self.ready = ready
        self.lost_at: float | None = None

    def connection_made(self, transport: Any) -> None:
        self.ready.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_at = time.monotonic()


@pytest.mark.parametrize("end", ["client FIN after the close handshake", "backend hangs up"])
async def test_a_closed_tunnel_cuts_a_client_that_never_reads(end: str) -> None:
    """A tunnel that has ended (close handshake and FIN, or the backend gone) cuts a client that never reads once
    FLUSH_STALL passes, and counts nothing of it."""
    loop = asyncio.get_running_loop()
    ctx, backend = one_backend_context()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()
    server = await loop.create_server(lambda: Accepted(accepted), HOST, 0)
    backend_side: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = loop.create_future()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend_side.set_result((reader, writer))
        await reader.read()

    gateways = await asyncio.start_server(gateway, HOST, 0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    gateway_writer: asyncio.StreamWriter | None = None
    try:
        client.connect((HOST, server.sockets[0].getsockname()[1]))
        to_client = await asyncio.wait_for(accepted, 5 * UNIT)
        to_client.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        to_backend, _ = await loop.create_connection(asyncio.Protocol, HOST, gateways.sockets[0].getsockname()[1])
        _, gateway_writer = await asyncio.wait_for(backend_side, 5 * UNIT)
        backend.connections += 1  # as the handshake counts it before handing over
        tunnel = join_tunnel(ctx, backend, to_client, to_backend, client_ip=HOST, pool="p")
        gateway_writer.write(FRAME * 60 + close_frame(1000, "bye"))  # under the 64 KiB high-water mark
        await gateway_writer.drain()
        await asyncio.sleep(0.3)
        assert to_client.get_write_buffer_size() > 0, "the client's bytes should wait in the transport"
        if end == "backend hangs up":
            gateway_writer.close()
        else:
            client.shutdown(socket.SHUT_WR)
        await wait_until(
            lambda: tunnel.closed and to_client.get_write_buffer_size() == 0, within=STALL + 5 * UNIT,
            what="the closed tunnel letting go of the client's connection",
        )
        assert backend.connections == 0 and not ctx.tunnels
    finally:
        client.close()
        if gateway_writer is not None:
            gateway_writer.close()
            with contextlib.suppress(ConnectionError):
                await gateway_writer.wait_closed()
        server.close()
        gateways.close()
        await asyncio.sleep(0.05)  # the gateway's handler sees its EOF and ends


def proxied_to(gateways: asyncio.Server, tmp_path: Path, extra: str = "") -> ProxyContext:
    """The context of a balancer whose one pool is the one gateway `gateways` serves (+ `extra` config)."""
    text = f"""
listeners: [{{bind: "{HOST}:0"}}]
affinity: {{secret_keys: ["{"k" * 43}"]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: gw-1, address: "{HOST}:{gateways.sockets[0].getsockname()[1]}"}}]}}}}
{extra}"""
    config = parse_config(text, base_dir=tmp_path, environ={})
    return ProxyContext.build(config, lambda *_: None, wall_offset=wall_offset())


ANSWER_BODY = 60 * 1024  # under the 64 KiB high-water mark: relayed whole, so the answer completes


@pytest.mark.parametrize("reader", ["never reads", "reads slowly"])
async def test_a_complete_answer_is_flushed_to_a_slow_reader_and_cut_for_one_that_never_reads(
    tmp_path: Path, reader: str
) -> None:
    """A complete plain answer reaches a slow reader whole; a client that reads none of it is reset after FLUSH_STALL
    and no longer counted."""
    loop = asyncio.get_running_loop()

    async def gateway(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader_.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % ANSWER_BODY + b"x" * ANSWER_BODY)
        await writer.drain()
        writer.close()

    gateways = await asyncio.start_server(gateway, HOST, 0)
    ctx = proxied_to(gateways, tmp_path)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    listener.bind((HOST, 0))
    server = await loop.create_server(client_factory(ctx), sock=listener)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, listener.getsockname())
        await loop.sock_sendall(client, b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await wait_until(
            lambda: ctx.in_flight and all(c.core.closed for c in ctx.in_flight), within=5 * UNIT,
            what="the answer completed",
        )
        received = b""
        deadline = time.monotonic() + 10 * STALL + 5 * UNIT
        while ctx.handshaking or ctx.in_flight:
            assert time.monotonic() < deadline, "the answered connection is still held (and counted)"
            await asyncio.sleep(0.1)
            if reader == "reads slowly":  # 4 KiB every 0.1 s: a whole stall of 0.5 s never passes unread
                with contextlib.suppress(BlockingIOError):
                    received += client.recv(4096)
        if reader == "reads slowly":
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 5 * UNIT):
                received += chunk
            assert received.endswith(b"x" * ANSWER_BODY), "the slow reader got its whole answer"
        else:  # cut by a reset: a FIN would leave what the kernel holds for it there for minutes
            with pytest.raises(ConnectionResetError):
                for _ in range(100):
                    if not await asyncio.wait_for(loop.sock_recv(client, 65536), 5 * UNIT):
                        break
    finally:
        client.close()
        server.close()
        gateways.close()
        await asyncio.sleep(0.05)


async def test_a_client_that_takes_nothing_of_a_streaming_answer_is_cut_with_its_backend(tmp_path: Path) -> None:
    """An answer still streaming (a big download, an event stream) to a client that reads nothing at all:
    after as long as a backend may stay silent mid-body (timeouts.response) the client is cut and the
    backend connection with it.  Nothing bounded it: one cheap client per gateway connection held both."""
    loop = asyncio.get_running_loop()
    backend_gone = loop.create_future()

    async def gateway(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader_.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        try:
            for _ in range(2000):  # at most 128 MB, and it stalls long before: the balancer stops reading
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 20 * UNIT)
        except (ConnectionError, TimeoutError) as exc:
            backend_gone.set_result(type(exc).__name__)
        writer.close()

    gateways = await asyncio.start_server(gateway, HOST, 0)
    ctx = proxied_to(gateways, tmp_path, "timeouts: {response: 1s}\n")
    server = await loop.create_server(client_factory(ctx), HOST, 0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, server.sockets[0].getsockname())
        await loop.sock_sendall(client, b"GET /download HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_until(
            lambda: not (ctx.handshaking or ctx.in_flight), within=10 * UNIT, every=0.1,
            what="the answer let go of a client that reads nothing",
        )
        assert await asyncio.wait_for(backend_gone, 10 * UNIT) != "TimeoutError", "the backend connection was cut"
        assert ctx.pools["p"].backends["gw-1"].connections == 0
    finally:
        client.close()
        server.close()
        gateways.close()
        await asyncio.sleep(0.05)
