"""SPEC part 2: `balance: source|hash`, `GET /pools/{pool}/route`, one pin per pool, what a token can carry.

Module stack: gw-1..4; `src` is a balancer with a `balance: source` pool over gw-1..3; `hash_a` and
`hash_b` are two instances (same config, same keys) with a `balance: hash` pool keyed on X-User-Id,
plus a least_conn pool at /whoami for the /route 400; `pins` routes /ws to pool chat (gw-1, gw-2) and
/whoami to pool game (gw-3, gw-4).  The rewrite test starts its own balancer on an in-process backend.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.harness import COOKIE, UNIT
from tests.harness.clients import affinity_cookie, http_get_async, source_ips, visit
from tests.harness.ops import admin_request, launched, metrics_text
from tests.harness.processes import STEADY_HEALTH, Backend, Balancer, Launcher, lb_config, new_key

USER_HEADER = "X-User-Id"


@dataclass
class Stacks:
    src: Balancer
    hash_a: Balancer
    hash_b: Balancer
    pins: Balancer


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    with launched(tmp_path_factory, "balance-hash") as launcher:
        gw = launcher.gateways(4)
        src = lb_config(
            pools={"gateways": gw[:3]}, health=STEADY_HEALTH,
            overrides={"pools": {"gateways": {"balance": "source"}}},
        )
        keys = [new_key()]
        hashed = lb_config(
            pools={"gateways": gw[:3], "plain": gw[:3]}, routes={"/ws": "gateways", "/whoami": "plain"},
            keys=keys, health=STEADY_HEALTH,
            overrides={"pools": {"gateways": {"balance": "hash", "hash_key": f"header:{USER_HEADER}"}}},
        )
        twin = lb_config(pools={"gateways": gw[:3], "plain": gw[:3]}, keys=keys, health=STEADY_HEALTH)
        # The twin: the same pools, routes and keys on ports of its own.
        twin = {**hashed, "listeners": twin["listeners"], "admin": twin["admin"]}
        pins = lb_config(
            pools={"chat": gw[:2], "game": gw[2:]}, routes={"/ws": "chat", "/whoami": "game"},
            health=STEADY_HEALTH,
        )
        started = launcher.balancers(src, hashed, twin, pins, names=["src", "hash_a", "hash_b", "pins"])
        yield Stacks(*started)


async def route(balancer: Balancer, pool: str, key: str | None) -> tuple[int, dict[str, Any]]:
    url = balancer.admin_url(f"/pools/{pool}/route")
    status, _, body = await http_get_async(url, params={} if key is None else {"key": key})
    return status, json.loads(body)


async def test_source_sticks_per_address_and_spreads_over_addresses(stacks: Stacks) -> None:
    """balance: source: each address keeps its gateway without a cookie; addresses spread; /route agrees."""
    reached: dict[str, str] = {}
    for ip in source_ips(12):
        first = await visit(stacks.src.ws_url(), source_ip=ip)
        again = await visit(stacks.src.ws_url(), source_ip=ip)
        assert first.cookie is not None, "a source pool still plants the affinity cookie"
        assert again.server_id == first.server_id
        assert await route(stacks.src, "gateways", ip) == (200, {"backend": first.server_id})
        reached[ip] = first.server_id
    assert len(set(reached.values())) >= 2, reached


async def test_source_changing_address_moves_without_cookie_and_stays_with_it(stacks: Stacks) -> None:
    """The story: an IP change moves a cookieless client; its cookie keeps it on the first gateway."""
    ips = source_ips(12, start=40)
    first = await visit(stacks.src.ws_url(), source_ip=ips[0])
    assert first.cookie is not None
    without = {(await visit(stacks.src.ws_url(), source_ip=ip)).server_id for ip in ips}
    with_cookie = {(await visit(stacks.src.ws_url(), source_ip=ip, cookie=first.cookie.value)).server_id for ip in ips}
    assert len(without) >= 2
    assert with_cookie == {first.server_id}


async def test_hash_sticks_per_key_across_addresses_and_route_agrees_on_two_instances(stacks: Stacks) -> None:
    """balance: hash: one user id reaches one gateway from any address through either instance."""
    reached: set[str] = set()
    for n, user in enumerate(f"user-{i}" for i in range(8)):
        servers = set()
        for k, ip in enumerate(source_ips(4, start=100 + 4 * n)):
            balancer = stacks.hash_a if k % 2 == 0 else stacks.hash_b
            servers.add((await visit(balancer.ws_url(), source_ip=ip, headers={USER_HEADER: user})).server_id)
        assert len(servers) == 1, (user, servers)
        answers = [await route(b, "gateways", user) for b in (stacks.hash_a, stacks.hash_b)]
        assert answers == [(200, {"backend": servers.pop()})] * 2
        reached.add(answers[0][1]["backend"])
    assert len(reached) >= 2


async def test_route_reads_a_key_as_the_client_sends_it(stacks: Stacks) -> None:
    """A user id in UTF-8, or with spaces around it: the client and /route name one gateway (9 ids, 7 of
    which fall elsewhere when one side reads the bytes as latin-1 or keeps the spaces)."""
    names = ["Jürgen", "Zoë", "Åsa", "José", "François", "Søren", "Łukasz", "  spaced  ", "東京"]
    for n, user in enumerate(names):
        reached = await visit(stacks.hash_a.ws_url(), source_ip=source_ips(1, start=160 + n)[0],
                              headers={USER_HEADER: user})
        assert await route(stacks.hash_a, "gateways", user) == (200, {"backend": reached.server_id}), user
        assert await route(stacks.hash_b, "gateways", user.strip()) == (200, {"backend": reached.server_id}), user


async def _reached_with_raw_key(balancer: Balancer, key: bytes) -> str:
    """The gateway a raw upgrade whose hash key header is `key` (any bytes) reaches: its hello's server_id."""
    reader, writer = await asyncio.open_connection(*balancer.ws_url().split("/")[2].split(":"))
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: lb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + USER_HEADER.encode() + b": " + key + b"\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        first, length = await asyncio.wait_for(reader.readexactly(2), 5 * UNIT)
        assert first == 0x81, "a text frame: the gateway's hello"
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        hello = json.loads(await asyncio.wait_for(reader.readexactly(length), 5 * UNIT))
        return str(hello["server_id"])
    finally:
        writer.close()


