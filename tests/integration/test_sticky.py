"""SPEC "Affinity semantics": the cookie on the 101, stickiness across source IPs, bad tokens, redispatch.

Most tests share the session stack.  Three more balancers on the same gateways act as other
instances: `twin` shares the keys (signing with the second, so the rotation path is exercised,
and with a 2 s max_age for the expiry test), `foreign` has keys of its own, and `stranger`
shares the keys but names gw-1's address `gw-9`, which the main balancer does not know.  A
fourth, `short`, has keys of its own and a max_age of 1 s, for expiry to the millisecond.
The redispatch test kills a gateway, so it starts a stack of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from lb.affinity.codec import Claim, TokenCodec
from tests.harness import APP_COOKIE, COOKIE, UNIT
from tests.harness.clients import (
    affinity_cookie,
    http_get_async,
    recv_hello,
    set_cookies,
    source_ips,
    visit,
    wait_for_state,
    ws_connect,
)
from tests.harness.ops import launched
from tests.harness.processes import STEADY_HEALTH, Balancer, DeadBackend, Launcher, Stack, lb_config, new_key

SPEC_ATTRS = {"path=/", "max-age=3600", "httponly", "samesite=Lax"}
TWIN_MAX_AGE = 2  # seconds
SHORT_MAX_AGE = 1.0  # seconds


@dataclass
class Others:
    twin: Balancer
    foreign: Balancer
    stranger: Balancer
    short: Balancer


@pytest.fixture(scope="module")
def others(_shared_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Others]:
    stack = _shared_stack
    keys = stack.balancer.keys
    gateways = {"gateways": stack.gateways}
    routes = {"/ws": "gateways", "/whoami": "gateways"}
    with launched(tmp_path_factory, "sticky-others") as launcher:
        twin, foreign, stranger, short = launcher.balancers(
            lb_config(
                pools=gateways,
                routes=routes,
                keys=[keys[1], keys[0]],
                health=STEADY_HEALTH,
                overrides={"affinity": {"max_age": f"{TWIN_MAX_AGE}s"}},
            ),
            lb_config(pools=gateways, routes=routes, keys=[new_key()], health=STEADY_HEALTH),
            lb_config(
                pools={"gateways": [_Alias("gw-9", stack.gateways[0].address)]},
                routes=routes,
                keys=keys,
                health=STEADY_HEALTH,
            ),
            lb_config(
                pools=gateways,
                routes=routes,
                keys=[new_key()],
                health=STEADY_HEALTH,
                overrides={"affinity": {"max_age": f"{int(SHORT_MAX_AGE * 1000)}ms"}},
            ),
            names=["twin", "foreign", "stranger", "short"],
        )
        for balancer in (twin, foreign, short):
            balancer.wait_states({("gateways", g.id): "up" for g in stack.gateways})
        stranger.wait_states({("gateways", "gw-9"): "up"})
        yield Others(twin, foreign, stranger, short)


@dataclass(frozen=True)
class _Alias:
    id: str
    address: str


async def _pin(lb: Balancer, **kwargs: object) -> tuple[str, str]:
    """A new client's first visit: returns (server id, token)."""
    first = await visit(lb.ws_url(), **kwargs)  # type: ignore[arg-type]
    assert first.cookie is not None, f"no {COOKIE} Set-Cookie on the 101: {first.headers}"
    return first.server_id, first.cookie.value


async def test_new_client_gets_cookie_on_101(lb: Balancer) -> None:
    """A new client gets `Set-Cookie: <cookie>=<token>; Path=/; Max-Age; HttpOnly; SameSite` on the 101."""
    result = await visit(lb.ws_url())
    cookie = result.cookie
    assert cookie is not None, f"no {COOKIE} Set-Cookie on the 101: {result.headers}"
    assert cookie.value
    assert cookie.normalized_attrs() == SPEC_ATTRS, cookie.attrs  # and no Secure on a plain listener
    assert "gw-" not in cookie.value, "the token must not name the backend in clear"


