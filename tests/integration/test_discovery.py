"""SPEC part 2 "Discovery": backends from DNS (SRV and A records), against a real DNS server on loopback.

Each test starts a dnslib server (UDP, 127.0.0.1, a kernel-picked port) whose answers it changes,
demo gateways, and one balancer whose pool has no static backend, only `discovery` with that
server as its nameserver and a 200 ms interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
import yaml

from bench.procs import free_port
from tests.harness import HOST, UNIT
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
from tests.harness.dns_server import ZoneServer
from tests.harness.ops import (
    metric,
    metrics_text,
    reload_with,
    set_state,
    token_of,
    two_workers,
    visit_until,
    wait_until,
    worker_pids,
)
from tests.harness.processes import Balancer, Gateway, Launcher, lb_config, run_lb

SERVICE = "gateway.game.svc.cluster.local"


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = ZoneServer().start()
    try:
        yield server
    finally:
        server.stop()


def discovery_config(zone: ZoneServer, *, workers: int | None = None, **discovery: Any) -> dict[str, Any]:
    """A pool `gateways` of `discovery` alone (SRV of SERVICE on `zone`, every 200 ms), and `workers` if given."""
    config = lb_config(pools={"gateways": []})
    if workers is not None:
        config["workers"] = workers
    pool = config["pools"]["gateways"]
    del pool["backends"]
    pool["discovery"] = {"dns": SERVICE, "type": "srv", "interval": "200ms", "nameservers": [zone.nameserver],
                         **discovery}
    return config


def publish(zone: ZoneServer, gateways: list[Gateway]) -> None:
    """SRV records `gw-N.gateway...` for these gateways, with their A records."""
    zone.set_srv(SERVICE, [(f"{g.id}.{SERVICE}", g.port) for g in gateways])
    for g in gateways:
        zone.set_a(f"{g.id}.{SERVICE}", [HOST])


async def wait_status(lb: Balancer, check: Any, what: str, within: float = 10 * UNIT) -> dict[str, Any]:
    """Poll /status until check(status) is true."""
    deadline = time.monotonic() + within
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = await status(lb)
        with contextlib.suppress(KeyError, StopIteration, AssertionError, TypeError):
            if check(last):
                return last
        await _pause()
    raise AssertionError(f"/status never showed {what} within {within}s: {json.dumps(last)[:2000]}")


async def _pause() -> None:
    await asyncio.sleep(0.05)


def ids(data: dict[str, Any]) -> set[str]:
    return {b["id"] for b in data["pools"]["gateways"]["backends"] if not b["removed"]}


async def test_srv_records_name_backends_by_first_label(launcher: Launcher, zone: ZoneServer) -> None:
    """One backend per SRV record, id = first label of the target, address from its A record, port from the SRV."""
    gateways = launcher.gateways(2)
    publish(zone, gateways)
    lb = launcher.balancer(discovery_config(zone))
    data = await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "gw-1 and gw-2")
    for g in gateways:
        assert find_backend(data, "gateways", g.id)["address"] == g.address
    discovery = data["pools"]["gateways"]["discovery"]
    assert discovery["last_ok"] is not None and discovery["last_error"] is None
    for g in gateways:
        await wait_for_state(lb, "gateways", g.id, "up")
    seen = {(await visit(lb.ws_url())).server_id for _ in range(4)}
    assert seen == {"gw-1", "gw-2"}
    text = await metrics_text(lb)
    assert 'lb_discovery_backends{pool="gateways"} 2.0' in text
    assert 'lb_discovery_last_success_timestamp_seconds{pool="gateways"}' in text


@pytest.mark.parametrize("workers", [None, 2])
def test_lb_run_with_a_port_in_use_is_one_line_with_discovery_too(
    zone: ZoneServer, tmp_path: Path, workers: int | None
) -> None:
    """SPEC: `lb run` with a port in use prints one line naming the address.  A single process ran
    discovery's first lookups before it bound its listeners, and their line ("discovery gateways (...):
    1 backend(s); added gw-1") came first: two lines."""
    zone.set_srv(SERVICE, [(f"gw-1.{SERVICE}", 9)])
    zone.set_a(f"gw-1.{SERVICE}", [HOST])
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        config = discovery_config(zone, workers=workers)
        config["listeners"] = [{"bind": f"{HOST}:{port}"}]
        path = tmp_path / "lb.yaml"
        path.write_text(yaml.safe_dump(config))
        done = run_lb("run", "--config", str(path), timeout=20 * UNIT)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done
    assert len(lines) == 1 and f"{HOST}:{port}" in lines[0], lines