async def test_route_reads_a_key_that_is_not_utf8_as_the_data_plane_does(stacks: Stacks) -> None:
    """A header's bytes that are not UTF-8 (`caf\\xe9`, latin-1) and /route's `key=caf%E9` name one gateway:
    yarl read the escape as U+FFFD, a key no request hashes as."""
    keys = [b"caf\xe9", b"\xe9", b"\xff\xfe", b"J\xfcrgen", b"S\xf8ren", b"\xc0\x80", b"a\xe9b\xe8c", b"\xe9t\xe9"]
    for key in keys:
        reached = await _reached_with_raw_key(stacks.hash_a, key)
        escaped = "".join(f"%{byte:02X}" for byte in key)
        url = stacks.hash_b.admin_url(f"/pools/gateways/route?key={escaped}")
        status, _, body = await http_get_async(url)
        assert (status, json.loads(body)) == (200, {"backend": reached}), key


async def test_hash_without_key_falls_back_and_still_pins(stacks: Stacks) -> None:
    """No X-User-Id: least_conn picks, and the cookie keeps the client there."""
    first = await visit(stacks.hash_a.ws_url())
    assert first.cookie is not None
    again = await visit(stacks.hash_b.ws_url(), cookie=first.cookie.value, source_ip="127.0.0.77")
    assert again.server_id == first.server_id and again.cookie is None


async def test_route_errors_name_nothing_internal(stacks: Stacks) -> None:
    """404 unknown pool; 400 for a least_conn pool, a missing key or a non-IP source key."""
    cases = [
        (stacks.hash_a, "nope-pool", "key-zq93", 404),
        (stacks.hash_a, "plain", "key-zq93", 400),
        (stacks.hash_a, "gateways", None, 400),
        (stacks.src, "gateways", "not-an-address", 400),
    ]
    for balancer, pool, key, expected in cases:
        status, body = await route(balancer, pool, key)
        assert status == expected
        text = json.dumps(body)
        assert pool not in text and "gw-" not in text and "127.0.0" not in text and (key is None or key not in text)
    url = stacks.hash_a.admin_url("/pools/gateways/route")
    for params in ({"key": "x" * 5000}, {"key": "a", "keyy": "b"}, {"key": ["a", "b"]}):
        status, _, body = await http_get_async(url, params=params)
        assert status == 400 and b"xxxx" not in body, params
    # A parameter /route does not take is refused as on every endpoint: "unknown parameter", named in the log.
    status, _, body = await http_get_async(url, params={"key": "a", "Key": "b"})
    assert status == 400 and json.loads(body)["error"] == "unknown parameter"