async def test_backend_set_cookie_is_kept(lb: Balancer) -> None:
    """The backend's own Set-Cookie headers are kept beside ours on the 101."""
    result = await visit(lb.ws_url())
    names = [c.name for c in set_cookies(result.headers)]
    assert COOKIE in names and APP_COOKIE in names, names
    assert result.hello["app_cookie_set"] == next(c.value for c in set_cookies(result.headers) if c.name == APP_COOKIE)


async def test_twenty_reconnects_from_twenty_source_ips_reach_one_gateway(lb: Balancer) -> None:
    """A valid token routes to its backend from any client IP."""
    server_id, token = await _pin(lb)
    for ip in source_ips(20):
        again = await visit(lb.ws_url(), cookie=token, source_ip=ip)
        assert again.server_id == server_id, f"reconnect from {ip} went to {again.server_id}, not {server_id}"
        assert again.hello["forwarded_for"] == ip  # the source address really changed
        if again.cookie is not None:  # a refreshed cookie is allowed; it must keep the pin
            token = again.cookie.value


async def test_clients_without_cookie_spread_over_all_gateways(stack: Stack) -> None:
    """Handshakes without a token are balanced over every healthy backend."""
    seen: Counter[str] = Counter()
    async with contextlib.AsyncExitStack() as open_tunnels:
        for _ in range(3 * len(stack.gateways)):
            ws, headers = await open_tunnels.enter_async_context(ws_connect(stack.balancer.ws_url()))
            seen[(await recv_hello(ws))["server_id"]] += 1
            assert affinity_cookie(headers) is not None
    assert set(seen) == stack.ids, seen


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t[:10] + ("A" if t[10] != "A" else "B") + t[11:], id="one-char-flipped"),
        pytest.param(lambda t: t[:-4], id="truncated"),
        pytest.param(lambda t: t + "AAAA", id="extended"),
        pytest.param(lambda t: "not-a-token", id="garbage"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: "%%%;,", id="bad-chars"),
    ],
)
async def test_tampered_token_gets_fresh_cookie_and_works(lb: Balancer, mangle: object) -> None:
    """A tampered token is treated as absent: a fresh cookie and a working connection, never an error."""
    _, token = await _pin(lb)
    bad = mangle(token)  # type: ignore[operator]
    result = await visit(lb.ws_url(), cookie=f"{COOKIE}={bad}")
    assert result.cookie is not None, "a fresh cookie must replace a tampered token"
    assert result.cookie.value != bad
    again = await visit(lb.ws_url(), cookie=result.cookie.value)
    assert again.server_id == result.server_id, "the fresh cookie must pin"


async def test_foreign_key_token_gets_fresh_cookie_and_works(lb: Balancer, others: Others) -> None:
    """A token sealed with a key we do not hold is treated as absent."""
    _, foreign_token = await _pin(others.foreign)
    result = await visit(lb.ws_url(), cookie=foreign_token)
    assert result.cookie is not None and result.cookie.value != foreign_token
    assert (await visit(lb.ws_url(), cookie=result.cookie.value)).server_id == result.server_id


async def test_unknown_backend_token_gets_fresh_cookie_and_works(lb: Balancer, others: Others) -> None:
    """A valid token naming a backend we do not have is treated as absent."""
    server_id, token = await _pin(others.stranger)
    assert server_id == "gw-1"  # the stranger calls gw-1 "gw-9"
    result = await visit(lb.ws_url(), cookie=token)
    assert result.cookie is not None and result.cookie.value != token


async def test_instances_sharing_keys_honour_each_others_tokens(lb: Balancer, others: Others) -> None:
    """A valid token routes the same through any balancer instance that shares the keys (any key verifies)."""
    server_id, token = await _pin(lb)  # sealed with our first key
    for _ in range(3):
        assert (await visit(others.twin.ws_url(), cookie=token)).server_id == server_id
    server_id, token = await _pin(others.twin)  # sealed with our second key
    for _ in range(3):
        assert (await visit(lb.ws_url(), cookie=token)).server_id == server_id


