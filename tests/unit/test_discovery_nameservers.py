"""`discovery.nameservers` is a list to fail over on: a first nameserver that never answers must not
take the whole `timeout` of a query, or the next ones are never asked (`lb.control.discovery`).
Real UDP sockets on loopback: one that drops every query, one that answers."""

from __future__ import annotations

import asyncio
import socket
import threading

import dns.message
import dns.rrset

from lb.config.model import DiscoveryConfig, DiscoveryType
from lb.control import discovery


def _answering_server() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN", "A", "127.0.0.7"))
            sock.sendto(reply.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


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
