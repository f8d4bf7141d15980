"""`discovery.nameservers` is a list to fail over on: a first nameserver that never answers must not
take the whole `timeout` of a query, or the next ones are never asked (`lb.control.discovery`).
Real UDP sockets on loopback: one that drops every query, one that answers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import dns.exception
import dns.flags
import dns.message
import dns.rrset

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