async def test_srv_without_additional_section_resolves_targets(launcher: Launcher) -> None:
    """A server that leaves out the additional section: each target is resolved on its own."""
    server = ZoneServer(additional=False).start()
    try:
        [gateway] = launcher.gateways(1)
        publish(server, [gateway])
        lb = launcher.balancer(discovery_config(server))
        data = await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-1")
        assert find_backend(data, "gateways", "gw-1")["address"] == gateway.address
        assert server.queried(f"gw-1.{SERVICE}") >= 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("timeout", "no answer within 0.3s"),
        ("SERVFAIL", "answered SERVFAIL"),
        ("REFUSED", "answered REFUSED"),
    ],
)
async def test_a_target_whose_address_lookup_fails_once_keeps_its_backend_and_clients(
    launcher: Launcher, fault: str, cause: str
) -> None:
    """SPEC: a failed lookup keeps the last known set, per SRV target too.  No additional section, and gw-2's
    A query fails once (no answer, SERVFAIL, REFUSED): gw-2 never leaves /status, its cookie holder is an
    affinity hit on gw-2 (no redispatch), its tunnel lives, and /status, the metrics and the log show the
    error naming gw-2 and the cause.  (gw-2 was removed as "no A/AAAA address", and the lookup counted as a
    success.)"""
    server = ZoneServer(additional=False).start()
    try:
        gw1, gw2 = launcher.gateways(2)
        publish(server, [gw1, gw2])
        # 1 s between lookups: the error stays on /status long enough for a visit in the meantime.
        lb = launcher.balancer(discovery_config(server, timeout="300ms", interval="1s"))
        await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
        for g in (gw1, gw2):
            await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
        pinned = await visit_until(lb.ws_url(), "gw-2", tries=10)
        assert pinned.cookie is not None, "no affinity cookie from gw-2's first visit"
        target = f"gw-2.{SERVICE}"
        async with ws_connect(lb.ws_url(), cookie=pinned.cookie.value) as (ws, _):
            assert (await recv_hello(ws))["server_id"] == "gw-2"
            errors_before = (await status(lb))["pools"]["gateways"]["discovery"]["errors"]
            server.fail_next(target, "A", fault)

            async def gw2_stays_until(check: Any, what: str) -> dict[str, Any]:
                """Poll /status: gw-2 is in the set at every sample, until check(status)."""
                deadline = time.monotonic() + 10 * UNIT
                while True:
                    data = await status(lb)
                    assert ids(data) == {"gw-1", "gw-2"}, f"gw-2 left the set after one failed {fault}: {data}"
                    if check(data["pools"]["gateways"]["discovery"]):
                        return data
                    assert time.monotonic() < deadline, f"/status never showed {what}: {json.dumps(data)[:2000]}"
                    await _pause()

            data = await gw2_stays_until(lambda d: d["last_error"], "the failed target lookup")
            shown = data["pools"]["gateways"]["discovery"]
            assert server.failed(target, "A")
            assert target in shown["last_error"] and cause in shown["last_error"], shown
            assert f"kept gw-2 at {gw2.address}" in shown["last_error"], shown
            assert shown["errors"] == errors_before + 1, shown
            assert find_backend(data, "gateways", "gw-2")["address"] == gw2.address
            text = await metrics_text(lb)
            errors = metric(text, "lb_discovery_errors_total", pool="gateways")
            assert errors is not None and errors >= 1, errors
            assert metric(text, "lb_discovery_backends", pool="gateways") == 2
            # Meanwhile (the next lookup is a second away) the cookie holder comes back: an affinity hit on gw-2.
            hits = metric(text, "lb_affinity_decisions_total", pool="gateways", result="hit") or 0.0
            redispatched = metric(text, "lb_affinity_decisions_total", pool="gateways", result="redispatch") or 0.0
            again = await visit(lb.ws_url(), cookie=pinned.cookie.value)
            assert again.server_id == "gw-2"
            text = await metrics_text(lb)
            assert metric(text, "lb_affinity_decisions_total", pool="gateways", result="hit") == hits + 1
            assert (metric(text, "lb_affinity_decisions_total", pool="gateways", result="redispatch") or 0.0) \
                == redispatched
            await assert_echo(ws, "through a failed target lookup")
            # The next answer clears the error; gw-2 stayed throughout.
            await gw2_stays_until(lambda d: d["last_error"] is None, "the error cleared")
        log = lb.log_text()
        assert f"discovery for pool gateways: {shown['last_error']}" in log, lb.logs_tail()
        assert "no A/AAAA address" not in log and "removed gw-2" not in log, lb.logs_tail()
    finally:
        server.stop()