async def test_two_pools_keep_one_pin_each(stacks: Stacks) -> None:
    """A client using two routes to two pools keeps one pin in each; neither overwrites the other."""
    lb = stacks.pins
    chat = await visit(lb.ws_url())
    assert chat.cookie is not None and chat.server_id in {"gw-1", "gw-2"}
    assert {a.lower() for a in chat.cookie.attrs} >= {"path=/"}
    jar = chat.cookie.value
    status, headers, body = await http_get_async(lb.http_url("/whoami"), cookie=jar, source_ip="127.0.0.50")
    assert status == 200
    game_server = json.loads(body)["server_id"]
    assert game_server in {"gw-3", "gw-4"}
    game = affinity_cookie(headers)
    assert game is not None
    assert game.value.startswith(jar + "."), "the chat pin is kept in front of the new game pin"
    jar = game.value
    for ip in source_ips(6, start=60):
        again = await visit(lb.ws_url(), cookie=jar, source_ip=ip)
        assert again.server_id == chat.server_id and again.cookie is None
        status, headers, body = await http_get_async(lb.http_url("/whoami"), cookie=jar, source_ip=ip)
        assert json.loads(body)["server_id"] == game_server and affinity_cookie(headers) is None
    # The balancer strips the whole affinity cookie: gateways never see either pin.
    assert COOKIE not in (await visit(lb.ws_url(), cookie=jar)).hello["cookies"]
    # /lookup takes the cookie value as the client holds it, both pins, and answers for the pool asked.
    for pool, server in (("chat", chat.server_id), ("game", game_server)):
        reply = await admin_request(lb, "GET", "/lookup", params={"token": jar, "pool": pool})
        assert reply.status == 200 and reply.body["valid"], reply.body
        assert (reply.body["pool"], reply.body["backend"], reply.body["routes_to"]) == (pool, server, server)


def test_startup_log_states_the_backlog(stacks: Stacks) -> None:
    """listeners[].backlog defaults to max(somaxconn, 4096) and is stated in the startup log."""
    match = re.search(r"listening on .*backlog\W{0,3}(\d+)", stacks.src.log_text())
    assert match, stacks.src.logs_tail()
    assert int(match.group(1)) >= 4096


# -- rewrite mode: a backend value too large to seal --------------------------------------------

BIG = "v" * 4000


@pytest.fixture
async def big_cookie_backend() -> AsyncIterator[tuple[Backend, list[str]]]:
    """A backend whose session cookie is 4,000 bytes; it records the Cookie headers it receives."""
    seen: list[str] = []

    async def whoami(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie", ""))
        response = web.json_response({"server_id": "big-1"})
        response.headers.add("Set-Cookie", f"SESSIONID={BIG}; Path=/")
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    @dataclass
    class _Backend:
        id: str = "big-1"
        address: str = f"127.0.0.1:{port}"

    try:
        yield _Backend(), seen
    finally:
        await runner.cleanup()


async def test_rewrite_value_too_large_to_seal_passes_unsealed_with_warning_and_counter(
    launcher: Launcher, big_cookie_backend: tuple[Backend, list[str]]
) -> None:
    """A 4,000-byte backend cookie reaches the client and comes back to the backend unchanged."""
    backend, seen = big_cookie_backend
    config = lb_config(
        pools={"big": [backend]}, health=STEADY_HEALTH,
        overrides={"affinity": {"mode": "rewrite", "cookie": "SESSIONID"}},
    )
    lb = await asyncio.to_thread(launcher.balancer, config)
    status, headers, _ = await http_get_async(lb.http_url("/whoami"))
    assert status == 200
    assert affinity_cookie(headers, "SESSIONID") is not None
    assert affinity_cookie(headers, "SESSIONID").value == BIG  # type: ignore[union-attr]
    status, _, _ = await http_get_async(lb.http_url("/whoami"), cookie={"SESSIONID": BIG, "other": "1"})
    assert status == 200
    assert seen[-1] == f"SESSIONID={BIG}; other=1"
    assert re.search(r"WARNING.*too large to seal", lb.log_text()), lb.logs_tail()
    metrics = await metrics_text(lb)
    assert 'lb_affinity_unsealed_cookies_total{pool="big"} 2.0' in metrics


async def test_a_backend_setting_a_value_too_large_to_seal_on_every_answer_gets_a_warning_a_minute(
    launcher: Launcher, big_cookie_backend: tuple[Backend, list[str]]
) -> None:
    """A backend that sets such a value on every answer (a cookie-store session) cannot flood the log: one
    WARNING line a minute, while the counter counts each value."""
    backend, _ = big_cookie_backend
    config = lb_config(
        pools={"big": [backend]}, health=STEADY_HEALTH,
        overrides={"affinity": {"mode": "rewrite", "cookie": "SESSIONID"}},
    )
    lb = await asyncio.to_thread(launcher.balancer, config)
    for _ in range(20):
        status, _, _ = await http_get_async(lb.http_url("/whoami"))
        assert status == 200
    metrics = await metrics_text(lb)
    assert 'lb_affinity_unsealed_cookies_total{pool="big"} 20.0' in metrics
    assert len(re.findall(r"WARNING.*too large to seal", lb.log_text())) == 1, lb.logs_tail()
