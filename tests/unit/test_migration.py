"""A drain's paced closes (`lb.control.migration`) with tunnels over fake transports: its summary line.

The closes run on the tunnels' own timers, so a short event loop runs each scenario; no socket.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from lb.control.migration import log_failed, migrate
from lb.proxy import tunnel as tunnel_module
from lb.proxy.tunnel import Tunnel
from lb.state.context import ProxyContext
from lb.state.pool import BackendStatus
from tests.harness.fake_tunnels import FakeTransport, join_tunnel, one_backend_context

PARTIAL = b"\x82\x64" + b"y" * 10  # 10 of 100 payload bytes: no frame boundary until the rest comes


def _tunnel(ctx: ProxyContext, backend: BackendStatus, client: FakeTransport, *, mid_frame: bool = False) -> Tunnel:
    backend.connections += 1  # as the caller of join counts it
    return join_tunnel(ctx, backend, client, FakeTransport(), client_ip="1.2.3.4", pool="p",
                       to_client=PARTIAL if mid_frame else b"")


async def _drain_cancelled_after(ctx: ProxyContext, backend: BackendStatus, rate: float, after: float) -> None:
    """A drain of `backend` at `rate` closes a second, cancelled `after` seconds (as `enable` does)."""
    task = asyncio.get_running_loop().create_task(migrate(ctx, "p", backend, 0.0, rate))
    await asyncio.sleep(after)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "lb.control.migration"]
    return [line for line in lines if "tunnel(s)" in line]


def test_a_drain_stopped_while_its_closes_end_still_says_how_they_went(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`enable` (or SIGTERM) cancels the drain while it waits for its last close to end: the summary
    line still comes, with the closes done so far and the one still under way."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)
    monkeypatch.setattr(tunnel_module, "CLOSE_DEADLINE", 30.0)  # the mid-frame close is still waiting
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def scenario() -> None:
        ctx, backend = one_backend_context()
        taken = _tunnel(ctx, backend, FakeTransport())  # takes its 1012
        stalled = _tunnel(ctx, backend, FakeTransport(buffered=1 << 20))  # never takes it: cut after the linger
        waiting = _tunnel(ctx, backend, FakeTransport(), mid_frame=True)  # its 1012 waits for a boundary
        # Cancelled a second in: the three asks take 3 ms at 1000/s, and a CI worker once stalled a step of
        # the drain for 0.425 s, past a cancel at 0.3 s, before the third.
        await _drain_cancelled_after(ctx, backend, 1000.0, 1.0)
        assert taken.closed and stalled.closed and not waiting.closed
        waiting.abort()

    asyncio.run(scenario())
    assert _summaries(caplog) == [
        "drain of p/gw-1 stopped (another action on the backend, or shutdown): 1 tunnel(s) closed with 1012, "
        "1 cut at TCP level (the client did not take the close, or the backend's frame in flight did not end in "
        "time), 0 closed by the backend first, "
        "1 still closing, 0 not asked to close"
    ]


def test_a_drain_stopped_between_two_closes_says_how_many_it_left_open(caplog: pytest.LogCaptureFixture) -> None:
    """Cancelled while pacing its closes (1 a second): one asked for, the others left open and said so."""
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def scenario() -> None:
        ctx, backend = one_backend_context()
        tunnels = [_tunnel(ctx, backend, FakeTransport(), mid_frame=True) for _ in range(3)]
        await _drain_cancelled_after(ctx, backend, 1.0, 0.1)
        assert sum(t.closing for t in tunnels) == 1
        for tunnel in tunnels:
            tunnel.abort()

    asyncio.run(scenario())
    assert _summaries(caplog) == [
        "drain of p/gw-1 stopped (another action on the backend, or shutdown): 0 tunnel(s) closed with 1012, "
        "0 cut at TCP level (the client did not take the close, or the backend's frame in flight did not end in "
        "time), 0 closed by the backend first, "
        "1 still closing, 2 not asked to close"
    ]


def test_a_drain_that_runs_to_its_end_says_how_its_closes_went(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not stopped: one line once every close has ended, as soon as they have."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def scenario() -> None:
        ctx, backend = one_backend_context()
        _tunnel(ctx, backend, FakeTransport())
        _tunnel(ctx, backend, FakeTransport(buffered=1 << 20))
        await asyncio.wait_for(migrate(ctx, "p", backend, 0.0, 1000.0), 2.0)

    asyncio.run(scenario())
    assert _summaries(caplog) == [
        "drain of p/gw-1: 1 tunnel(s) closed with 1012, 1 cut at TCP level (the client did not take the close, "
        "or the backend's frame in flight did not end in time), "
        "0 closed by the backend first"
    ]


def test_a_drain_does_not_count_a_tunnel_its_client_ended_first_as_cut(caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up while its 1012 waits for a frame boundary was not cut by the drain: said apart."""
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def scenario() -> None:
        ctx, backend = one_backend_context()
        client = FakeTransport()
        _tunnel(ctx, backend, client, mid_frame=True)
        drain = asyncio.create_task(migrate(ctx, "p", backend, 0.0, 1000.0))
        await asyncio.sleep(0.05)
        client.protocol.connection_lost(ConnectionResetError())
        await asyncio.wait_for(drain, 2.0)

    asyncio.run(scenario())
    assert _summaries(caplog) == [
        "drain of p/gw-1: 0 tunnel(s) closed with 1012, 0 cut at TCP level (the client did not take the close, "
        "or the backend's frame in flight did not end in time), "
        "0 closed by the backend first, 1 ended by their client first"
    ]


def test_a_handshake_in_flight_at_the_drain_is_closed_once_it_becomes_a_tunnel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Routed to the backend before the drain (counted in its connections), a slow gateway's handshake
    became a tunnel after the drain's last scan: it was never closed, while the drain said it was done."""
    monkeypatch.setattr(tunnel_module, "CLOSE_LINGER", 0.05)
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def scenario() -> None:
        ctx, backend = one_backend_context()
        first = _tunnel(ctx, backend, FakeTransport())
        backend.connections += 1  # a handshake in flight, its 101 not yet in
        drain = asyncio.get_running_loop().create_task(migrate(ctx, "p", backend, 0.0, 1000.0))
        await asyncio.sleep(0.3)
        assert first.closed and not drain.done()  # the drain waits for the handshake
        backend.connections -= 1  # the 101 comes: the handshake becomes a tunnel
        late = _tunnel(ctx, backend, FakeTransport())
        await asyncio.wait_for(drain, 2.0)
        assert late.closed and late.close_code == 1012

    asyncio.run(scenario())
    assert _summaries(caplog) == [
        "drain of p/gw-1: 2 tunnel(s) closed with 1012, 0 cut at TCP level (the client did not take the close, "
        "or the backend's frame in flight did not end in time), 0 closed by the backend first"
    ]


def test_a_drain_task_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A drain task that raised says so at ERROR (its holder keeps it, so asyncio never would); a cancelled
    one (enable, another drain) is no failure."""
    caplog.set_level(logging.INFO, logger="lb.control.migration")

    async def fail() -> None:
        raise KeyError("gw-1")

    async def scenario() -> None:
        failed = asyncio.get_running_loop().create_task(fail())
        cancelled = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        cancelled.cancel()
        await asyncio.wait([failed, cancelled])
        log_failed("p", "gw-1", failed)
        log_failed("p", "gw-2", cancelled)

    asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["drain of p/gw-1 failed; its tunnels are no longer being closed"]
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is KeyError