async def test_added_record_joins_and_takes_new_clients(launcher: Launcher, zone: ZoneServer) -> None:
    """A backend that appears in DNS joins (health-checked) and gets new clients; the others keep theirs."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1])
    lb = launcher.balancer(discovery_config(zone))
    await wait_status(lb, lambda s: "gw-1" in ids(s), "gw-1 discovered")
    await wait_for_state(lb, "gateways", "gw-1", "up", within=10 * UNIT)
    async with ws_connect(lb.ws_url()) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == "gw-1"
        publish(zone, [gw1, gw2])
        await wait_status(lb, lambda s: "gw-2" in ids(s), "gw-2 discovered")
        await wait_for_state(lb, "gateways", "gw-2", "up", within=10 * UNIT)
        # gw-1 holds one tunnel: least_conn sends the next client to the newcomer.
        assert (await visit(lb.ws_url())).server_id == "gw-2"
        await assert_echo(ws, "still here")
    data = await status(lb)
    assert data["pools"]["gateways"]["discovery"]["backends"] == 2


async def test_removed_record_keeps_tunnel_and_redispatches_cookie(launcher: Launcher, zone: ZoneServer) -> None:
    """A backend gone from DNS takes no new client; its live tunnel stays; its cookie holder is redispatched."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    for g in (gw1, gw2):
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    # Find a client pinned to gw-2.
    pinned = await visit_until(lb.ws_url(), "gw-2", tries=10)
    assert pinned.cookie is not None, "no affinity cookie from gw-2's first visit"
    async with ws_connect(lb.ws_url(), cookie=pinned.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == "gw-2"
        publish(zone, [gw1])
        await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-2 removed")
        await assert_echo(ws, "tunnel survives removal from DNS")
        # Its tunnel still counts where /status shows it, in metrics too (they sum to the live tunnels).
        assert metric(await metrics_text(lb), "lb_active_connections", pool="gateways", backend="gw-2") == 1
        again = await visit(lb.ws_url(), cookie=pinned.cookie.value)
        assert again.server_id == "gw-1"
        assert again.cookie is not None and again.cookie.value != pinned.cookie.value, "cookie not replaced"
        for _ in range(4):
            assert (await visit(lb.ws_url())).server_id == "gw-1"
        await assert_echo(ws, "still alive")


async def test_dns_down_keeps_last_known_set(launcher: Launcher, zone: ZoneServer) -> None:
    """A failed lookup keeps the last known backends; /status shows last_error; metrics count errors."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone, timeout="300ms"))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both gateways")
    last_ok = (await status(lb))["pools"]["gateways"]["discovery"]["last_ok"]
    zone.stop()
    data = await wait_status(
        lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"], "a discovery error"
    )
    assert ids(data) == {"gw-1", "gw-2"}
    assert data["pools"]["gateways"]["discovery"]["last_ok"] == last_ok
    seen = {(await visit(lb.ws_url())).server_id for _ in range(4)}
    assert seen == {"gw-1", "gw-2"}
    errors = metric(await metrics_text(lb), "lb_discovery_errors_total", pool="gateways")
    assert errors is not None and errors >= 1, errors


async def test_empty_answer_keeps_last_known_set(launcher: Launcher, zone: ZoneServer) -> None:
    """An answer with no record (a Service scaled to zero by mistake, a broken zone) keeps the set."""
    gateways = launcher.gateways(1)
    publish(zone, gateways)
    lb = launcher.balancer(discovery_config(zone))
    await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-1")
    zone.set_srv(SERVICE, [])
    data = await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"], "an error")
    assert ids(data) == {"gw-1"}
    assert (await visit(lb.ws_url())).server_id == "gw-1"


async def test_a_records_give_ip_port_backends(launcher: Launcher, zone: ZoneServer, tmp_path: Path) -> None:
    """type a: one backend per A record, id "ip:port", port from `port`."""
    port = free_port("127.0.0.2")
    gateways = [Gateway(f"gw-{i}", tmp_path, host=f"127.0.0.{i}", port=port) for i in (2, 3)]
    try:
        for g in gateways:
            g.launch()
        for g in gateways:
            g.wait_ready()
        zone.set_a(SERVICE, ["127.0.0.2", "127.0.0.3"])
        lb = launcher.balancer(discovery_config(zone, type="a", port=port))
        expected = {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
        data = await wait_status(lb, lambda s: ids(s) == expected, "two ip:port backends")
        assert {b["address"] for b in data["pools"]["gateways"]["backends"]} == expected
        for backend_id in expected:
            await wait_for_state(lb, "gateways", backend_id, "up")
        assert {(await visit(lb.ws_url())).server_id for _ in range(4)} == {"gw-2", "gw-3"}
        zone.set_a(SERVICE, ["127.0.0.3"])
        await wait_status(lb, lambda s: ids(s) == {f"127.0.0.3:{port}"}, "one backend left")
    finally:
        for g in gateways:
            g.stop()


async def test_the_system_resolver_answers_localhost_from_the_hosts_file(launcher: Launcher, tmp_path: Path) -> None:
    """SPEC part 2: `nameservers: []` is the system resolver, which answers a name /etc/hosts lists (NSS
    `files dns`): `dns: localhost` found no backend (NXDOMAIN from resolv.conf's nameserver)."""
    import socket

    listed = {info[4][0] for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    if "127.0.0.1" not in listed:
        pytest.skip(f"this host's resolver does not give localhost 127.0.0.1 ({sorted(listed)})")
    gateway = Gateway("gw-local", tmp_path, host="127.0.0.1", port=free_port())
    try:
        gateway.launch()
        gateway.wait_ready()
        config = lb_config(pools={"gateways": []})
        pool = config["pools"]["gateways"]
        del pool["backends"]
        pool["discovery"] = {"dns": "localhost", "type": "a", "port": gateway.port, "interval": "200ms"}
        lb = launcher.balancer(config)
        backend_id = f"127.0.0.1:{gateway.port}"
        await wait_status(lb, lambda s: backend_id in ids(s), "localhost's 127.0.0.1 as a backend")
        await wait_for_state(lb, "gateways", backend_id, "up")
        assert (await visit(lb.ws_url())).server_id == "gw-local"
        data = await status(lb)
        assert data["pools"]["gateways"]["discovery"]["last_error"] is None, data["pools"]["gateways"]["discovery"]
    finally:
        gateway.stop()


async def test_a_name_that_resolves_to_the_balancer_itself_is_no_backend(
    launcher: Launcher, zone: ZoneServer, tmp_path: Path
) -> None:
    """A name pointing back at the balancer (its own Service, a typo): every request sent there would come
    back as a new one (stop 42: 3,930 connections in under a second).  That address is skipped and said,
    and so is 0.0.0.0 (which Linux connects to this host); the gateway at the same port serves."""
    config = discovery_config(zone, type="a", port=0)
    own_host, _, port_text = config["listeners"][0]["bind"].rpartition(":")
    port = int(port_text)
    config["pools"]["gateways"]["discovery"]["port"] = port
    gateway = Gateway("gw-2", tmp_path, host="127.0.0.2", port=port)
    try:
        gateway.launch()
        gateway.wait_ready()
        zone.set_a(SERVICE, [own_host, "127.0.0.2", "0.0.0.0"])
        lb = launcher.balancer(config)
        data = await wait_status(lb, lambda s: ids(s) == {f"127.0.0.2:{port}"}, "the gateway alone")
        assert data["pools"]["gateways"]["discovery"]["skipped"] == 2
        await wait_for_state(lb, "gateways", f"127.0.0.2:{port}", "up")
        assert {(await visit(lb.ws_url())).server_id for _ in range(3)} == {"gw-2"}
        text = lb.log_text()
        assert f"skipped address {own_host}:{port} reaches this balancer's own listener {own_host}:{port}" in text
        assert "skipped address 0.0.0.0 is no host's address" in text
    finally:
        gateway.stop()


def _parse_seconds(addresses: list[str]) -> float:
    """How long dnspython takes, in this process, to parse one answer holding these A records."""
    query = dns.message.make_query(SERVICE, "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text(SERVICE + ".", 1, "IN", "A", *addresses))
    wire = answer.to_wire()
    started = time.perf_counter()
    dns.message.from_wire(wire)
    return time.perf_counter() - started


async def test_a_huge_answer_does_not_stall_live_tunnels(launcher: Launcher, zone: ZoneServer) -> None:
    """3,000 A records (48 KB: dnspython needs 100-200 ms to parse them) at every 200 ms lookup: a live
    tunnel keeps echoing meanwhile, with no pause as long as a parse.  (Parsed on the event loop, each
    lookup stopped every connection of the process for that long.)"""
    gateway = launcher.gateways(1)[0]
    addresses = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(3000)]  # nothing listens: they go down
    zone.set_a(SERVICE, addresses)
    config = discovery_config(zone, type="a", port=free_port(), max_backends=2)
    config["pools"]["gateways"]["backends"] = [{"id": gateway.id, "address": gateway.address, "weight": 1}]
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: len(ids(s)) == 3, "the static backend and two discovered ones")
    await wait_for_state(lb, "gateways", gateway.id, "up")
    parse = min(_parse_seconds(addresses) for _ in range(3))
    async with ws_connect(lb.ws_url()) as (ws, _):
        hello = await recv_hello(ws)
        assert hello["server_id"] == gateway.id, hello
        queried = zone.queried(SERVICE)
        gaps: list[float] = []
        last = time.monotonic()
        deadline = last + 3.0 * UNIT
        while time.monotonic() < deadline:
            await assert_echo(ws, "still here")
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        lookups = zone.queried(SERVICE) - queried
    assert lookups >= 3, f"only {lookups} queries during the echoes"
    # Every lookup on the loop gave a gap at least as long as a parse; one gap may be the scheduler's.
    third_longest = sorted(gaps)[-3]
    assert third_longest < parse / 2, (
        f"echoes paused {third_longest * 1000:.0f} ms (3rd longest of {len(gaps)}) during {lookups} queries; "
        f"one parse takes {parse * 1000:.0f} ms"
    )
    lb.assert_alive()


async def test_static_and_discovered_backends_together(launcher: Launcher, zone: ZoneServer) -> None:
    """`backends` and `discovery` side by side: the static one stays whatever DNS says."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw2])
    config = discovery_config(zone)
    config["pools"]["gateways"]["backends"] = [{"id": gw1.id, "address": gw1.address}]
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "static gw-1 and discovered gw-2")
    zone.set_srv(SERVICE, [])
    zone.set_srv(SERVICE, [(f"gw-1.{SERVICE}", gw2.port)])  # a DNS record may not take a static id
    zone.set_a(f"gw-1.{SERVICE}", [HOST])
    data = await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"], "an error")
    assert find_backend(data, "gateways", "gw-1")["address"] == gw1.address


async def test_hostile_answer_is_capped_and_bad_names_skipped(launcher: Launcher) -> None:
    """500 SRV records and a target whose label is no id: max_backends caps the set (and the per-target
    lookups), the bad name is skipped with a log line (never looked up, and taking none of the set's places
    although it sorts first), /status counts what was left out."""
    server = ZoneServer(additional=False).start()
    try:
        records = [(f"gw-{i:03d}.{SERVICE}", 9000 + i) for i in range(500)]
        server.set_srv(SERVICE, [("a*bad." + SERVICE, 9999), *records])
        for target, _ in records[:5]:
            server.set_a(target, [HOST])
        server.set_a("a*bad." + SERVICE, [HOST])
        lb = launcher.balancer(discovery_config(server, max_backends=3))
        data = await wait_status(lb, lambda s: ids(s) == {"gw-000", "gw-001", "gw-002"}, "the capped set")
        assert data["pools"]["gateways"]["discovery"]["skipped"] == 498  # the bad name, and 497 cut
        looked_up = {name for name, kind in server.queries if kind in ("A", "AAAA")}
        assert looked_up <= {f"gw-000.{SERVICE}", f"gw-001.{SERVICE}", f"gw-002.{SERVICE}"}, looked_up
        text = lb.log_text()
        assert "not a valid backend id" in text and "cut to max_backends=3" in text
    finally:
        server.stop()


async def test_workers_route_to_discovered_backends(launcher: Launcher, zone: ZoneServer) -> None:
    """With workers: 2, every worker follows the owner's lookups: new clients reach discovered backends,
    and a removed one stops getting them."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    config = discovery_config(zone, workers=2)
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both gateways")
    for g in (gw1, gw2):
        await wait_for_state(lb, "gateways", g.id, "up", within=10 * UNIT)
    seen = {(await visit(lb.ws_url())).server_id for _ in range(8)}
    assert seen == {"gw-1", "gw-2"}
    publish(zone, [gw1])
    await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-2 removed")
    deadline = time.monotonic() + 5 * UNIT
    while True:  # every worker converges within an interval or so
        seen = {(await visit(lb.ws_url())).server_id for _ in range(6)}
        if seen == {"gw-1"}:
            break
        assert time.monotonic() < deadline, f"a worker still sends new clients to gw-2: {seen}"


async def test_workers_route_over_the_owners_set_when_answers_differ_per_query(
    launcher: Launcher, zone: ZoneServer
) -> None:
    """A nameserver that answers each query with another subset (round robin, a headless Service's
    subset): the owner alone resolves, and every worker routes over the set the owner shows.  Each
    process resolving on its own, a worker held the other subset for good, and one client's
    reconnects reached different gateways by the worker that took them."""
    gw1, gw2 = launcher.gateways(2)
    for g in (gw1, gw2):
        zone.set_a(f"{g.id}.{SERVICE}", [HOST])
    zone.rotate_srv(SERVICE, [[(f"{gw1.id}.{SERVICE}", gw1.port)], [(f"{gw2.id}.{SERVICE}", gw2.port)]])
    config = discovery_config(zone, interval="1s", workers=2)
    lb = launcher.balancer(config)
    queried, started = zone.queried(SERVICE), time.monotonic()
    rounds = 0
    deadline = time.monotonic() + 20 * UNIT
    while rounds < 3:
        assert time.monotonic() < deadline, f"only {rounds} rounds with the owner's set steady"
        data = await status(lb)
        before, lookups = ids(data), data["pools"]["gateways"]["discovery"]["lookups"]
        seen = {(await visit(lb.ws_url())).server_id for _ in range(8)}  # spread over both workers
        if len(before) != 1 or (await status(lb))["pools"]["gateways"]["discovery"]["lookups"] != lookups:
            continue  # the owner looked up (and flipped) meanwhile: this round says nothing
        assert seen == before, f"the owner shows {before}, its workers routed to {seen}"
        rounds += 1
        await asyncio.sleep(1.0)  # the next answer (the zone's TTL, 1 s, paces the lookups): the other gateway
    # One process asks, about once a second; three processes asked three times as often.
    asked, elapsed = zone.queried(SERVICE) - queried, time.monotonic() - started
    assert asked <= 1.5 * elapsed + 2, f"{asked} SRV queries in {elapsed:.1f} s: more than the owner's"


async def test_a_restarted_worker_starts_with_the_owners_set_of_now(launcher: Launcher, zone: ZoneServer) -> None:
    """A worker that dies is replaced; the new one gets the owner's sets as they are now (it resolves
    nothing), before it listens: its first clients reach what DNS says now, not a 503 and not the set
    of when the balancer started."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    config = discovery_config(zone, workers=2)
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both gateways")
    publish(zone, [gw2])
    await wait_status(lb, lambda s: ids(s) == {"gw-2"}, "gw-1 removed")
    assert lb.proc is not None
    before = await two_workers(lb)
    zone.stop()  # from here on no lookup answers: the new worker has what the owner sends it, or nothing
    os.kill(before[0], signal.SIGKILL)
    await wait_until(lambda: len(pids := worker_pids(lb.proc.pid)) == 2 and before[0] not in pids,  # type: ignore[union-attr]
                     within=10 * UNIT, what="a replacement worker")
    await asyncio.sleep(0.5 * UNIT)  # the replacement binds its listeners
    seen = {(await visit(lb.ws_url())).server_id for _ in range(12)}  # over both workers
    assert seen == {"gw-2"}, seen


async def test_reload_keeps_discovered_backends_and_their_tunnels(launcher: Launcher, zone: ZoneServer) -> None:
    """SIGHUP with discovery unchanged: discovered backends stay (no gap, no "removed"), with their
    tunnels and cookie holders; a changed static list still applies."""
    gw1, gw2, gw3 = launcher.gateways(3)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone, interval="5s"))  # no lookup lands during the reload
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    await wait_for_state(lb, "gateways", "gw-1", "up", within=10 * UNIT)
    first = await visit(lb.ws_url())
    assert first.cookie is not None
    async with ws_connect(lb.ws_url(), cookie=first.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == first.server_id
        config = dict(lb.config)
        config["pools"] = {"gateways": {**config["pools"]["gateways"],
                                        "backends": [{"id": gw3.id, "address": gw3.address}]}}
        await reload_with(lb, config, expect="reloaded configuration")
        data = await status(lb)
        assert ids(data) == {"gw-1", "gw-2", "gw-3"}
        assert find_backend(data, "gateways", first.server_id)["connections"] == 1
        assert (await visit(lb.ws_url(), cookie=first.cookie.value)).server_id == first.server_id
        await assert_echo(ws, "through the reload")


@contextlib.asynccontextmanager
async def _tunnel_to_discovered(
    launcher: Launcher, zone: ZoneServer, target: str
) -> AsyncIterator[tuple[Balancer, tuple[Gateway, Gateway], Any]]:
    """gw-1 and gw-2 found by SRV, and a live tunnel pinned to `target` (its hello read)."""
    gateways = launcher.gateways(2)
    publish(zone, gateways)
    lb = launcher.balancer(discovery_config(zone))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    await wait_for_state(lb, "gateways", target, "up", within=10 * UNIT)
    pinned = await visit_until(lb.ws_url(), target, tries=10)
    assert pinned.cookie is not None
    async with ws_connect(lb.ws_url(), cookie=pinned.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == target
        yield lb, (gateways[0], gateways[1]), ws


async def test_a_record_removed_and_back_while_its_tunnel_lives_is_one_backend(
    launcher: Launcher, zone: ZoneServer
) -> None:
    """gw-2 leaves DNS and comes back while a tunnel to it lives: /status shows it once, up, with its
    live tunnel counted, and says DNS brought it back (not a reload).  It was shown twice, once up and
    once `removed`, and the dashboard showed it removed."""
    async with _tunnel_to_discovered(launcher, zone, "gw-2") as (lb, (gw1, gw2), ws):
        for _ in range(2):
            publish(zone, [gw1])
            await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-2 removed")
            publish(zone, [gw1, gw2])
            await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "gw-2 back")
        data = await status(lb)
        rows = [b for b in data["pools"]["gateways"]["backends"] if b["id"] == "gw-2"]
        assert len(rows) == 1 and rows[0]["state"] == "up" and rows[0]["connections"] == 1, rows
        assert "DNS" in (rows[0].get("reason") or ""), rows
        await assert_echo(ws, "still one backend")


async def test_slow_dns_times_out_and_keeps_the_set(launcher: Launcher, zone: ZoneServer) -> None:
    """A nameserver that answers late: the lookup gives up after its timeout, the set stays, the
    balancer keeps serving meanwhile."""
    gateways = launcher.gateways(1)
    publish(zone, gateways)
    lb = launcher.balancer(discovery_config(zone, timeout="300ms"))
    await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-1")
    zone.delay = 2.0
    data = await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"], "a timeout")
    assert "within" in data["pools"]["gateways"]["discovery"]["last_error"]
    assert ids(data) == {"gw-1"}
    assert (await visit(lb.ws_url())).server_id == "gw-1"
    zone.delay = 0.0
    await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"] is None, "recovery")


async def test_truncated_answers_keep_the_set_and_show_the_error(launcher: Launcher, zone: ZoneServer) -> None:
    """A TC answer whose TCP retry fails (a server without TCP) is a failed lookup like any other: the
    last known set stays and serves, /status says why, and the next full answer clears the error."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone, timeout="300ms"))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both gateways")
    zone.truncate = True
    data = await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"], "a discovery error")
    error = data["pools"]["gateways"]["discovery"]["last_error"]
    # Named: the UDP answer was truncated, then TCP failed (dnspython's own text said neither).
    assert SERVICE in error and "truncated answer" in error and "over TCP: " in error, error
    assert ids(data) == {"gw-1", "gw-2"}
    assert {(await visit(lb.ws_url())).server_id for _ in range(4)} == {"gw-1", "gw-2"}
    zone.truncate = False
    await wait_status(lb, lambda s: s["pools"]["gateways"]["discovery"]["last_error"] is None, "the error cleared")
    lb.assert_alive()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_removed_backend_s_series_show_through_its_last_tunnel_s_end(launcher: Launcher, workers: int) -> None:
    """A reload removes gw-2 while a tunnel runs there; the tunnel ends.  Its series are kept (README: the
    departed ones' bound), and every scrape shows them: between the last tunnel's end and the next second's
    recount they were in no list /metrics reads, and a scrape then missed them (stale in Prometheus)."""
    gw1, gw2 = launcher.gateways(2)
    config = lb_config(pools={"gateways": [gw1, gw2]}, overrides={"workers": workers})
    lb = launcher.balancer(config)
    lb.wait_states({("gateways", g.id): "up" for g in (gw1, gw2)})
    pinned = await visit_until(lb.ws_url(), "gw-2", tries=8)
    assert pinned.cookie is not None

    def gw2_handshakes(text: str) -> float | None:
        return metric(text, "lb_backend_handshakes_total", pool="gateways", backend="gw-2")

    async with ws_connect(lb.ws_url(), cookie=pinned.cookie.value) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == "gw-2"
        await wait_until(lambda: _counted(lb, gw2_handshakes, 2), within=5 * UNIT, what="gw-2's two handshakes")
        removed = dict(lb.config)
        removed["pools"] = {"gateways": {**config["pools"]["gateways"], "backends": [
            {"id": gw1.id, "address": gw1.address}]}}
        await reload_with(lb, removed, expect="reloaded configuration")
        await wait_status(lb, lambda s: "gw-2" not in ids(s), "gw-2 removed, its tunnel still running")
        await asyncio.sleep(0.6)  # and every worker has applied it (the owner's /status says so first)
    missing = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        if gw2_handshakes(await metrics_text(lb)) is None:
            missing += 1
        await asyncio.sleep(0.02)
    assert missing == 0, f"gw-2's series missing from {missing} scrapes after its last tunnel ended"
    assert (gw2_handshakes(await metrics_text(lb)) or 0) >= 2


async def _counted(lb: Balancer, read: Any, at_least: float) -> bool:
    return (read(await metrics_text(lb)) or 0) >= at_least


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_backend_that_leaves_and_comes_back_counts_on(
    launcher: Launcher, zone: ZoneServer, workers: int
) -> None:
    """SPEC: counters never go backwards.  gw-2 leaves DNS, then a reload drops it from the static list too,
    and each time it comes back: every sample of its lb_backend_handshakes_total series, taken all along
    (while the owner and then each worker apply the change), is at least the one before."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    config = discovery_config(zone, workers=workers)
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    await wait_for_state(lb, "gateways", "gw-2", "up", within=10 * UNIT)
    for _ in range(3):
        await visit_until(lb.ws_url(), "gw-2", tries=8)

    samples: list[float] = []

    async def sample() -> None:
        while True:
            value = metric(await metrics_text(lb), "lb_backend_handshakes_total", pool="gateways", backend="gw-2")
            if value is not None:  # no series while no process lists gw-2
                samples.append(value)
            await asyncio.sleep(0.02)

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        deadline = time.monotonic() + 5 * UNIT
        while not samples or samples[-1] < 3:  # workers report within half a second
            assert time.monotonic() < deadline, f"gw-2's handshakes never counted: {samples}"
            await _pause()
        publish(zone, [gw1])
        await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-2 gone from DNS")
        publish(zone, [gw1, gw2])
        await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "gw-2 back in DNS")
        await asyncio.sleep(1.0)  # every worker's lookup lands, and its report
        publish(zone, [gw1])
        await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-2 gone again")
        static = dict(lb.config)
        back = [{"id": gw2.id, "address": gw2.address}]
        static["pools"] = {"gateways": {**config["pools"]["gateways"], "backends": back}}
        await reload_with(lb, static, expect="reloaded configuration")  # back, as a static backend
        await asyncio.sleep(1.0)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert samples and samples[-1] >= 3, samples
    assert all(later >= earlier for earlier, later in itertools.pairwise(samples)), f"went backwards: {samples}"


@pytest.mark.parametrize("action", ["disable", "drain"])
async def test_an_operators_word_outlives_a_backends_absence_from_dns(
    launcher: Launcher, zone: ZoneServer, action: str
) -> None:
    """A headless Service drops a pod from DNS while it fails readiness: the gateway an operator disabled
    (or drained) comes back to its pool disabled, not `up` as a new one taking new clients."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    await wait_for_state(lb, "gateways", "gw-2", "up", within=10 * UNIT)
    state = "disabled" if action == "disable" else "draining"
    assert (await set_state(lb, "gw-1", action))["state"] == state
    publish(zone, [gw2])
    await wait_status(lb, lambda s: ids(s) == {"gw-2"}, "gw-1 gone from DNS")
    publish(zone, [gw1, gw2])
    data = await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "gw-1 back in DNS")
    backend = find_backend(data, "gateways", "gw-1")
    assert backend["state"] == state and "operator" in backend["reason"], backend
    assert {(await visit(lb.ws_url())).server_id for _ in range(6)} == {"gw-2"}