async def test_expired_token_gets_fresh_cookie(others: Others) -> None:
    """A token older than max_age is treated as absent (Max-Age on the cookie says the same)."""
    twin = others.twin
    first = await visit(twin.ws_url())
    assert first.cookie is not None
    assert f"max-age={TWIN_MAX_AGE}" in first.cookie.normalized_attrs()
    fresh = await visit(twin.ws_url(), cookie=first.cookie.value)
    assert fresh.server_id == first.server_id
    await asyncio.sleep(TWIN_MAX_AGE + 1.5)
    late = await visit(twin.ws_url(), cookie=first.cookie.value)
    assert late.cookie is not None, "an expired token must be replaced"
    assert late.cookie.value != first.cookie.value


def _claim(balancer: Balancer, token: str) -> Claim:
    """What `token` (issued by `balancer` just now) says, read with its keys."""
    return TokenCodec(balancer.keys, SHORT_MAX_AGE).open(token, time.time())


async def test_a_client_back_just_past_max_age_gets_a_fresh_choice_every_time(others: Others) -> None:
    """SPEC: an expired token is treated as absent.  max_age 1 s: a client back 1.2 s after it got its cookie
    gets a fresh choice (a new session) and a fresh cookie, whatever the fraction of the second it was issued
    in (issue times in whole seconds, rounded up, let the token open for up to 1 s more)."""
    short = others.short

    async def returns_late(delay: float) -> None:
        await asyncio.sleep(delay)  # five clients, 0.2 s apart: issue times over the whole of a second
        first = await visit(short.ws_url())
        got_it = time.time()
        assert first.cookie is not None
        claim = _claim(short, first.cookie.value)
        await asyncio.sleep(got_it + SHORT_MAX_AGE + 0.2 - time.time())
        late = await visit(short.ws_url(), cookie=first.cookie.value)
        assert late.cookie is not None, f"a token {time.time() - got_it:.3f} s old must be replaced"
        assert _claim(short, late.cookie.value).session != claim.session, "a fresh choice, not a re-issue"

    await asyncio.wait_for(asyncio.gather(*(returns_late(0.2 * n) for n in range(5))), 20 * UNIT)


async def test_a_client_back_within_max_age_keeps_its_backend_and_is_re_issued_past_half_its_life(
    others: Others,
) -> None:
    """A valid token routes to its backend: back at a quarter of max_age (1 s) with the same cookie and no new
    one; back at three quarters, past half its life, with a re-issued cookie for the same backend and session."""
    short = others.short
    checked = {"young": 0, "past half": 0}
    for _ in range(5):  # a slow machine may blur an attempt's ages; each attempt checks what it can
        first = await visit(short.ws_url())
        assert first.cookie is not None
        token = first.cookie.value
        claim = _claim(short, token)
        for name, at in (("young", 0.25), ("past half", 0.75)):
            await asyncio.sleep(claim.issued_at + at * SHORT_MAX_AGE - time.time())
            sent = time.time()
            again = await visit(short.ws_url(), cookie=token)
            # The token's age when the balancer read it: between these two.
            youngest, oldest = sent - claim.issued_at, time.time() - claim.issued_at
            if oldest < SHORT_MAX_AGE:
                assert again.server_id == first.server_id, f"{name}: {youngest:.3f} to {oldest:.3f} s old"
            if name == "young" and oldest < SHORT_MAX_AGE / 2:
                assert again.cookie is None, f"not past half its life ({oldest:.3f} s), yet re-issued"
                checked[name] += 1
            elif name == "past half" and youngest > SHORT_MAX_AGE / 2 and oldest < SHORT_MAX_AGE:
                assert again.cookie is not None, f"past half its life ({youngest:.3f} s), not re-issued"
                fresh = _claim(short, again.cookie.value)
                assert (fresh.backend_id, fresh.session) == (claim.backend_id, claim.session)
                assert fresh.issued_at > claim.issued_at
                checked[name] += 1
        if all(checked.values()):
            return
    raise AssertionError(f"too slow to check both ages in 5 attempts: {checked}")


