"""A tunnel's close never waits for ever on a peer that does not read.

`transport.close()` flushes what is buffered first, with no time limit.  When the tunnel ends (the
backend hung up, or the client's FIN after a finished close handshake) while its client reads nothing,
that flush never ends: the descriptor and the buffer were held for ever, and counted nowhere once the
tunnel was gone.  After CLOSE_LINGER they are cut.

Real sockets and the real `Tunnel`, in this process (no balancer): the balancer's own socket towards
the client gets a 4 KiB send buffer, so what the client does not read stays in the transport's buffer
rather than the kernel's, as it does once a slow client has filled the kernel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest
from conftest import HOST, UNIT

from lb.affinity.codec import TokenCodec
from lb.config.model import BackendConfig, Config, PoolConfig
from lb.proxy.tunnel import CLOSE_LINGER, Tunnel
from lb.state.context import ProxyContext
from lb.state.pool import PoolState
from lb.ws.frames import close_frame

FRAME = b"\x82\x7e\x03\xfc" + b"x" * 1020  # a 1 KiB binary frame, unmasked


class Accepted(asyncio.Protocol):
    """Holds an accepted transport until the tunnel takes it over."""

    def __init__(self, ready: asyncio.Future[asyncio.Transport]) -> None:
        self.ready = ready
        self.lost_at: float | None = None

    def connection_made(self, transport: Any) -> None:
        self.ready.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_at = time.monotonic()


def context() -> tuple[ProxyContext, Any]:
    pool = PoolConfig("p", (BackendConfig("gw-1", HOST, 1),))
    config = Config(listeners=(), affinity=None, routes=(), pools={"p": pool})  # type: ignore[arg-type]
    ctx = ProxyContext(
        config=config, codec=TokenCodec(("k" * 43,), 60.0), pools={"p": PoolState(config=pool)},
        routes=(), on_backend_failure=lambda *_: None,
    )
    return ctx, ctx.pools["p"].backends["gw-1"]


@pytest.mark.parametrize("end", ["client FIN after the close handshake", "backend hangs up"])
async def test_a_closed_tunnel_cuts_a_client_that_never_reads(end: str) -> None:
    loop = asyncio.get_running_loop()
    ctx, backend = context()
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
        tunnel = Tunnel.join(ctx, backend, to_client, to_backend, client_ip=HOST, pool="p")
        gateway_writer.write(FRAME * 60 + close_frame(1000, "bye"))  # under the 64 KiB high-water mark
        await gateway_writer.drain()
        await asyncio.sleep(0.3)
        assert to_client.get_write_buffer_size() > 0, "the client's bytes should wait in the transport"
        if end == "backend hangs up":
            gateway_writer.close()
        else:
            client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + CLOSE_LINGER + 5 * UNIT
        while not (tunnel.closed and to_client.get_write_buffer_size() == 0):
            assert time.monotonic() < deadline, "the closed tunnel still holds the client's connection"
            await asyncio.sleep(0.05)
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