@pytest.mark.parametrize("action", ["drain", "disable"])
async def test_an_operators_word_kept_through_dns_by_a_live_tunnel_is_the_reason_shown(
    launcher: Launcher, zone: ZoneServer, action: str
) -> None:
    """The same absence while a tunnel keeps the backend: it comes back in its state, and /status (the
    dashboard, `lb ctl status`) says why.  It said `draining` with the reason "added back by DNS"."""
    async with _tunnel_to_discovered(launcher, zone, "gw-1") as (lb, (gw1, gw2), ws):
        state = "disabled" if action == "disable" else "draining"
        assert (await set_state(lb, "gw-1", action))["state"] == state
        publish(zone, [gw2])
        await wait_status(lb, lambda s: find_backend(s, "gateways", "gw-1")["removed"], "gw-1 gone from DNS")
        publish(zone, [gw1, gw2])
        data = await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "gw-1 back in DNS")
        backend = find_backend(data, "gateways", "gw-1")
        assert (backend["state"], backend["reason"]) == (state, f"operator: {action} (kept while it was out of DNS)")
        await assert_echo(ws, "the tunnel that kept it")


async def test_a_first_lookup_that_fails_is_tried_again_within_a_second(launcher: Launcher, zone: ZoneServer) -> None:
    """At start there is no last known set to keep: one SERVFAIL left a ready balancer with an empty pool
    (503 for everyone) until the next lookup, a whole `interval` later."""
    publish(zone, launcher.gateways(1))
    zone.fail_next(SERVICE, "SRV", "SERVFAIL")
    lb = launcher.balancer(discovery_config(zone, interval="30s"))
    await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-1 found by the next lookup", within=4 * UNIT)
    assert zone.failed(SERVICE, "SRV")


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_first_client_finds_the_discovered_backends(
    launcher: Launcher, zone: ZoneServer, workers: int
) -> None:
    """A process that serves listens only once its first lookups have ended: with a nameserver slow to
    answer, the first handshake after start reaches a discovered gateway, not a 503 for an empty pool
    (with `workers: 2` a worker served 503s while the owner already showed the pool up).  A worker
    listens once its owner has sent it the sets of its first lookups."""
    gateways = launcher.gateways(1)
    publish(zone, gateways)
    zone.delay = 0.5 * UNIT  # per query: the SRV, then its target's A
    config = discovery_config(zone, timeout=f"{2 * UNIT:g}s", workers=workers)
    lb = launcher.balancer(config)
    assert {(await visit(lb.ws_url())).server_id for _ in range(4)} == {"gw-1"}


