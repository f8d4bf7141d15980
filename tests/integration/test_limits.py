"""Operator limits and logs: per-IP handshake rate (429 + Retry-After), idle tunnels (timeouts.idle),
a backend's max_connections, the balancer's limits.max_connections, and the JSON access log
(logging.format: json).

Gateways are shared by the module; each test starts its own balancer with the setting under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from typing import Any

from tests.harness import UNIT
from tests.harness.clients import (
    affinity_cookie,
    assert_echo,
    find_backend,
    http_get_async,
    recv_hello,
    status,
    visit,
    ws_connect,
)
from tests.harness.ops import token_of, wait_close, wait_for_log, wait_until
from tests.harness.processes import Balancer, Gateway, Launcher, lb_config
from tests.harness.raw import raw_exchange, upgrade_request

POOL = "gateways"


def start(launcher: Launcher, gateways: list[Gateway], overrides: dict[str, Any], **pool: Any) -> Balancer:
    config = lb_config(pools={POOL: gateways}, overrides=overrides)
    for backend in config["pools"][POOL]["backends"]:
        backend.update(pool.get(backend["id"], {}))
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    return lb


# ---------------------------------------------------------------------------------------------------
# per-IP handshake rate


async def handshake_status(lb: Balancer, ip: str) -> int:
    assert lb.port is not None
    answer = await raw_exchange(lb.port, upgrade_request(host=f"127.0.0.1:{lb.port}"), source_ip=ip)
    assert answer is not None, "the connection closed without an answer"
    return answer.status


async def test_per_ip_handshake_rate_gets_429_with_retry_after(launcher: Launcher, gateways: list[Gateway]) -> None:
    """Past the burst, an address gets 429 with Retry-After; other addresses are unaffected; tokens refill."""
    rate, burst = 2, 3
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": rate, "handshake_burst_per_ip": burst}})
    noisy, quiet = "127.0.0.77", "127.0.0.78"
    assert [await handshake_status(lb, noisy) for _ in range(burst)] == [101] * burst

    assert lb.port is not None
    refused = await raw_exchange(lb.port, upgrade_request(host=f"127.0.0.1:{lb.port}"), source_ip=noisy)
    assert refused is not None and refused.status == 429, refused
    retry_after = refused.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 2, retry_after

    assert await handshake_status(lb, quiet) == 101, "another address has its own bucket"

    async def served_again() -> bool:
        return await handshake_status(lb, noisy) == 101

    started = time.monotonic()
    await wait_until(served_again, within=int(retry_after) + 2 * UNIT, every=0.2, what="a token refilled")
    assert time.monotonic() - started <= int(retry_after) + 2 * UNIT


async def test_an_ipv6_client_rotating_inside_its_64_is_one_client(launcher: Launcher, gateways: list[Gateway]) -> None:
    """Behind a trusted proxy, IPv6 clients as X-Forwarded-For names them: a host picking a new address of its
    /64 for each handshake shares one bucket (it was never limited); the next /64 has its own."""
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": 0.1, "handshake_burst_per_ip": 2},
                                    "trusted_proxies": ["127.0.0.0/8"]})
    assert lb.port is not None

    async def status_as(client: str) -> int:
        head = upgrade_request(host=f"127.0.0.1:{lb.port}", extra=[("X-Forwarded-For", client)])
        answer = await raw_exchange(lb.port, head, source_ip="127.0.0.90")
        assert answer is not None, "the connection closed without an answer"
        return answer.status

    rotating = [await status_as(f"2001:db8:7:1:{i:x}::1") for i in range(1, 5)]
    assert rotating == [101, 101, 429, 429], rotating
    assert await status_as("2001:db8:7:2::1") == 101


async def test_a_rate_alone_admits_one_second_s_worth_at_once(launcher: Launcher, gateways: list[Gateway]) -> None:
    """With only handshake_rate_per_ip set, one address's burst is one second's worth of that rate: 12
    handshakes at once with a rate of 3/s get three 101s (four if a token refilled meanwhile) and 429s for the
    rest, where a fixed default burst of 100 let them all in."""
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": 3}})
    statuses = await asyncio.gather(*(handshake_status(lb, "127.0.0.81") for _ in range(12)))
    assert set(statuses) == {101, 429} and statuses.count(101) in (3, 4), statuses


async def test_every_429_s_request_id_reaches_the_log(launcher: Launcher, gateways: list[Gateway]) -> None:
    """SPEC part 2: an error answer's request id is one the log carries, and its request line says so at once:
    a burst of 429s was one line, then one summary 10 s later naming 32 of them (a flood's past the first 128
    still are summarised: lb.access_log.RateLimitSummary)."""
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": 1, "handshake_burst_per_ip": 1}})
    assert lb.port is not None
    assert await handshake_status(lb, "127.0.0.80") == 101
    ids = []
    for _ in range(8):
        refused = await raw_exchange(lb.port, upgrade_request(host=f"127.0.0.1:{lb.port}"), source_ip="127.0.0.80")
        assert refused is not None and refused.status == 429, refused
        request_id = refused.get("X-Request-Id")
        assert request_id is not None
        ids.append(request_id)
    await wait_for_log(lb, f"request_id={ids[-1]}")
    log = lb.log_text()
    assert [request_id for request_id in ids if f"status=429 reason=handshake_rate_limited request_id={request_id}"
            not in log] == [], log[-2000:]
    assert lb.stop() == 0
    assert "event=rate_limited" not in lb.log_text()


async def test_rate_limit_zero_is_off(launcher: Launcher, gateways: list[Gateway]) -> None:
    """handshake_rate_per_ip: 0 turns the limiter off."""
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": 0, "handshake_burst_per_ip": 1}})
    statuses = await asyncio.gather(*(handshake_status(lb, "127.0.0.79") for _ in range(15)))
    assert set(statuses) == {101}


# ---------------------------------------------------------------------------------------------------
# idle tunnels


async def test_idle_timeout_closes_a_silent_tunnel_and_spares_a_chatty_one(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """timeouts.idle: 500ms — a tunnel that moves no byte is closed; one that keeps talking stays open."""
    idle = 0.5
    lb = start(launcher, gateways, {"timeouts": {"idle": "500ms"}, "limits": {"handshake_rate_per_ip": 0}})
    async with ws_connect(lb.ws_url()) as (silent, _), ws_connect(lb.ws_url()) as (chatty, _):
        await recv_hello(silent)
        await recv_hello(chatty)
        opened = time.monotonic()

        async def chatter() -> None:
            while time.monotonic() - opened < 4 * idle:
                await assert_echo(chatty, "still here")
                await asyncio.sleep(idle / 4)

        closed, _ = await asyncio.gather(wait_close(silent, 5 * UNIT), chatter())
        after = closed.at - opened
        assert after >= idle * 0.8, f"silent tunnel closed after {after:.2f}s, before timeouts.idle"
        assert after <= idle + 2 * UNIT, f"silent tunnel closed only after {after:.2f}s"
        assert closed.code is not None and closed.code in (1000, 1001), closed
        await assert_echo(chatty, "the chatty tunnel outlived the silent one")


# ---------------------------------------------------------------------------------------------------
# max_connections per backend


async def test_full_backend_sends_new_clients_elsewhere(launcher: Launcher, gateways: list[Gateway]) -> None:
    """backends[].max_connections: 1 — while its one tunnel is open, new clients go to the other backend;
    once it closes, the backend takes clients again."""
    small, big = gateways
    lb = start(launcher, gateways, {"limits": {"handshake_rate_per_ip": 0}}, **{small.id: {"max_connections": 1}})
    async with contextlib.AsyncExitStack() as stack:
        # Open tunnels until one sits on the small backend (least_conn puts it there within two).
        holder = None
        for _ in range(4):
            ws, headers = await stack.enter_async_context(ws_connect(lb.ws_url()))
            if (await recv_hello(ws))["server_id"] == small.id:
                holder = (ws, headers)
                break
        assert holder is not None, "the small backend never got a client"
        entry = find_backend(await status(lb), POOL, small.id)
        assert entry["connections"] == 1 and entry["max_connections"] == 1, entry

        landed = Counter([(await visit(lb.ws_url())).server_id for _ in range(6)])
        assert landed == Counter({big.id: 6}), f"new clients reached the full backend: {dict(landed)}"
        # A client pinned to the full backend is still served (HAProxy's option redispatch), not refused.
        cookie = affinity_cookie(holder[1])
        assert cookie is not None
        token = cookie.value
        assert (await visit(lb.ws_url(), cookie=token)).server_id in {small.id, big.id}
        await assert_echo(holder[0], "the tunnel at the limit works")
        await stack.aclose()

    async def small_takes_clients() -> bool:
        return (await visit(lb.ws_url())).server_id == small.id

    await wait_until(small_takes_clients, within=5 * UNIT, what="the small backend takes clients after its close")


async def test_global_max_connections_refuses_with_503_then_recovers(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """limits.max_connections: 2 — with two tunnels open a third client is refused (503, Retry-After);
    when one closes, clients are served again."""
    lb = start(launcher, gateways, {"limits": {"max_connections": 2, "handshake_rate_per_ip": 0}})
    assert lb.port is not None
    request = upgrade_request(host=f"127.0.0.1:{lb.port}")
    async with contextlib.AsyncExitStack() as stack:
        first, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))
        await recv_hello(first)
        async with ws_connect(lb.ws_url()) as (second, _):
            await recv_hello(second)
            refused = await raw_exchange(lb.port, request)
            assert refused is not None and refused.status == 503, refused
            assert refused.get("Retry-After"), refused.headers
            await assert_echo(first, "open tunnels are not disturbed")

        async def served() -> bool:
            answer = await raw_exchange(lb.port, request)
            return answer is not None and answer.status == 101

        await wait_until(served, within=5 * UNIT, what="a client served after a tunnel closed")
        await assert_echo(first, "still fine")


# ---------------------------------------------------------------------------------------------------
# JSON access log


def json_lines(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line in the balancer's stderr: {line!r}") from None
    return entries


async def test_json_access_log_has_request_and_tunnel_closed_events(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """logging.format: json — every stderr line is a JSON object; a handshake gives event=request, a closed
    tunnel event=tunnel_closed with its byte counts; the token itself never appears."""
    lb = start(
        launcher,
        gateways,
        {"logging": {"level": "INFO", "format": "json", "access_log": True}, "limits": {"handshake_rate_per_ip": 0}},
    )
    v = await visit(lb.ws_url())
    token = token_of(v)
    code, _, _ = await http_get_async(lb.http_url("/whoami"), cookie=token)
    assert code == 200

    def logged() -> list[dict[str, Any]] | None:
        entries = json_lines(lb.err_path.read_text())
        events = {e.get("event") for e in entries}
        return entries if {"request", "tunnel_closed"} <= events else None

    entries = await wait_until(logged, within=5 * UNIT, what="request and tunnel_closed events in stderr")
    requests = [e for e in entries if e.get("event") == "request"]
    ws_request = next((e for e in requests if e.get("path") == "/ws"), None)
    assert ws_request is not None, requests
    assert ws_request["status"] == 101 and ws_request["backend"] == v.server_id, ws_request
    assert ws_request["client"] == "127.0.0.1" and ws_request["method"] == "GET", ws_request
    closed = [e for e in entries if e.get("event") == "tunnel_closed" and e.get("backend") == v.server_id]
    assert closed, entries
    assert int(closed[0]["bytes_in"]) > 0 and int(closed[0]["bytes_out"]) > 0, closed[0]
    # One request id per handshake, on its request line and on the close line of the tunnel it opened.
    ids = [e.get("request_id") for e in requests]
    assert all(ids) and len(set(ids)) == len(ids), requests
    assert closed[0]["request_id"] == ws_request["request_id"], (closed[0], ws_request)
    assert all("level" in e and "message" in e for e in entries)
    text = lb.log_text()
    assert token not in text, "an affinity token was written to the log"


async def test_a_flood_of_wrong_tokens_is_held_to_the_bucket_and_counted(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """Anyone who reaches the admin port wrote a WARNING line per wrong token: 11,000 a second from 20
    connections.  The first 128 keep their lines (an ordinary burst: each id is found), the rest are
    counted, and the count is said as the bucket refills, with no later error needed to carry it."""
    lb = start(launcher, gateways, {})
    assert lb.admin_port is not None
    flood = 600
    request = b"POST /pools/gateways/backends/gw-1/disable HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer guess\r\n" \
              b"Content-Length: 0\r\n\r\n"
    port = lb.admin_port

    async def guesses(count: int, source: str) -> int:
        refused = 0
        for _ in range(count):  # a connection each: the admin API closes one after its 401
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            writer.write(request)
            refused += (await reader.readline()).startswith(b"HTTP/1.1 401")
            writer.close()
        return refused

    began = time.monotonic()
    async with asyncio.timeout(30 * UNIT):
        # From 20 addresses: one holds at most 32 admin connections (a closed one may not have left yet).
        assert sum(await asyncio.gather(*(guesses(flood // 20, f"127.0.9.{i + 1}") for i in range(20)))) == flood
    # Said as the bucket refills, with no other error to carry it: the last of a flood of wrong tokens.
    await wait_until(lambda: _counted_401s(lb) + _lines_401(lb) == flood, within=5 * UNIT,
                     what="every wrong token logged or counted")
    took = time.monotonic() - began
    text = lb.log_text().splitlines()
    lines = [line for line in text if "admin API: 401 POST" in line]
    said = [line for line in text if "not logged one by one" in line]
    assert 128 <= len(lines) + len(said) <= 128 + 16 * (took + 1), (len(lines), len(said), took)
    assert lb.proc is not None and lb.proc.poll() is None


def _lines_401(lb: Balancer) -> int:
    return sum("admin API: 401 POST" in line for line in lb.log_text().splitlines())


def _counted_401s(lb: Balancer) -> int:
    said = [line for line in lb.log_text().splitlines() if "not logged one by one" in line]
    return sum(int(line.rsplit("401: ", 1)[1]) for line in said)
