"""An operator's drain or disable of a backend a reload removed while its tunnels run: the word stays on it,
as on one drained before it left, so a reload that names it again brings it back as answered.  In process,
one balancer, no client: a tunnel is stood in for by the backend's connection count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lb.config.load import load_config
from lb.control.balancer import Balancer
from lb.state.pool import AdminAction, BackendState, BackendStatus

TOKEN = "t" * 40


def _config(with_b: bool) -> str:
    b = ', {id: b, address: "127.0.0.1:19"}' if with_b else ""
    return f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0", token: "{TOKEN}"}}
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    backends: [{{id: a, address: "127.0.0.1:9"}}{b}]
    health_check: {{type: tcp, interval: 1h}}
routes: [{{path_prefix: /, pool: p}}]
"""


@contextlib.asynccontextmanager
async def _b_removed_with_a_tunnel(tmp_path: Path) -> AsyncIterator[tuple[Balancer, Path, BackendStatus]]:
    """A balancer whose backend `b` a reload has removed while one tunnel (its count) runs on it."""
    path = tmp_path / "lb.yaml"
    path.write_text(_config(True))
    balancer = Balancer(load_config(path), path)
    await balancer.start()
    try:
        b = balancer.ctx.pools["p"].backends["b"]
        b.connections = 1  # a live tunnel
        path.write_text(_config(False))
        assert await balancer.reload()
        assert balancer.is_removed_with_tunnels("p", "b")
        yield balancer, path, b
    finally:
        await balancer.stop()


@pytest.mark.parametrize(("action", "back_as"), [(AdminAction.DRAIN, BackendState.DRAINING),
                                                  (AdminAction.DISABLE, BackendState.DISABLED)])
async def test_a_removed_backend_drained_and_named_again_comes_back_as_answered(
    tmp_path: Path, action: AdminAction, back_as: BackendState
) -> None:
    """It came back `up`, taking new clients, while the drain's `migrating` turned its own cookie holders
    away (and, had close_after not run out, would have closed the tunnels of a backend back in service)."""
    async with _b_removed_with_a_tunnel(tmp_path) as (balancer, path, b):
        assert balancer.apply_admin("p", "b", action, close_after=0.0, rate=50.0) is BackendState.DISABLED
        await asyncio.sleep(0.2)  # the closes begin
        path.write_text(_config(True))
        assert await balancer.reload()
        back = balancer.ctx.pools["p"].backends["b"]
        assert back is b and back.state is back_as and not back.takes_new_clients, (back.state, back.reason)
        # The reason /status shows is the one in force (it said "added back by reload" while draining).
        assert back.reason == f"operator: {action.value} (kept while a reload had removed it)"


@pytest.mark.parametrize("action", [AdminAction.DRAIN, AdminAction.DISABLE])
async def test_a_backend_drained_then_gone_from_dns_with_its_tunnels_comes_back_saying_why(
    tmp_path: Path, action: AdminAction
) -> None:
    """Drained (or disabled), then out of DNS while a tunnel kept it: back in the answer, /status said `draining`
    with the reason "added back by DNS", where one that kept no tunnel says the operator's word."""
    from lb.config.model import BackendConfig

    path = tmp_path / "lb.yaml"
    # A pool that discovers (the nameserver, the discard port, never answers: only the sets given here apply).
    path.write_text(_config(False).replace(
        "    health_check:",
        '    discovery: {dns: gw.test, type: srv, interval: 1h, timeout: 100ms, nameservers: ["127.0.0.1:9"]}\n'
        "    health_check:"))
    balancer = Balancer(load_config(path), path)
    await balancer.start()
    try:
        found = (BackendConfig(id="d", host="127.0.0.1", port=19),)
        balancer.update_discovered("p", found)
        d = balancer.ctx.pools["p"].backends["d"]
        balancer.apply_admin("p", "d", action)
        d.connections = 1  # a live tunnel
        balancer.update_discovered("p", ())
        assert balancer.is_removed_with_tunnels("p", "d")
        balancer.update_discovered("p", found)
        back = balancer.ctx.pools["p"].backends["d"]
        assert back is d and back.admin is action, (back.state, back.reason)
        assert back.reason == f"operator: {action.value} (kept while it was out of DNS)"
        d.admin = AdminAction.ENABLE  # (as an `enable` would leave it) out and back again: no operator's word
        balancer.update_discovered("p", ())
        balancer.update_discovered("p", found)
        assert balancer.ctx.pools["p"].backends["d"].reason == "added back by DNS"
        d.healthy, d.health_said = False, "health check failed 2 time(s): HTTP 503"  # down: health says why
        balancer.update_discovered("p", ())
        balancer.update_discovered("p", found)
        back = balancer.ctx.pools["p"].backends["d"]
        assert (back.state, back.reason) == (BackendState.DOWN, "health check failed 2 time(s): HTTP 503")
        # Down and drained: `down` is the state, and the failure its reason, as after a drain of a down
        # backend (`apply_admin`).  It said "operator: drain (kept while it was out of DNS)".
        d.admin = action
        balancer.update_discovered("p", ())
        balancer.update_discovered("p", found)
        back = balancer.ctx.pools["p"].backends["d"]
        said = "health check failed 2 time(s): HTTP 503"
        expected = (BackendState.DISABLED, "operator: disable (kept while it was out of DNS)")
        assert (back.state, back.reason) == (expected if action is AdminAction.DISABLE else (BackendState.DOWN, said))
    finally:
        await balancer.stop()


async def test_enable_of_a_removed_backend_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with _b_removed_with_a_tunnel(tmp_path) as (balancer, _, _):
        with pytest.raises(KeyError):
            balancer.apply_admin("p", "b", AdminAction.ENABLE)
        with pytest.raises(KeyError):
            balancer.apply_admin("p", "nobody", AdminAction.DRAIN)


async def test_a_removed_backends_last_tunnel_ending_while_its_drain_body_comes_is_a_404(tmp_path: Path) -> None:
    """The handler decided "removed, with tunnels", then waited for the body: the last tunnel ended meanwhile,
    and the operator got a bare 500 (apply_admin's KeyError, with a traceback in the log)."""
    async with _b_removed_with_a_tunnel(tmp_path) as (balancer, _, b):
        assert balancer.admin_address is not None
        reader, writer = await asyncio.open_connection(*balancer.admin_address[:2])
        body = b'{"close_after": "0s", "rate": 5}'
        writer.write(b"POST /pools/p/backends/b/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler waits for the body
        b.connections = 0  # the last tunnel ends meanwhile
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.split(b" ", 2)[1] == b"404", answer