async def test_a_silent_nameserver_delays_the_start_by_one_lookup_budget_at_most(
    launcher: Launcher, zone: ZoneServer
) -> None:
    """The wait for the first lookups is bounded: a nameserver that never answers in time lets the
    balancer start after the lookup's budget, answering 503 for the empty pool until DNS comes back."""
    publish(zone, launcher.gateways(1))
    zone.delay = 3.0
    started = time.monotonic()
    lb = launcher.balancer(discovery_config(zone, timeout="200ms"))
    assert time.monotonic() - started < 2.5 * UNIT + 1.0  # 3 x 200 ms of budget, then a process start
    data = await status(lb)
    assert ids(data) == set() and "within" in data["pools"]["gateways"]["discovery"]["last_error"]
    zone.delay = 0.0
    await wait_status(lb, lambda s: ids(s) == {"gw-1"}, "gw-1 once DNS answers")


async def test_readyz_is_503_until_the_listeners_open(launcher: Launcher, zone: ZoneServer) -> None:
    """SPEC part 2: /readyz is 503 before the listeners are open, 200 once they are; /livez is 200
    meanwhile.  A silent nameserver holds the listeners back for the first lookups' budget; the admin
    API answered nothing at all in that window (connection refused) before it was bound first."""
    publish(zone, launcher.gateways(1))
    zone.delay = 5.0
    lb = launcher.starting_balancer(discovery_config(zone, timeout=f"{UNIT:g}s"))
    assert lb.port is not None
    seen: set[tuple[int, int, int, bool]] = set()
    deadline = time.monotonic() + 15 * UNIT
    while (200, 200, 200, True) not in seen:
        assert time.monotonic() < deadline, f"never ready; seen {sorted(seen)}:\n{lb.logs_tail()}"
        lb.assert_alive()
        try:
            codes = [(await http_get_async(lb.admin_url(path)))[0] for path in ("/readyz", "/livez", "/healthz")]
        except OSError:
            await _pause()
            continue
        try:
            _, writer = await asyncio.open_connection(HOST, lb.port)
        except OSError:
            listening = False
        else:
            writer.close()
            listening = True
        if codes[0] == 200:
            assert listening, "/readyz said 200 before the listener was open"
        seen.add((*codes, listening))
        await _pause()
    assert (503, 200, 503, False) in seen, f"no answer while starting: {sorted(seen)}"


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_sigterm_while_starting_is_never_ready(launcher: Launcher, zone: ZoneServer, workers: int) -> None:
    """SIGTERM while the first lookups hold the start back: the balancer stops when up, and /readyz
    never says 200 on the way (a probe that saw it would send traffic to a process leaving).  With
    workers, the owner (waiting for its lookups) starts none."""
    publish(zone, launcher.gateways(1))
    zone.delay = 5.0
    config = discovery_config(zone, timeout=f"{UNIT:g}s", workers=workers)
    lb = launcher.starting_balancer(config)
    assert lb.proc is not None
    deadline = time.monotonic() + 15 * UNIT
    while True:  # admin is up first: the start is under way
        assert time.monotonic() < deadline, f"admin never answered:\n{lb.logs_tail()}"
        with contextlib.suppress(OSError):
            if (await http_get_async(lb.admin_url("/livez")))[0] == 200:
                break
        await _pause()
    lb.proc.send_signal(signal.SIGTERM)
    codes: set[int] = set()
    while lb.proc.poll() is None:
        assert time.monotonic() < deadline, f"still running after SIGTERM:\n{lb.logs_tail()}"
        with contextlib.suppress(OSError):
            codes.add((await http_get_async(lb.admin_url("/readyz")))[0])
        await asyncio.sleep(0.01)
    assert lb.proc.returncode == 0, lb.logs_tail()
    assert 200 not in codes, f"/readyz said 200 after SIGTERM: {sorted(codes)}"
    assert "worker 0 started" not in lb.log_text()


