"""Moving players off a drained backend gradually: close its tunnels at a rate, with close 1012.

`drain` alone lets live tunnels run until they end.  With `close_after` and
`rate`, after the delay the balancer stops sending the backend even its
cookie holders, then closes its tunnels one by one, each with WebSocket close
1012 (Service Restart) injected at a frame boundary.  Clients reconnect and
are redispatched a few at a time instead of in one storm.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence

from lb.proxy.deadlines import sleep_reading_first
from lb.proxy.tunnel import CLOSE_DEADLINE, CLOSE_LINGER, Tunnel
from lb.state.context import ProxyContext
from lb.state.pool import BackendStatus

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # IANA WebSocket close code registry: the service is restarting; reconnect
DEFAULT_MIGRATION_RATE = 10.0  # tunnels closed per second when `rate` is not given
SETTLE_LOOK = 0.25  # seconds between two looks at whether every close has ended


def start_migrating(pool: str, backend: BackendStatus, rate: float) -> None:
    """From now on even the backend's cookie holders go elsewhere (the owner and single mode alike)."""
    backend.migrating = True
    backend.reason = f"operator: drain, closing tunnels at {rate:g}/s"
    log.info("drain of %s/%s: closing its tunnels at %g/s with close 1012", pool, backend.id, rate)


async def migrate(ctx: ProxyContext, pool: str, backend: BackendStatus, close_after: float, rate: float) -> None:
    """Wait `close_after` seconds, then close `backend`'s tunnels at `rate` per second.

    Each close either reaches its client as a close frame or, for a client that does not read, is
    cut at TCP level within `CLOSE_DEADLINE + CLOSE_LINGER`; one whose client is still reading a long
    frame waits for it up to `timeouts.shutdown_grace` (`lb.proxy.tunnel.next_close_look`).  The last
    log line says how many of each, once every close has ended; or, when the task is cancelled once
    closing has begun (`enable`, another drain, SIGTERM), what was done until then.
    """
    await asyncio.sleep(close_after)
    start_migrating(pool, backend, rate)
    closing: list[Tunnel] = []
    try:
        await _close_at_rate(ctx, backend, rate, closing)
        # By construction each one is closed or cut within this much of its close: until then, look
        # now and then whether they all have, and count how.
        settle = max(CLOSE_DEADLINE, ctx.config.timeouts.shutdown_grace) + CLOSE_LINGER + 0.1
        for _ in range(math.ceil(settle / SETTLE_LOOK)):
            if all(t.closed for t in closing):
                break
            await asyncio.sleep(SETTLE_LOOK)
    except asyncio.CancelledError:
        # The closes asked for go on, each on its own deadlines; the rest of the backend's tunnels stay.
        # Said now, or the operator, who saw the drain's first line, never hears how it went.
        left = sum(1 for t in ctx.tunnels if t.backend is backend and not (t.closed or t.closing))
        log_summary(pool, backend.id, closing, left_open=left)
        raise
    log_summary(pool, backend.id, closing)


async def _close_at_rate(ctx: ProxyContext, backend: BackendStatus, rate: float, closing: list[Tunnel]) -> None:
    """Ask each of `backend`'s live tunnels for a 1012, `rate` per second, adding each to `closing`."""
    interval = 1.0 / rate
    while True:
        # One scan per round, not per close: the backend takes no new tunnels now, so a
        # later round only picks up handshakes that were in flight during the first.
        pending = [t for t in ctx.tunnels if t.backend is backend and not (t.closed or t.closing)]
        if not pending:
            pending = await _in_flight_become_tunnels(ctx, backend, interval)
        if not pending:
            return
        for tunnel in pending:
            if tunnel.closed or tunnel.closing:
                continue  # ended by itself meanwhile
            tunnel.close_gracefully(SERVICE_RESTART, "service restart", cause="drain")
            closing.append(tunnel)
            # Woken past a stall: a gateway's own close frame that came in it is read before our next 1012.
            await sleep_reading_first(interval)


async def _in_flight_become_tunnels(ctx: ProxyContext, backend: BackendStatus, interval: float) -> list[Tunnel]:
    """The tunnels that handshakes still in flight to `backend` become, once some do; [] when none is left.

    A handshake routed to it before the drain (counted in its connections, not yet a tunnel) became one
    after the last scan found none, and was never closed: the drain said it was done while /status kept
    showing those clients on it, for as long as they stayed.  Each such handshake ends within
    `timeouts.backend_connect` (its answer's deadline); a plain request, whose answer may take longer,
    is not waited on past that.
    """
    deadline = asyncio.get_running_loop().time() + ctx.config.timeouts.backend_connect + 1.0
    while asyncio.get_running_loop().time() < deadline:
        tunnels = [t for t in ctx.tunnels if t.backend is backend]
        if backend.connections <= len(tunnels):  # nothing in flight
            return []
        await asyncio.sleep(min(interval, 0.1))
        pending = [t for t in ctx.tunnels if t.backend is backend and not (t.closed or t.closing)]
        if pending:
            return pending
    return []


def log_failed(pool: str, backend_id: str, task: asyncio.Task[None]) -> None:
    """A drain task's done callback: one that raised says so.  Its owner holds it until the next action on
    the backend, so asyncio would never report the exception, and the closes would end with no word."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("drain of %s/%s failed; its tunnels are no longer being closed", pool, backend_id, exc_info=exc)


def log_summary(pool: str, backend_id: str, closing: Sequence[Tunnel], *, left_open: int | None = None) -> None:
    """The drain's last line: how its closes ended.  `left_open`: the drain was stopped, with that many
    of the backend's tunnels not asked yet; closes still under way are counted apart."""
    first = sum(1 for t in closing if t.server_end.backend_closed_first)  # began their own close first
    ours = [t for t in closing if not t.server_end.backend_closed_first]
    under_way = sum(1 for t in ours if not t.closed)
    # Ended by their client while the 1012 waited for a frame boundary (`client_left_first`): no cause left.
    client_first = sum(1 for t in ours if t.closed and t.cause is None)
    cut = sum(1 for t in ours if t.closed and t.cause is not None and t.ended_with == "tcp")
    sent = len(ours) - under_way - cut - client_first
    if left_open is None:
        log.info(
            "drain of %s/%s: %d tunnel(s) closed with 1012, %d cut at TCP level (the client did not take the close, "
            "or the backend's frame in flight did not end in time), %d closed by the backend first%s%s",
            pool, backend_id, sent, cut, first,
            f", {client_first} ended by their client first" if client_first else "",
            f", {under_way} still closing" if under_way else "",
        )
        return
    log.info(
        "drain of %s/%s stopped (another action on the backend, or shutdown): %d tunnel(s) closed with 1012, "
        "%d cut at TCP level (the client did not take the close, or the backend's frame in flight did not end in "
        "time), %d closed by the backend first, %s"
        "%d still closing, %d not asked to close",
        pool, backend_id, sent, cut, first, f"{client_first} ended by their client first, " if client_first else "",
        under_way, left_open,
    )
