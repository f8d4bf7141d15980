"""`discovery.nameservers` is a list to fail over on: a first nameserver that never answers must not
take the whole `timeout` of a query, or the next ones are never asked (`lb.control.discovery`).
Real UDP sockets on loopback: one that drops every query, one that answers."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from lb.config.model import DiscoveryConfig, DiscoveryType
from lb.control import discovery


def _udp_server(answer: Callable[[dns.message.Message], bytes]) -> tuple[socket.socket, int]:
    """A nameserver on a loopback UDP port, on a thread: `answer` turns each query into its reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            sock.sendto(answer(dns.message.from_wire(data)), peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def _answering_server() -> tuple[socket.socket, int]:
    def answer(query: dns.message.Message) -> bytes:
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN", "A", "127.0.0.7"))
        return reply.to_wire()

    return _udp_server(answer)


def test_a_silent_first_nameserver_leaves_time_for_the_next() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, answers none
    silent.bind(("127.0.0.1", 0))
    good, good_port = _answering_server()
    try:
        config = DiscoveryConfig(
            "gw.test", type=DiscoveryType.A, port=9000, timeout=1.0,
            nameservers=(("127.0.0.1", silent.getsockname()[1]), ("127.0.0.1", good_port)),
        )
        found, _ttl = asyncio.run(discovery.lookup(config, discovery.make_resolver(config)))
        assert [(b.host, b.port) for b in found.backends] == [("127.0.0.7", 9000)]
    finally:
        silent.close()
        good.close()


def _sized_server(addresses: int) -> tuple[socket.socket, int]:
    """Answers every A query with `addresses` records over UDP, as a nameserver does: whole when it fits
    the size the query offers (EDNS0's payload, else 512 bytes), else truncated (TC, no records: ask
    again over TCP, which nobody here answers)."""

    def answer(query: dns.message.Message) -> bytes:
        reply = dns.message.make_response(query)
        ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(addresses)]
        reply.answer.append(dns.rrset.from_text_list(query.question[0].name, 5, "IN", "A", ips))
        try:
            return reply.to_wire(max_size=max(512, query.payload) if query.edns >= 0 else 512)
        except dns.exception.TooBig:
            reply.answer = []
            reply.flags |= dns.flags.TC
            return reply.to_wire()

    return _udp_server(answer)


def test_an_answer_past_512_bytes_comes_over_udp() -> None:
    """40 A records (about 700 bytes): past the 512 bytes of plain DNS over UDP, so without EDNS0 the
    answer came truncated and was asked again over TCP/53, which a NetworkPolicy that lets only UDP
    through (and this server) refuses: the pool never got its backends.  EDNS0 offers 1232 bytes, the
    size that needs no IP fragment (DNS Flag Day 2020)."""
    server, port = _sized_server(40)
    try:
        config = DiscoveryConfig("gw.test", type=DiscoveryType.A, port=9000, timeout=1.0,
                                 nameservers=(("127.0.0.1", port),))
        found, _ttl = asyncio.run(discovery.lookup(config, discovery.make_resolver(config)))
        assert len(found.backends) == 40
    finally:
        server.close()


def _edns_refusing_server(rcode: int, *, with_opt: bool = False) -> tuple[socket.socket, int, list[bool]]:
    """Answers a query with EDNS0 by `rcode` (an OPT record of its own only `with_opt`), one without
    it with an A record, as a nameserver that does not speak EDNS0 does (RFC 6891, 7).  The list
    records whether each query offered EDNS0."""
    offered: list[bool] = []

    def answer(query: dns.message.Message) -> bytes:
        offered.append(query.edns >= 0)
        reply = dns.message.make_response(query)
        if query.edns >= 0:
            if not with_opt:
                reply.use_edns(False)
            reply.set_rcode(rcode)
            return reply.to_wire()
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN", "A", "127.0.0.7"))
        return reply.to_wire()

    server, port = _udp_server(answer)
    return server, port, offered


