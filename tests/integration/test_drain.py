"""SPEC "Backend states (admin API)", the operator side: drain, disable, enable, bearer auth, and drain with
`close_after`/`rate` (tunnels closed with 1012 a few at a time; their reconnects land elsewhere).

One module stack: gw-1..3 behind one balancer (least_conn, insert mode).  Each test puts every backend back
to `enable` when it ends.  Slow start needs its own pool setting, so it starts a stack of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import yaml

from tests.harness import ROOT, UNIT
from tests.harness.clients import assert_echo, client_session, find_backend, recv_hello, status, visit, ws_connect
from tests.harness.ops import (
    CARRIERS,
    OpsStack,
    admin_post,
    admin_request,
    launched,
    set_state,
    started_stack,
    token_of,
    visit_via,
    wait_close,
)
from tests.harness.processes import Balancer, child_env, lb_config

POOL = "gateways"


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    with started_stack(tmp_path_factory.mktemp("drain")) as stack:
        yield stack


@pytest.fixture
async def lb(ops: OpsStack) -> AsyncIterator[Balancer]:
    """The module's balancer; every backend is enabled again after the test."""
    ops.balancer.assert_alive()
    try:
        yield ops.balancer
    finally:
        for backend_id in ops.ids:
            with contextlib.suppress(Exception):
                await set_state(ops.balancer, backend_id, "enable")


async def pinned_token(lb: Balancer) -> tuple[str, str]:
    """A fresh client's (backend id, token)."""
    v = await visit(lb.ws_url())
    return v.server_id, token_of(v)


async def new_clients(lb: Balancer, n: int) -> Counter[str]:
    """Where n clients without a token land (each closes before the next comes)."""
    return Counter([(await visit(lb.ws_url())).server_id for _ in range(n)])


