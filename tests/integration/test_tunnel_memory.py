"""A client that stops reading while its backend keeps sending holds a bounded amount of the balancer's
memory: the peer's write buffer up to its high-water mark (64 KiB) and at most one read behind it
(`lb.proxy.tunnel.READ_CHUNK`, 32 KiB).  Before reads were bounded, one read of up to 256 KiB landed
whole in that buffer: about 340 KiB per stalled tunnel, for as long as the client stayed.

Measured as the balancer's RSS over many stalled tunnels at once (the scripted backend floods each
until the kernel's buffers between it and its client are full and its sends block)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from conftest import UNIT, Launcher
from support_raw import rss_kib
from support_scripted import ScriptedBackend, stalled_client, start

TUNNELS = 24
BOUND_KIB = 160  # per stalled tunnel: 64 KiB + 32 KiB at most; measured about 70, and about 300 before


@pytest.fixture
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend()
    try:
        yield backend
    finally:
        backend.close()


async def settled(backend: ScriptedBackend) -> None:
    """Until the backend has sent nothing more for a while: every tunnel is stalled."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 20 * UNIT
    while time.monotonic() - since < 0.5:
        assert time.monotonic() < deadline, "the flood never stalled"
        if backend.frames_sent != last:
            last, since = backend.frames_sent, time.monotonic()
        await asyncio.sleep(0.05)


async def test_stalled_readers_hold_a_bounded_amount_each(launcher: Launcher, scripted: ScriptedBackend) -> None:
    lb = start(launcher, scripted)
    assert lb.proc is not None
    clients: list[socket.socket] = []
    try:
        clients.append(await stalled_client(lb))  # the first one's allocations are not per tunnel
        await settled(scripted)
        before = rss_kib(lb.proc.pid)
        clients += [await stalled_client(lb) for _ in range(TUNNELS)]
        await settled(scripted)
        per_tunnel = (rss_kib(lb.proc.pid) - before) / TUNNELS
        assert per_tunnel < BOUND_KIB, f"{per_tunnel:.0f} KiB of the balancer per stalled tunnel"
        lb.assert_alive()
    finally:
        for sock in clients:
            sock.close()