@pytest.mark.parametrize("rcode", [dns.rcode.FORMERR, dns.rcode.NOTIMP], ids=["FORMERR", "NOTIMP"])
def test_a_nameserver_that_does_not_speak_edns0_is_asked_again_without_it(
    rcode: int, caplog: pytest.LogCaptureFixture
) -> None:
    """dnspython takes a FORMERR to EDNS0 for a failure and asks no more: with EDNS0 on, every lookup
    against an old or minimal nameserver failed.  Asked again without it, the lookup gets its answer,
    and the operator is told once (answers past 512 bytes will need TCP/53)."""
    server, port, offered = _edns_refusing_server(rcode)
    try:
        config = DiscoveryConfig("gw.test", type=DiscoveryType.A, port=9000, timeout=1.0,
                                 nameservers=(("127.0.0.1", port),))
        resolver = discovery.make_resolver(config)

        async def twice() -> list[discovery.Discovered]:
            return [(await discovery.lookup(config, resolver))[0] for _ in range(2)]

        with caplog.at_level(logging.WARNING, logger="lb.control.discovery"):
            found = asyncio.run(twice())
        assert [[(b.host, b.port) for b in one.backends] for one in found] == [[("127.0.0.7", 9000)]] * 2
        # The first queries (A and AAAA, together) offered EDNS0 and were asked again without it; from
        # then on every query goes without: no second round trip each time, no double load on the server.
        assert offered[0] is True and 1 <= offered.count(True) <= 2 and offered[-2:] == [False, False], offered
        warnings = [r.getMessage() for r in caplog.records if "EDNS0" in r.getMessage()]
        assert len(warnings) == 1 and f"127.0.0.1@{port}" in warnings[0], warnings
    finally:
        server.close()


def test_a_formerr_from_a_nameserver_that_speaks_edns0_is_a_failure() -> None:
    """FORMERR with an OPT record of its own: the server knows EDNS0 and found the query itself wrong,
    so asking again without EDNS0 would only hide the error."""
    server, port, offered = _edns_refusing_server(dns.rcode.FORMERR, with_opt=True)
    try:
        config = DiscoveryConfig("gw.test", type=DiscoveryType.A, port=9000, timeout=1.0,
                                 nameservers=(("127.0.0.1", port),))
        with pytest.raises(discovery.DiscoveryError, match="FORMERR"):
            asyncio.run(discovery.lookup(config, discovery.make_resolver(config)))
        assert offered == [True]
    finally:
        server.close()