async def hold_new_clients(lb: Balancer, n: int) -> Counter[str]:
    """Where n clients without a token land when they connect at once and stay connected."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_one() -> str:
            ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))
            return str((await recv_hello(ws))["server_id"])

        return Counter(await asyncio.gather(*(open_one() for _ in range(n))))


async def backend_state(lb: Balancer, backend_id: str) -> dict[str, object]:
    return find_backend(await status(lb), POOL, backend_id)


# ---------------------------------------------------------------------------------------------------
# admin auth and answers


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Bearer ", "Basic dXNlcjpwYXNz", "bearer"],
    ids=["missing", "wrong", "empty", "basic", "scheme only"],
)
async def test_admin_post_without_the_right_token_is_401_and_changes_nothing(
    lb: Balancer, ops: OpsStack, authorization: str | None
) -> None:
    """POST drain|disable|enable needs `Authorization: Bearer <admin.token>`: 401 otherwise, state unchanged."""
    target = ops.ids[0]
    for action in ("drain", "disable"):
        path = f"/pools/{POOL}/backends/{target}/{action}"
        if authorization is None:
            code, _, _ = await admin_post(lb, path, token=None)
        else:
            code, _, _ = await _post_raw_auth(lb, path, authorization)
        assert code == 401, f"{action} with Authorization {authorization!r} answered {code}"
    assert (await backend_state(lb, target))["state"] == "up"


async def _post_raw_auth(lb: Balancer, path: str, authorization: str) -> tuple[int, str, dict[str, str]]:
    async with client_session() as session:
        async with asyncio.timeout(5 * UNIT):
            async with session.post(lb.admin_url(path), headers={"Authorization": authorization}) as reply:
                return reply.status, await reply.text(), dict(reply.headers)


@pytest.mark.parametrize(
    "path",
    [
        "/pools/nope/backends/gw-1/drain",
        "/pools/gateways/backends/gw-9/drain",
        "/pools/gateways/backends/gw-1/explode",
    ],
    ids=["unknown pool", "unknown backend", "unknown action"],
)
async def test_admin_unknown_target_is_404(lb: Balancer, path: str) -> None:
    """Unknown pool, backend or action → 404 (with a valid token), nothing changes."""
    code, _, _ = await admin_post(lb, path)
    assert code == 404
    states = {b["id"]: b["state"] for b in (await status(lb))["pools"][POOL]["backends"]}
    assert set(states.values()) == {"up"}, states


@pytest.mark.parametrize(
    "params",
    [{"rate": "0"}, {"rate": "fast"}, {"close_after": "soon"}, {"rate": "-3"}],
    ids=["rate 0", "rate word", "bad duration", "negative rate"],
)
async def test_admin_bad_migration_params_are_400(lb: Balancer, ops: OpsStack, params: dict[str, str]) -> None:
    """A drain with a bad `rate` or `close_after` is a 400 and leaves the backend `up`."""
    code, body, _ = await admin_post(lb, f"/pools/{POOL}/backends/{ops.ids[0]}/drain", params=params)
    assert code == 400, body
    assert (await backend_state(lb, ops.ids[0]))["state"] == "up"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [('{"rate": 0}', "application/json"), ('["drain"]', "application/json"), ("{not json", "application/json")],
    ids=["rate 0", "not an object", "not json"],
)
async def test_admin_bad_json_body_is_400(lb: Balancer, ops: OpsStack, body: str, content_type: str) -> None:
    """The migration parameters may come as a JSON body; a bad one is 400, nothing changes."""
    reply = await admin_request(
        lb, "POST", f"/pools/{POOL}/backends/{ops.ids[0]}/drain", data=body, headers={"Content-Type": content_type}
    )
    assert reply.status == 400, reply.text
    assert (await backend_state(lb, ops.ids[0]))["state"] == "up"


async def test_admin_401_names_the_bearer_scheme(lb: Balancer, ops: OpsStack) -> None:
    """401 answers carry `WWW-Authenticate: Bearer` (RFC 6750 §3)."""
    code, _, headers = await admin_post(lb, f"/pools/{POOL}/backends/{ops.ids[0]}/enable", token="nope")
    assert code == 401
    assert headers.get("WWW-Authenticate", "").lower().startswith("bearer"), headers


async def test_admin_answers_pool_id_and_new_state(lb: Balancer, ops: OpsStack) -> None:
    """200 with {"pool", "id", "state"} for each action, and /status agrees."""
    target = ops.ids[1]
    for action, state in (("drain", "draining"), ("disable", "disabled"), ("enable", "up")):
        body = await set_state(lb, target, action)
        assert body["state"] == state
        assert (await backend_state(lb, target))["state"] == state


# ---------------------------------------------------------------------------------------------------
# drain, disable, enable


async def test_drain_keeps_cookie_holders_and_tunnels_but_takes_no_new_clients(lb: Balancer) -> None:
    """draining: new clients avoid it; clients whose cookie names it still reach it; open tunnels keep echoing."""
    drained, token = await pinned_token(lb)
    async with ws_connect(lb.ws_url(), cookie=token) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == drained
        await set_state(lb, drained, "drain")
        assert (await backend_state(lb, drained))["state"] == "draining"

        landed = await new_clients(lb, 9)
        assert drained not in landed, f"new clients reached draining {drained}: {dict(landed)}"
        assert len(landed) == 2, f"new clients should spread over the two others: {dict(landed)}"

        for via in CARRIERS:
            again = await visit_via(lb.ws_url(), token, via)
            assert again.server_id == drained, f"cookie holder ({via}) went to {again.server_id}"
            assert again.cookie is None, "a hit on a draining backend keeps the client's cookie"

        await assert_echo(ws, "still here while draining")
        await assert_echo(ws, b"\x00binary\xff")


async def test_disable_redispatches_cookie_holders_and_keeps_tunnels(lb: Balancer) -> None:
    """disabled: its cookie holders go elsewhere with a fresh cookie; a live tunnel is not cut."""
    disabled, token = await pinned_token(lb)
    async with ws_connect(lb.ws_url(), cookie=token) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == disabled
        await set_state(lb, disabled, "disable")

        moved = await visit(lb.ws_url(), cookie=token)
        assert moved.server_id != disabled
        new_token = token_of(moved)
        assert new_token != token
        # The fresh cookie sticks to the new backend.
        assert (await visit(lb.ws_url(), cookie=new_token)).server_id == moved.server_id
        assert disabled not in await new_clients(lb, 6)

        await assert_echo(ws, "tunnel survives disable")
    assert (await backend_state(lb, disabled))["redispatches"] == 0, "redispatches count where clients went"
    assert (await backend_state(lb, moved.server_id))["redispatches"] >= 1


async def test_enable_brings_back_new_clients_and_old_cookie_holders(lb: Balancer, ops: OpsStack) -> None:
    """enable after disable: the backend takes new clients again, and a token naming it sticks to it again."""
    target, token = await pinned_token(lb)
    await set_state(lb, target, "disable")
    assert (await visit(lb.ws_url(), cookie=token)).server_id != target
    body = await set_state(lb, target, "enable")
    assert body["state"] == "up"
    assert (await visit(lb.ws_url(), cookie=token)).server_id == target
    landed = await new_clients(lb, 9)
    assert set(landed) == set(ops.ids), f"after enable all three take new clients: {dict(landed)}"


# ---------------------------------------------------------------------------------------------------
# drain with close_after and rate


async def test_drain_with_close_after_and_rate_closes_tunnels_with_1012_then_reconnects_land_elsewhere(
    lb: Balancer,
) -> None:
    """After close_after the drained backend's tunnels get close 1012, about `rate` per second; other tunnels
    are untouched; each client reconnecting with the token it holds (cookie, header or query) lands on
    another backend and gets a fresh cookie."""
    drained, token = await pinned_token(lb)
    for _ in range(8):  # least_conn takes turns: the next fresh client or so lands elsewhere
        other, other_token = await pinned_token(lb)
        if other != drained:
            break
    assert other != drained, f"8 fresh clients all landed on {drained}"
    n, rate, close_after = 4, 4.0, 0.3
    async with contextlib.AsyncExitStack() as stack:
        tunnels = []
        for _ in range(n):
            ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=token))
            assert (await recv_hello(ws))["server_id"] == drained
            tunnels.append(ws)
        bystander, _ = await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=other_token))
        assert (await recv_hello(bystander))["server_id"] == other

        asked = time.monotonic()
        body = await set_state(lb, drained, "drain", params={"close_after": "300ms", "rate": str(rate)})
        assert body["state"] == "draining"
        closes = await asyncio.gather(*(wait_close(ws, 6 * UNIT) for ws in tunnels))

        assert [c.code for c in closes] == [1012] * n, closes
        times = sorted(c.at - asked for c in closes)
        assert times[0] >= close_after - 0.05, f"first close {times[0]:.3f}s after the drain, before close_after"
        nominal = (n - 1) / rate
        assert times[-1] - times[0] >= 0.6 * nominal, f"{n} closes at {rate}/s came too fast: {times}"
        assert times[-1] <= 3 * UNIT + close_after, f"closes took too long: {times}"

        await assert_echo(bystander, "the other backend's tunnel is untouched")

    # Reconnects with the token each client held: no longer the drained backend, a fresh cookie each.
    for via in (*CARRIERS, "cookie"):
        again = await visit_via(lb.ws_url(), token, via)
        assert again.server_id != drained, f"reconnect ({via}) went back to the migrating backend"
        assert token_of(again) != token
    assert (await backend_state(lb, drained))["state"] == "draining"


async def test_drain_1012_lands_between_frames_of_a_busy_tunnel(lb: Balancer) -> None:
    """The 1012 close is put between two of the backend's frames even when the drain hits mid-frame: here the
    client stops reading while 1 MiB echoes pile up (the balancer then holds a part-relayed frame), and on
    reading again it sees only whole, correct echoes, then the close."""
    drained, token = await pinned_token(lb)
    n = 24

    def payload(i: int) -> bytes:
        return i.to_bytes(4, "big") * (256 * 1024)

    async with ws_connect(lb.ws_url(), cookie=token) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == drained

        async def send_all() -> None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                for i in range(n):
                    await ws.send_bytes(payload(i))

        sender = asyncio.create_task(send_all())
        try:
            await asyncio.sleep(0.3)  # not reading: buffers fill up and the relay stalls mid-frame
            await set_state(lb, drained, "drain", params={"close_after": "0s", "rate": "50"})
            echoed = 0
            async with asyncio.timeout(15 * UNIT):
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        break
                    assert msg.data == payload(echoed), f"echo {echoed} is not what was sent"
                    echoed += 1
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        assert msg.type is aiohttp.WSMsgType.CLOSE, f"after {echoed} echoes: {msg.type!r} {msg.data!r}"
        assert msg.data == 1012, (msg.data, msg.extra)
    assert echoed < n, "the close came only after every echo: the drain did not hit mid-stream"


# ---------------------------------------------------------------------------------------------------
# slow start


SLOW_START = 2.0


async def test_reenabled_backend_slow_start_takes_fewer_new_clients(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pools.NAME.slow_start: 2s — a backend enabled again takes clearly fewer of the next new clients
    than its peers at first (least_conn weighs live connections by the ramped weight), and its full share
    once the window has passed."""
    with launched(tmp_path_factory, "slow-start") as launcher:
        gateways = launcher.gateways(3)
        config = lb_config(
            pools={POOL: gateways},
            overrides={
                "pools": {POOL: {"slow_start": f"{int(SLOW_START * 1000)}ms"}},
                "limits": {"handshake_rate_per_ip": 0},
            },
        )
        path = launcher.workdir / "slow-start.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        checked = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "lb", "validate", "--config", str(path)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, f"lb validate refuses slow_start: {checked.stdout}{checked.stderr}"
        lb = launcher.balancer(config)
        lb.wait_states({(POOL, g.id): "up" for g in gateways})
        ramped = gateways[2].id
        await set_state(lb, ramped, "disable")
        await set_state(lb, ramped, "enable")
        enabled_at = time.monotonic()

        first = await hold_new_clients(lb, 12)
        peers = [first[g.id] for g in gateways if g.id != ramped]
        assert first[ramped] <= 2 and first[ramped] < min(peers), f"slow start ignored: {dict(first)}"

        # Once the window has passed, it takes its full share again.
        await asyncio.sleep(max(0.0, enabled_at + SLOW_START + 0.3 - time.monotonic()))
        later = await hold_new_clients(lb, 12)
        assert later[ramped] >= 3, f"still ramping after the slow_start window: {dict(later)}"
        entry = find_backend(await status(lb), POOL, ramped)
        assert entry["effective_weight"] == entry["weight"], entry
