"""SPEC "Backend states (admin API)", read-only part: /healthz, the /status shape, /metrics names.

Uses the shared stack: pool `gateways` (gw-1..3, up), pool `dead` (closed ports, down), pool `spy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

from tests.harness import UNIT
from tests.harness.clients import (
    assert_echo,
    find_backend,
    http_get_async,
    recv_hello,
    status,
    visit,
    wait_for_state,
    ws_connect,
)
from tests.harness.processes import Balancer, Stack

METRIC_NAMES = (
    "lb_handshakes_total",
    "lb_active_connections",
    "lb_affinity_decisions_total",
    "lb_backend_up",
    "lb_bytes_relayed_total",
    "lb_client_connections",
    "lb_client_connections_limit",
    "lb_tls_handshake_failures_total",
)


async def test_healthz_answers_200(lb: Balancer) -> None:
    """GET /healthz → 200 while the balancer serves."""
    code, _, _ = await http_get_async(lb.admin_url("/healthz"))
    assert code == 200


async def test_status_shape(stack: Stack) -> None:
    """GET /status → {"pools": {NAME: {"backends": [{"id", "address", "state", "connections", ...}]}}}."""
    lb = stack.balancer
    for dead in stack.dead:
        await wait_for_state(lb, "dead", dead.id, "down")
    code, headers, _ = await http_get_async(lb.admin_url("/status"))
    assert code == 200
    assert headers.get("Content-Type", "").startswith("application/json")
    data = await status(lb)
    assert set(data["pools"]) == {"gateways", "dead", "spy"}
    backends = data["pools"]["gateways"]["backends"]
    assert [b["id"] for b in backends] == [g.id for g in stack.gateways]  # config order
    for backend, gateway in zip(backends, stack.gateways, strict=True):
        assert {"id", "address", "state", "connections"} <= set(backend), backend
        assert backend["address"] == gateway.address
        assert backend["state"] == "up"
        assert isinstance(backend["connections"], int) and backend["connections"] >= 0
        # Since the balancer started, or since the state it is in: a time, never null.
        assert 0 < time.time() - backend["changed_at"] < 3600, backend
    for dead in stack.dead:
        assert find_backend(data, "dead", dead.id)["state"] == "down"


async def test_status_counts_open_tunnels(stack: Stack) -> None:
    """`connections` counts the live tunnels of a backend and drops back when they close."""
    lb = stack.balancer
    first = await visit(lb.ws_url())
    assert first.cookie is not None
    baseline = find_backend(await status(lb), "gateways", first.server_id)["connections"]
    async with contextlib.AsyncExitStack() as tunnels:
        for _ in range(3):
            ws, _ = await tunnels.enter_async_context(ws_connect(lb.ws_url(), cookie=first.cookie.value))
            assert (await recv_hello(ws))["server_id"] == first.server_id
            await assert_echo(ws, "counted")
        document = await status(lb)
        during = find_backend(document, "gateways", first.server_id)["connections"]
        assert during >= baseline + 3, (baseline, during)
        # The whole balancer's count, against limits.max_connections (also lb_client_connections).
        assert document["client_connections"] >= 3 and document["max_connections"] > 0, document
        _, _, body = await http_get_async(lb.admin_url("/metrics"))
        clients = re.search(rb"^lb_client_connections (\S+)$", body, re.MULTILINE)
        assert clients is not None and float(clients.group(1)) >= 3, body[:2000]
    deadline = asyncio.get_running_loop().time() + 3 * UNIT
    while True:
        after = find_backend(await status(lb), "gateways", first.server_id)["connections"]
        if after <= baseline:
            break
        assert asyncio.get_running_loop().time() < deadline, f"connections stuck at {after} (baseline {baseline})"
        await asyncio.sleep(0.05)


async def test_metrics_exposition_names(lb: Balancer) -> None:
    """GET /metrics → Prometheus text with the lb_* metrics."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        await assert_echo(ws, b"\x00" * 1000)
        code, headers, body = await http_get_async(lb.admin_url("/metrics"))
    assert code == 200
    assert headers.get("Content-Type", "").startswith("text/plain")
    text = body.decode()
    for name in METRIC_NAMES:
        assert re.search(rf"^(# (HELP|TYPE) )?{name}[ {{]", text, re.MULTILINE), f"{name} missing"
    assert "lb_backend_up{" in text
