"""SPEC "Affinity semantics", rewrite mode: the backend's own cookie (`affinity.cookie: SESSIONID`) carries the
route.  On the way out its value is replaced by a token; on the way in the token is replaced by the value,
so the backend always sees exactly what it set, from any client address.

Module stack: gw-1..3 started with `--app-cookie SESSIONID`, one balancer in rewrite mode.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from lb.affinity.codec import Claim, TokenCodec
from tests.harness.clients import affinity_cookie, http_get_async, set_cookies, source_ips, visit
from tests.harness.ops import HEADER, OpsStack, set_state, started_stack, visit_via
from tests.harness.processes import Balancer

APP = "SESSIONID"


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    overrides = {"affinity": {"mode": "rewrite", "cookie": APP}}
    with started_stack(tmp_path_factory.mktemp("rewrite"), app_cookie=APP, overrides=overrides) as stack:
        yield stack


@pytest.fixture
def lb(ops: OpsStack) -> Balancer:
    ops.balancer.assert_alive()
    return ops.balancer


async def first_contact(lb: Balancer) -> tuple[str, str, str]:
    """A new client: (server id, the session value the gateway set, the token the client got instead)."""
    v = await visit(lb.ws_url())
    planted = v.hello["app_cookie_set"]
    assert isinstance(planted, str) and planted, f"the gateway set no {APP}: {v.hello}"
    assert v.hello["app_cookie"] is None
    client = affinity_cookie(v.headers, APP)
    assert client is not None, f"no {APP} Set-Cookie reached the client: {dict(v.headers)}"
    return v.server_id, planted, client.value


async def test_rewrite_round_trip_backend_sees_exactly_the_value_it_set(lb: Balancer) -> None:
    """Out: SESSIONID=<value> becomes SESSIONID=<token> (SPEC's attributes, no LB_AFFINITY cookie).
    In: the token goes back to the same gateway as the value it set."""
    v = await visit(lb.ws_url())
    planted = v.hello["app_cookie_set"]
    cookies = set_cookies(v.headers)
    assert [c.name for c in cookies] == [APP], f"only the backend's own cookie, rewritten: {cookies}"
    token = cookies[0].value
    assert token != planted, "the client must get a token, not the backend's raw value"
    assert planted not in token
    # SPEC's cookie line: `<cookie>=<token>; Path=/; Max-Age=<max_age>; HttpOnly; SameSite=<same_site>`.
    assert cookies[0].attrs == ("Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"), cookies[0]
    assert v.headers.get(HEADER) == token

    again = await visit(lb.ws_url(), cookie={APP: token})
    assert again.server_id == v.server_id
    assert again.hello["app_cookie"] == planted
    assert again.hello["app_cookie_set"] is None, "the gateway recognised its session and set no new one"
    assert set_cookies(again.headers) == [], "nothing new to set on a sticky reconnect"


def _flipped(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("B" if token[middle] == "A" else "A") + token[middle + 1 :]


def _foreign(token: str) -> str:
    """A token of the same layout sealed with a key this balancer does not hold (another deployment's)."""
    claim = Claim(backend_id="gw-1", issued_at=int(time.time()), session=bytes(8), app_value="x", pool="gateways")
    return TokenCodec(["somebody-elses-key"], 3600).seal(claim, bytes(12))


@pytest.mark.parametrize("mangle", [_flipped, lambda t: t + "AAAA", _foreign], ids=["tampered", "extended", "foreign"])
async def test_rewrite_mode_a_broken_token_is_treated_as_absent(lb: Balancer, mangle: Callable[[str], str]) -> None:
    """SPEC: a tampered or foreign-key token is treated as absent, a fresh choice and a fresh cookie; the backend
    sees only values it set.  So it gets no session cookie, plants a new one, and the client's new token sticks."""
    _, _, token = await first_contact(lb)
    broken = mangle(token)
    fresh_visit = await visit(lb.ws_url(), cookie={APP: broken})
    assert fresh_visit.hello["app_cookie"] is None, "a value the backend never set must not reach it"
    planted = fresh_visit.hello["app_cookie_set"]
    assert planted, "the backend saw no session, so it plants one"
    fresh = affinity_cookie(fresh_visit.headers, APP)
    assert fresh is not None and fresh.value not in (broken, token, planted), "a fresh sealed cookie"
    again = await visit(lb.ws_url(), cookie={APP: fresh.value})
    assert again.server_id == fresh_visit.server_id and again.hello["app_cookie"] == planted


async def test_rewrite_mode_twenty_reconnects_from_twenty_source_addresses_stick(lb: Balancer) -> None:
    """A phone changing networks: 20 reconnects, each from another 127.x address, reach one gateway,
    which sees its own session value every time."""
    server, planted, token = await first_contact(lb)
    seen: Counter[str] = Counter()
    for ip in source_ips(20, start=40):
        v = await visit(lb.ws_url(), cookie={APP: token}, source_ip=ip)
        assert v.hello["forwarded_for"] == ip, "the client really connected from that address"
        assert v.hello["app_cookie"] == planted
        seen[v.server_id] += 1
    assert seen == Counter({server: 20})


@pytest.mark.parametrize("via", ["header", "query"])
async def test_rewrite_mode_token_as_header_or_query_sticks_and_restores_the_cookie(lb: Balancer, via: str) -> None:
    """A client without a cookie jar sends the token as X-LB-Affinity or ?lb_affinity=: same gateway,
    and the gateway still receives its own cookie."""
    server, planted, token = await first_contact(lb)
    for _ in range(3):
        v = await visit_via(lb.ws_url(), token, via)
        assert v.server_id == server
        assert v.hello["app_cookie"] == planted
        assert v.hello["cookies"] == [APP]


async def test_rewrite_mode_other_cookies_pass_and_sticky_plain_http(lb: Balancer) -> None:
    """Other cookies reach the gateway beside the restored one; plain HTTP (/whoami) sticks the same way."""
    server, planted, token = await first_contact(lb)
    v = await visit(lb.ws_url(), cookie=f"theme=dark; {APP}={token}; lang=fr")
    assert v.server_id == server
    assert v.hello["cookies"] == sorted([APP, "lang", "theme"])
    assert v.hello["app_cookie"] == planted

    code, headers, body = await http_get_async(lb.http_url("/whoami/details"), cookie={APP: token})
    assert code == 200
    who = json.loads(body)
    assert who["server_id"] == server and who["app_cookie"] == planted
    assert set_cookies(headers) == []


async def test_rewrite_mode_new_clients_spread_and_each_gets_its_own_session(lb: Balancer, ops: OpsStack) -> None:
    """Without a token, clients are balanced; every one gets a distinct token wrapping a distinct session."""
    contacts = [await first_contact(lb) for _ in range(6)]
    assert {server for server, _, _ in contacts} == set(ops.ids)
    assert len({planted for _, planted, _ in contacts}) == 6
    assert len({token for _, _, token in contacts}) == 6


async def test_rewrite_mode_redispatched_client_gets_a_new_session_from_the_new_backend(
    lb: Balancer, ops: OpsStack
) -> None:
    """Its gateway disabled, a client is served elsewhere: that gateway never set the old value, so it gets
    none, plants its own session, and the client's new token sticks there."""
    server, planted, token = await first_contact(lb)
    await set_state(lb, server, "disable")
    try:
        moved = await visit(lb.ws_url(), cookie={APP: token})
        assert moved.server_id != server
        assert moved.hello["app_cookie"] is None, "a session value must only reach the backend that set it"
        new_planted = moved.hello["app_cookie_set"]
        assert new_planted and new_planted != planted
        fresh = affinity_cookie(moved.headers, APP)
        assert fresh is not None and fresh.value != token
        back = await visit(lb.ws_url(), cookie={APP: fresh.value})
        assert back.server_id == moved.server_id and back.hello["app_cookie"] == new_planted
    finally:
        await set_state(lb, server, "enable")
    # Enabled again: the old token leads home, with the old value.
    home = await visit(lb.ws_url(), cookie={APP: token})
    assert home.server_id == server and home.hello["app_cookie"] == planted