def test_one_nameserver_without_edns0_beside_one_that_never_answers() -> None:
    """dnspython drops the one that refused EDNS0 and waits out the silent one: the query runs out of time
    with no room to ask again.  The refusal is remembered, so the next lookup asks without EDNS0 and gets
    its answer; and the operator is told even though the first lookup failed."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    server, port, offered = _edns_refusing_server(dns.rcode.FORMERR)
    try:
        config = DiscoveryConfig("gw.test", type=DiscoveryType.A, port=9000, timeout=0.5,
                                 nameservers=(("127.0.0.1", port), ("127.0.0.1", silent.getsockname()[1])))
        resolver = discovery.make_resolver(config)

        async def twice() -> tuple[str, list[tuple[str, int]]]:
            try:
                await discovery.lookup(config, resolver)
                first = "answered"
            except discovery.DiscoveryError as exc:
                first = str(exc)
            found, _ttl = await discovery.lookup(config, resolver)
            return first, [(b.host, b.port) for b in found.backends]

        first, second = asyncio.run(twice())
        assert second == [("127.0.0.7", 9000)], first
        assert resolver.edns_refused_by is not None and str(port) in resolver.edns_refused_by
        assert offered[0] is True and offered[-1] is False, offered
    finally:
        server.close()
        silent.close()


def _zone_server(zone: dict[tuple[str, str], list[str]]) -> tuple[socket.socket, int, list[str]]:
    """Answers from `zone` ((name, type) -> records, names absolute), NXDOMAIN for a name it has not;
    returns the names asked, in order."""
    asked: list[str] = []

    def answer(query: dns.message.Message) -> bytes:
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        asked.append(name)
        reply = dns.message.make_response(query)
        if (name, rdtype) in zone:
            reply.answer.append(dns.rrset.from_text_list(question.name, 5, "IN", rdtype, zone[(name, rdtype)]))
        elif not any(known == name for known, _ in zone):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()

    sock, port = _udp_server(answer)
    return sock, port, asked


@pytest.mark.parametrize(("name", "rdtype"), [("_ws._tcp.gateway", DiscoveryType.SRV), ("gateway", DiscoveryType.A)])
def test_the_system_resolver_tries_a_short_name_with_its_search_domains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, rdtype: DiscoveryType
) -> None:
    """`nameservers: []` is the system resolver, which looks a name up as `getent hosts` does: one with
    fewer dots than ndots is tried under each `search` domain of /etc/resolv.conf (a pod's namespace:
    `search game.svc.cluster.local ...`, `options ndots:5`).  dnspython's resolver does that only when
    told: `dns: _ws._tcp.gateway` was asked as `_ws._tcp.gateway.` alone, NXDOMAIN at every lookup,
    where everything else in the pod finds it."""
    domain = "game.svc.cluster.local."
    server, port, asked = _zone_server({
        (f"_ws._tcp.gateway.{domain}", "SRV"): [f"0 50 9000 gw-0.gateway.{domain}"],
        (f"gw-0.gateway.{domain}", "A"): ["127.0.0.7"],
        (f"gateway.{domain}", "A"): ["127.0.0.8"],
    })
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver 127.0.0.1\nsearch {domain} svc.cluster.local.\noptions ndots:5\n")
    monkeypatch.setattr(discovery, "RESOLV_CONF", str(resolv_conf))
    try:
        config = DiscoveryConfig(name, type=rdtype, port=9000 if rdtype is DiscoveryType.A else None, timeout=1.0)
        resolver = discovery.make_resolver(config)
        for each in (resolver.sync, resolver._plain):  # resolv.conf names no port: this test's server has one
            each.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
        found, _ttl = asyncio.run(discovery.lookup(config, resolver))
        expected = [("gw-0", "127.0.0.7")] if rdtype is DiscoveryType.SRV else [("127.0.0.8:9000", "127.0.0.8")]
        assert [(b.id, b.host) for b in found.backends] == expected
        # A name ending in a dot is asked as written.
        absolute = DiscoveryConfig(name + ".", type=rdtype, port=config.port, timeout=1.0)
        resolver = discovery.make_resolver(absolute)
        for each in (resolver.sync, resolver._plain):
            each.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
        with pytest.raises(discovery.DiscoveryError, match="NXDOMAIN"):
            asyncio.run(discovery.lookup(absolute, resolver))
        assert asked[-1] == name + "."
    finally:
        server.close()


def test_the_system_resolver_asks_a_name_with_ndots_dots_as_written_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name with as many dots as ndots (README's `_ws._tcp.gateway.game.svc.cluster.local` in a pod) is
    asked as written, and its NXDOMAIN is the answer.  dnspython went on under each search domain: a
    query more per domain at every lookup while the Service was missing, and a host's search domain that
    answered nothing in time made /status say "no answer" instead of NXDOMAIN."""
    domain = "game.svc.cluster.local."
    server, port, asked = _zone_server({})
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver 127.0.0.1\nsearch {domain} svc.cluster.local. corp.example.\noptions ndots:5\n")
    monkeypatch.setattr(discovery, "RESOLV_CONF", str(resolv_conf))
    try:
        name = f"_ws._tcp.gateway.{domain}".rstrip(".")
        config = DiscoveryConfig(name, type=DiscoveryType.SRV, timeout=1.0)
        resolver = discovery.make_resolver(config)
        for each in (resolver.sync, resolver._plain):
            each.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
        with pytest.raises(discovery.DiscoveryError, match="NXDOMAIN"):
            asyncio.run(discovery.lookup(config, resolver))
        assert asked == [name + "."]
    finally:
        server.close()
