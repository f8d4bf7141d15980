"""SPEC "Errors": SIGTERM → stop accepting, /healthz 503, live tunnels get WebSocket close 1001 after
`timeouts.shutdown_grace`, exit 0.

Gateways are shared by the module; each test starts (and ends) its own balancer.
"""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from collections.abc import Iterator

import aiohttp
import pytest
from conftest import (
    OP_CLOSE,
    OP_TEXT,
    UNIT,
    Balancer,
    Gateway,
    RawWs,
    assert_echo,
    http_get_async,
    lb_config,
    recv_hello,
    visit,
    ws_connect,
)
from support_ops import launched, signal_balancer, wait_close, wait_exit, wait_until

POOL = "gateways"
GRACE = 1.5  # seconds: timeouts.shutdown_grace of these balancers
CLOSE_LINGER = 2.0  # how long the balancer may wait for a client to answer its close (product default)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    with launched(tmp_path_factory, "shutdown-gateways") as started:
        yield started.gateways(2)


@pytest.fixture
def lb(tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway]) -> Iterator[Balancer]:
    with launched(tmp_path_factory, "shutdown") as launcher:
        config = lb_config(pools={POOL: gateways}, overrides={"timeouts": {"shutdown_grace": f"{int(GRACE * 1000)}ms"}})
        balancer = launcher.balancer(config)
        balancer.wait_states({(POOL, g.id): "up" for g in gateways})
        yield balancer


async def healthz(lb: Balancer) -> int:
    code, _, _ = await http_get_async(lb.admin_url("/healthz"))
    return code


async def test_sigterm_closes_tunnels_with_1001_after_the_grace_and_exits_0(lb: Balancer) -> None:
    """During the grace: /healthz 503, no new handshakes, live tunnels still relay. Then close 1001, exit 0."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        await assert_echo(ws, "before SIGTERM")
        sent = time.monotonic()
        signal_balancer(lb, signal.SIGTERM)

        async def unhealthy() -> bool:
            return await healthz(lb) == 503

        await wait_until(unhealthy, within=GRACE, what="/healthz 503 during the shutdown grace")
        await assert_echo(ws, "during the grace the tunnel still relays")
        with pytest.raises((aiohttp.ClientError, OSError, asyncio.TimeoutError)):
            await visit(lb.ws_url(), within=2 * UNIT)

        closed = await wait_close(ws, GRACE + 5 * UNIT)
        waited = closed.at - sent
        assert closed.code == 1001, closed
        assert waited >= GRACE - 0.1, f"tunnel closed {waited:.2f}s after SIGTERM, before the {GRACE}s grace"
        assert waited <= GRACE + 3 * UNIT, f"tunnel closed only {waited:.2f}s after SIGTERM"

    assert await wait_exit(lb, CLOSE_LINGER + 5 * UNIT) == 0
    assert "Traceback" not in lb.log_text(), lb.logs_tail()


async def test_sigterm_without_tunnels_exits_0_promptly(lb: Balancer) -> None:
    """Nothing to wait for: the grace is not spent, the process just stops with 0."""
    await visit(lb.ws_url())
    sent = time.monotonic()
    signal_balancer(lb, signal.SIGTERM)
    assert await wait_exit(lb, 5 * UNIT) == 0
    assert time.monotonic() - sent < GRACE + 1.0, "an idle balancer should not wait out the grace"


async def test_client_that_ignores_the_1001_is_cut_and_exit_is_still_0(lb: Balancer) -> None:
    """A client that never answers the close frame does not keep the balancer alive."""
    assert lb.port is not None
    async with RawWs.connect(lb.port) as raw:
        opcode, _, _ = await raw.recv_message()
        assert opcode == OP_TEXT  # the hello
        sent = time.monotonic()
        signal_balancer(lb, signal.SIGTERM)
        frame = await raw.recv_frame(within=GRACE + 5 * UNIT)
        assert frame.opcode == OP_CLOSE
        assert struct.unpack("!H", frame.payload[:2])[0] == 1001
        assert time.monotonic() - sent >= GRACE - 0.1
        # We never answer; the balancer must still finish.
        assert await wait_exit(lb, CLOSE_LINGER + 5 * UNIT) == 0
