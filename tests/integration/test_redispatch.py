"""Where a pinned client lands (SPEC "Affinity semantics"):

- its backend gone, it is redispatched by its token: spread evenly over the survivors, always to the same one
  for the same token, and a second balancer instance sharing the keys picks that same one;
- the token works as X-LB-Affinity header or ?lb_affinity= query parameter just like the cookie, and neither
  reaches the backend;
- a backend that accepts TCP but never answers the handshake is abandoned within timeouts.backend_connect
  and the client is served by another one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import yarl

from tests.harness import COOKIE, UNIT
from tests.harness.clients import handshake_headers, http_get_async, set_cookies, status, tunnel, visit, wait_for_state
from tests.harness.ops import CARRIERS, HEADER, QUERY, BlackHole, set_state, token_of, visit_via, with_query
from tests.harness.processes import Balancer, Launcher, lb_config
from tests.harness.spy import SpyBackend

POOL = "gateways"
N_TOKENS = 120


async def whoami(url: str, token: str, sem: asyncio.Semaphore) -> tuple[str, str | None]:
    """Plain-HTTP request with the token as cookie: (server id, the new token if one was set)."""
    async with sem:
        code, headers, body = await http_get_async(url, cookie=token)
    assert code == 200, (code, body[:200])
    fresh = [c.value for c in set_cookies(headers) if c.name == COOKIE]
    return json.loads(body)["server_id"], (fresh[0] if fresh else None)


async def test_redispatch_spread_is_even_consistent_and_shared_by_instances(launcher: Launcher) -> None:
    """120 clients pinned to gw-1; gw-1 dies. They spread over gw-2..4 (none lopsided), each token always lands
    on the same survivor, and a second balancer with the same keys sends each token to that same survivor."""
    gateways = launcher.gateways(4)
    base = {"limits": {"handshake_rate_per_ip": 0}}
    config1 = lb_config(pools={POOL: gateways}, overrides=base)
    config2 = lb_config(pools={POOL: gateways}, keys=config1["affinity"]["secret_keys"], overrides=base)
    lb1, lb2 = launcher.balancers(config1, config2)
    doomed, survivors = gateways[0], gateways[1:]
    for lb in (lb1, lb2):
        lb.wait_states({(POOL, g.id): "up" for g in gateways})

    # Pin N_TOKENS fresh clients (each with its own session) to gw-1: the others drain meanwhile.
    for g in survivors:
        await set_state(lb1, g.id, "drain")
    sem = asyncio.Semaphore(8)
    url1, url2 = lb1.http_url("/whoami"), lb2.http_url("/whoami")

    async def new_client() -> str:
        async with sem:
            code, headers, body = await http_get_async(url1)
        assert code == 200 and json.loads(body)["server_id"] == doomed.id
        return next(c.value for c in set_cookies(headers) if c.name == COOKIE)

    tokens = await asyncio.gather(*(new_client() for _ in range(N_TOKENS)))
    assert len(set(tokens)) == N_TOKENS
    for g in survivors:
        await set_state(lb1, g.id, "enable")

    doomed.kill()
    await asyncio.gather(*(wait_for_state(lb, POOL, doomed.id, "down", within=10 * UNIT) for lb in (lb1, lb2)))

    first = await asyncio.gather(*(whoami(url1, t, sem) for t in tokens))
    spread = Counter(server for server, _ in first)
    assert set(spread) == {g.id for g in survivors}, f"redispatch must use every survivor: {dict(spread)}"
    # Expected 40 each; binomial sd ≈ 5.2, so these bounds are ~4 sd away.
    assert min(spread.values()) >= N_TOKENS // 6, f"lopsided redispatch: {dict(spread)}"
    assert max(spread.values()) <= N_TOKENS // 2, f"lopsided redispatch: {dict(spread)}"
    assert all(fresh is not None for _, fresh in first), "a redispatched client gets a replacement cookie"

    again = await asyncio.gather(*(whoami(url1, t, sem) for t in tokens))
    assert [s for s, _ in again] == [s for s, _ in first], "the same token must land on the same survivor"
    twin = await asyncio.gather(*(whoami(url2, t, sem) for t in tokens))
    differs = [i for i, ((a, _), (b, _)) in enumerate(zip(first, twin, strict=True)) if a != b]
    assert not differs, f"{len(differs)} tokens landed elsewhere on the second instance"

    # WebSocket clients are redispatched the same way, and the replacement cookie then sticks there.
    for token, (server, fresh) in list(zip(tokens, first, strict=True))[:6]:
        for lb in (lb1, lb2):
            assert (await visit(lb.ws_url(), cookie=token)).server_id == server
        assert fresh is not None
        assert (await visit(lb2.ws_url(), cookie=fresh)).server_id == server


async def test_header_and_query_tokens_stick_like_the_cookie(launcher: Launcher) -> None:
    """The token given on the 101 (Set-Cookie and X-LB-Affinity) pins the client whichever way it comes back,
    from any source address, without a new cookie."""
    gateways = launcher.gateways(3)
    overrides = {"limits": {"handshake_rate_per_ip": 0}, "affinity": {"header": HEADER}}
    lb = launcher.balancer(lb_config(pools={POOL: gateways}, overrides=overrides))
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    pinned: dict[str, str] = {}
    for _ in range(3):
        v = await visit(lb.ws_url())
        pinned[token_of(v)] = v.server_id
    assert len(set(pinned.values())) >= 2, "least_conn should spread three fresh clients"
    for token, server in pinned.items():
        for via in CARRIERS:
            for n in range(3):
                v = await visit_via(lb.ws_url(), token, via, source_ip=f"127.0.{10 + n}.{7 + len(via)}")
                assert v.server_id == server, f"token via {via} went to {v.server_id}, not {server}"
                assert v.cookie is None, "a valid token is kept, not replaced"
                assert COOKIE not in v.hello["cookies"]
    # Plain HTTP too.
    token, server = next(iter(pinned.items()))
    code, _, body = await http_get_async(lb.http_url("/whoami"), headers={HEADER: token})
    assert code == 200 and json.loads(body)["server_id"] == server
    code, _, body = await http_get_async(with_query(lb.http_url("/whoami?x=1"), token))
    assert code == 200 and json.loads(body)["server_id"] == server


async def test_header_and_query_tokens_never_reach_the_backend(launcher: Launcher) -> None:
    """X-LB-Affinity and ?lb_affinity= are removed from the forwarded request; other parameters stay."""
    spy: SpyBackend = launcher.spy()
    lb = launcher.balancer(lb_config(pools={"spy": [spy]}, overrides={"affinity": {"header": HEADER}}))
    lb.wait_states({("spy", spy.id): "up"})
    async with tunnel(lb.ws_url("/spy"), hello=False) as ws:
        token = handshake_headers(ws)[HEADER]
    before = len(spy.requests)
    async with tunnel(lb.ws_url(f"/spy?room=7&{QUERY}={token}&x=y"), hello=False, headers={HEADER: token}):
        pass
    seen = spy.requests[before:]
    assert len(seen) == 1
    assert seen[0].path == "/spy?room=7&x=y"
    assert seen[0].get_all(HEADER) == []
    assert all(token not in value for _, value in seen[0].headers)
    # The parameter's name form-encoded is the same parameter (yarl would decode `%5F` unless told).
    encoded = yarl.URL(lb.ws_url(f"/spy?room=7&lb%5Faffinity={token}"), encoded=True)
    async with tunnel(encoded, hello=False) as ws:  # type: ignore[arg-type]  # aiohttp takes a URL too
        assert "Set-Cookie" not in handshake_headers(ws), "the token routed: nothing issued afresh"
    assert spy.requests[-1].path == "/spy?room=7"


async def test_without_affinity_header_answers_carry_only_the_cookie(launcher: Launcher) -> None:
    """`affinity.header` unset (the default): the 101 is the backend's answer plus the cookie (SPEC), and a
    client's header of that name is nobody's: it reaches the backend as sent and routes nothing."""
    spy: SpyBackend = launcher.spy()
    lb = launcher.balancer(lb_config(pools={"spy": [spy]}))
    lb.wait_states({("spy", spy.id): "up"})
    async with tunnel(lb.ws_url("/spy"), hello=False) as ws:
        headers = handshake_headers(ws)
    assert HEADER not in headers and "Set-Cookie" in headers
    token = headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    async with tunnel(lb.ws_url("/spy"), hello=False, headers={HEADER: token}) as ws:
        assert "Set-Cookie" in handshake_headers(ws), "the header carried no token: one is issued"
    assert spy.requests[-1].get_all(HEADER) == [token]


def start_with_hung_backend(
    launcher: Launcher, hung: BlackHole, gw: Any, *, connect_timeout: str, **health: Any
) -> Balancer:
    """A round-robin pool of a hung backend and a gateway, both up under TCP checks (+ `health`)."""
    config = lb_config(
        pools={POOL: [hung, gw]},
        overrides={
            "timeouts": {"backend_connect": connect_timeout},
            # TCP checks: the hung backend looks healthy, as a wedged process would.
            "pools": {POOL: {"balance": "round_robin", "health_check": {"type": "tcp", **health}}},
            "limits": {"handshake_rate_per_ip": 0},
        },
    )
    config["pools"][POOL]["health_check"].pop("path", None)
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, hung.id): "up", (POOL, gw.id): "up"})
    return lb


async def test_backend_that_accepts_but_never_answers_is_retried_elsewhere(launcher: Launcher) -> None:
    """A hung gateway (TCP accepted, no answer) costs the client at most timeouts.backend_connect,
    then another backend serves it."""
    connect_timeout = 1.0
    hung = BlackHole("hung-1")
    try:
        (gw,) = launcher.gateways(1)
        lb = start_with_hung_backend(launcher, hung, gw, connect_timeout=f"{int(connect_timeout * 1000)}ms")

        timings = []
        for _ in range(3):
            started = time.monotonic()
            v = await visit(lb.ws_url(), within=connect_timeout + 5 * UNIT)
            timings.append(time.monotonic() - started)
            assert v.server_id == gw.id
            assert token_of(v)
        assert hung.requests_seen() >= 1, f"the hung backend was never tried (timings {timings})"
        assert max(timings) >= connect_timeout * 0.9, f"no attempt waited for the hung backend: {timings}"
        assert max(timings) <= connect_timeout + 2 * UNIT, f"retry took too long: {timings}"
    finally:
        launcher.close()
        hung.close()


async def test_redispatch_grace_keeps_the_cookie_of_a_briefly_down_backend(launcher: Launcher) -> None:
    """affinity.redispatch_grace: a client of a gateway that went down moments ago is served elsewhere but keeps
    its cookie, so it returns to its own gateway once that one is back."""
    gateways = launcher.gateways(3)
    lb = launcher.balancer(
        lb_config(
            pools={POOL: gateways},
            overrides={"affinity": {"redispatch_grace": "30s"}, "limits": {"handshake_rate_per_ip": 0}},
        )
    )
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    first = await visit(lb.ws_url())
    token = token_of(first)
    home = next(g for g in gateways if g.id == first.server_id)

    home.kill()
    await wait_for_state(lb, POOL, home.id, "down", within=10 * UNIT)
    away = [await visit(lb.ws_url(), cookie=token) for _ in range(3)]
    assert all(v.server_id != home.id for v in away)
    assert len({v.server_id for v in away}) == 1, "the same token lands on the same survivor"
    assert all(v.cookie is None for v in away), "within the grace the client keeps its cookie"

    home.start()
    await wait_for_state(lb, POOL, home.id, "up", within=10 * UNIT)
    assert (await visit(lb.ws_url(), cookie=token)).server_id == home.id


async def test_failed_handshakes_take_a_gateway_down_though_its_checks_pass_between_them(launcher: Launcher) -> None:
    """A gateway whose checks pass (TCP here, its /health in the field) while its handshakes hang: passive
    health counts the handshakes apart from the checks, so five checks passing between two failed
    handshakes do not undo them (with one count for both, it never went down)."""
    hung = BlackHole("hung-1")
    try:
        (gw,) = launcher.gateways(1)
        lb = start_with_hung_backend(launcher, hung, gw, connect_timeout="500ms", interval="100ms", fall=2, rise=100)
        for _ in range(4):
            assert (await visit(lb.ws_url(), within=5 * UNIT)).server_id == gw.id
        await wait_for_state(lb, POOL, hung.id, "down", within=2 * UNIT)
        backends = {b["id"]: b for b in (await status(lb))["pools"][POOL]["backends"]}
        assert backends[hung.id]["reason"].startswith("handshake failed 2 time(s) in a row: ")
    finally:
        launcher.close()
        hung.close()


async def test_backend_failing_handshakes_is_marked_down_before_the_next_active_check(launcher: Launcher) -> None:
    """Passive health: handshakes that time out on a gateway count as failed checks, so it turns down
    long before the next (slow) active check would notice, and clients go elsewhere meanwhile."""
    hung = BlackHole("hung-1")
    try:
        (gw,) = launcher.gateways(1)
        lb = start_with_hung_backend(launcher, hung, gw, connect_timeout="500ms", interval="60s", fall=2)
        for _ in range(4):
            assert (await visit(lb.ws_url(), within=5 * UNIT)).server_id == gw.id
        await wait_for_state(lb, POOL, hung.id, "down", within=2 * UNIT)
        backends = {b["id"]: b for b in (await status(lb))["pools"][POOL]["backends"]}
        assert "handshake failed" in backends[hung.id]["reason"]
    finally:
        launcher.close()
        hung.close()