async def test_affinity_cookie_not_forwarded_other_cookies_are(lb: Balancer) -> None:
    """insert mode: our cookie is removed from the forwarded request; other cookies pass."""
    server_id, token = await _pin(lb)
    result = await visit(lb.ws_url(), cookie=f"theme=dark; {COOKIE}={token}; {APP_COOKIE}=abc; lang=fr")
    assert result.server_id == server_id
    assert result.hello["cookies"] == sorted(["theme", APP_COOKIE, "lang"])
    assert result.hello["app_cookie"] == "abc"
    only_ours = await visit(lb.ws_url(), cookie=token)
    assert COOKIE not in only_ours.hello["cookies"]


async def test_forwarded_cookie_header_keeps_other_cookies_byte_for_byte(stack: Stack) -> None:
    """Other cookies reach the backend unchanged (raw view from the spy backend)."""
    lb, spy = stack.balancer, stack.spy
    async with ws_connect(lb.ws_url("/spy/ws")) as (_, headers):
        cookie = affinity_cookie(headers)
    assert cookie is not None
    before = len(spy.requests)
    async with ws_connect(lb.ws_url("/spy/ws"), cookie=f'a=1; {COOKIE}={cookie.value}; b="two"') as _:
        pass
    seen = spy.requests[before:]
    assert len(seen) == 1
    assert seen[0].get_all("Cookie") == ['a=1; b="two"']


async def test_plain_http_gets_cookie_and_sticks(lb: Balancer) -> None:
    """A plain HTTP request is balanced and pinned like a handshake, from any source IP."""
    code, headers, body = await http_get_async(lb.http_url("/whoami"))
    assert code == 200, body
    cookie = affinity_cookie(headers)
    assert cookie is not None, dict(headers)
    assert cookie.normalized_attrs() == SPEC_ATTRS
    server_id = json.loads(body)["server_id"]
    for ip in source_ips(5, start=40):
        code, headers, body = await http_get_async(lb.http_url("/whoami/details"), cookie=cookie.value, source_ip=ip)
        assert code == 200
        data = json.loads(body)
        assert data["server_id"] == server_id
        assert COOKIE not in data["cookies"]
    # and the same cookie pins the WebSocket too
    assert (await visit(lb.ws_url(), cookie=cookie.value)).server_id == server_id


async def test_killed_pinned_gateway_is_redispatched_with_new_cookie(launcher: Launcher) -> None:
    """A token for a `down` backend is redispatched to a healthy one and the cookie is replaced."""
    gateways = launcher.gateways(3)
    lb = launcher.balancer(lb_config(pools={"gateways": gateways}, routes={"/ws": "gateways"}))
    for g in gateways:
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    server_id, token = await _pin(lb)
    pinned = next(g for g in gateways if g.id == server_id)

    pinned.kill()
    await wait_for_state(lb, "gateways", server_id, "down", within=5 * UNIT)
    moved = await visit(lb.ws_url(), cookie=token, source_ip="127.0.0.9")
    assert moved.server_id != server_id
    assert moved.cookie is not None and moved.cookie.value != token, "the cookie must be replaced"
    for ip in source_ips(3, start=60):
        assert (await visit(lb.ws_url(), cookie=moved.cookie.value, source_ip=ip)).server_id == moved.server_id

    pinned.start()
    await wait_for_state(lb, "gateways", server_id, "up", within=5 * UNIT)
    # The client now holds a cookie for the new backend and stays there.
    assert (await visit(lb.ws_url(), cookie=moved.cookie.value)).server_id == moved.server_id


async def test_all_backends_down_token_holder_gets_503(launcher: Launcher) -> None:
    """With no healthy backend, even a token holder gets 503 (never a stale route or a crash)."""
    gateways = launcher.gateways(1)
    dead = DeadBackend("gw-dead")
    lb = launcher.balancer(lb_config(pools={"gateways": [*gateways, dead]}, routes={"/ws": "gateways"}))
    await wait_for_state(lb, "gateways", "gw-1", "up", within=10 * UNIT)
    _, token = await _pin(lb)
    gateways[0].kill()
    await wait_for_state(lb, "gateways", "gw-1", "down", within=5 * UNIT)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with ws_connect(lb.ws_url(), cookie=token):
            pass
    assert info.value.status == 503
    assert info.value.headers is not None and "Retry-After" in info.value.headers