async def test_workers_start_with_a_silent_nameserver_and_a_long_lookup_timeout(
    launcher: Launcher, zone: ZoneServer
) -> None:
    """With `workers: 2` the owner waits for its first lookups before it starts its workers, 5 s at most
    whatever `discovery.timeout` says: a 15 s timeout kept a worker (which resolved on its own then)
    past its owner's 15 s for starting, and the balancer did not start (a reviewer's case)."""
    publish(zone, launcher.gateways(1))
    zone.delay = 20.0
    config = discovery_config(zone, timeout="16s", workers=2)  # its SRV query alone outlasts the owner's 15 s
    started = time.monotonic()
    lb = launcher.balancer(config)  # ready within the launcher's deadline, or this fails
    assert time.monotonic() - started < 12 * UNIT
    assert ids(await status(lb)) == set()  # the lookups go on meanwhile


def _pool_backends(text: str, pool: str = "gateways") -> set[str]:
    """Every `backend` label value of `pool` in an exposition."""
    found: set[str] = set()
    for line in text.splitlines():
        if f'pool="{pool}"' in line and (match := re.search(r'[{,]backend="([^"]*)"', line)):
            found.add(match.group(1))
    return found


@pytest.mark.parametrize("workers", [1, 2])
async def test_dns_churn_keeps_metrics_bounded_and_a_kept_backend_monotonic(
    launcher: Launcher, zone: ZoneServer, workers: int
) -> None:
    """A DNS answer naming new backends at every lookup costs bounded /metrics (and memory): the series
    of backends that left are kept for the last `max(16, max_backends + static)` of them only, while
    a backend present all along keeps every counter monotonic."""
    [gateway] = launcher.gateways(1)
    port = free_port()  # nothing listens: the churned backends answer no check
    per_answer = 8
    config = discovery_config(zone, type="a", port=port, max_backends=per_answer, workers=workers)
    config["pools"]["gateways"]["backends"] = [{"id": gateway.id, "address": gateway.address, "weight": 1}]
    zone.set_a(SERVICE, [f"127.2.0.{i + 1}" for i in range(per_answer)])
    lb = launcher.balancer(config)
    await wait_status(lb, lambda s: len(ids(s)) == 1 + per_answer, "the static backend and a first answer")
    await wait_for_state(lb, "gateways", gateway.id, "up")
    pinned = token_of(await visit_until(lb.ws_url(), gateway.id, tries=1 + per_answer))
    kept = {"lb_backend_handshakes_total": {}, "lb_health_checks_total": {"result": "success"}}
    samples: dict[str, list[float]] = {name: [] for name in kept}
    sizes: list[int] = []
    seen: set[str] = set()
    generations = 16  # 128 backends come and go: 8 times the bound's worth of 16
    for generation in range(1, generations + 1):
        zone.set_a(SERVICE, [f"127.2.{generation}.{i + 1}" for i in range(per_answer)])
        await wait_status(lb, lambda s, g=generation: f"127.2.{g}.1:{port}" in ids(s), f"generation {generation}")
        assert (await visit(lb.ws_url(), cookie=pinned)).server_id == gateway.id
        text = await metrics_text(lb)
        sizes.append(len(text))
        seen |= _pool_backends(text)
        for name, labels in kept.items():
            value = metric(text, name, pool="gateways", backend=gateway.id, **labels)
            assert value is not None, f"{name} of {gateway.id} missing in generation {generation}"
            samples[name].append(value)
    await asyncio.sleep(1.5)  # the workers' last reports reach the owner
    text = await metrics_text(lb)
    backends = _pool_backends(text)
    # Present: the static one and the current answer; departed: at most max(16, 8 + 1) of them.
    assert len(backends) <= 1 + per_answer + 16, f"{len(backends)} backends in /metrics: {sorted(backends)[:12]}..."
    assert gateway.id in backends and f"127.2.{generations}.1:{port}" in backends
    assert len(seen) > 1 + per_answer + 16, f"the churn was too slow to show anything: {len(seen)} backends"
    assert sizes[-1] <= 1.3 * sizes[len(sizes) // 2], f"/metrics grew on: {sizes}"
    for name, values in samples.items():
        values.append(metric(text, name, pool="gateways", backend=gateway.id, **kept[name]) or 0.0)
        assert all(later >= earlier for earlier, later in itertools.pairwise(values)), f"{name}: {values}"
    assert samples["lb_backend_handshakes_total"][-1] >= generations
    lb.assert_alive()


async def test_a_reload_to_a_name_that_does_not_answer_keeps_the_old_names_set_on_show(
    launcher: Launcher, zone: ZoneServer
) -> None:
    """`discovery.dns` changed by a reload to a name the nameserver does not know: the pool keeps the old
    name's backends (a failed lookup keeps the last known set), /status says how many, and the
    discovery counters go on from where they were."""
    gw1, gw2 = launcher.gateways(2)
    publish(zone, [gw1, gw2])
    lb = launcher.balancer(discovery_config(zone, interval="5s"))
    await wait_status(lb, lambda s: ids(s) == {"gw-1", "gw-2"}, "both discovered")
    lookups_before = metric(await metrics_text(lb), "lb_discovery_lookups_total", pool="gateways")
    assert lookups_before is not None and lookups_before >= 1
    config = json.loads(json.dumps(lb.config))
    config["pools"]["gateways"]["discovery"]["dns"] = "nowhere.game.svc.cluster.local"
    await reload_with(lb, config, expect="reloaded configuration")
    data = await wait_status(
        lb, lambda s: "nowhere" in s["pools"]["gateways"]["discovery"]["last_error"], "the new name's error"
    )
    found = data["pools"]["gateways"]["discovery"]
    assert (found["dns"], found["backends"]) == ("nowhere.game.svc.cluster.local", 2), found
    assert ids(data) == {"gw-1", "gw-2"}
    assert {(await visit(lb.ws_url())).server_id for _ in range(4)} == {"gw-1", "gw-2"}
    lookups_after = metric(await metrics_text(lb), "lb_discovery_lookups_total", pool="gateways")
    assert lookups_after is not None and lookups_after > lookups_before
