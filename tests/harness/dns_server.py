"""A real DNS server on loopback whose answers a test changes while the balancer resolves against it.

`ZoneServer` wraps dnslib's `DNSServer` (UDP, in a thread of this process) on a port the
kernel picks.  The zone is a mutable table: `set_srv(name, [(target, port), ...])` and
`set_a(name, [ip, ...])`; targets of SRV records are answered from the same table, and
`additional=True` also puts their addresses in the SRV answer's additional section (as
CoreDNS does); `delay` makes every answer late; `truncate` makes every answer a truncated (TC)
one; `fail_next(name, qtype, fault)` makes only the next query for that name and type fail
(answered late, or with SERVFAIL or REFUSED), as one lost packet or one hiccup of a cluster's DNS.
`rotate_srv(name, [records, records, ...])` answers each SRV query for `name` with the next set in
turn, as a round-robin nameserver or a headless Service returning a subset does.
`stop()` takes the server away, so lookups fail (connection refused) as they do when a cluster's
DNS is down.  Nothing here imports `lb`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

TTL = 1


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, server: ZoneServer) -> None:
        self._server = server

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        if self._server.delay:
            time.sleep(self._server.delay)  # a slow server (dnslib answers each query in its own thread)
        name = _key(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        zone = self._server
        with zone.lock:
            fault = zone.faults.pop((name, qtype), None)
            if fault is not None:
                zone.faulted.append((name, qtype, fault))
        if fault == "timeout":
            time.sleep(zone.late)  # answered after the client gave up (and then normally)
        elif fault is not None:
            with zone.lock:
                zone.queries.append((name, qtype))
            reply.header.rcode = getattr(RCODE, fault)
            return reply
        with zone.lock:
            zone.queries.append((name, qtype))
            rotation = zone.rotations.get(name)
            if qtype == "SRV" and rotation:
                zone.srv[name] = rotation.pop(0)
                rotation.append(zone.srv[name])
            srv = zone.srv.get(name)
            addresses = zone.a.get(name)
            known = srv is not None or addresses is not None
            if qtype == "SRV" and srv:
                for target, port, weight in srv:
                    reply.add_answer(RR(request.q.qname, QTYPE.SRV, ttl=TTL,
                                        rdata=SRV(priority=10, weight=weight, port=port, target=target + ".")))
                    if zone.additional:
                        for ip in zone.a.get(_key(target), ()):
                            reply.add_ar(_address_rr(target + ".", ip))
            elif qtype in ("A", "AAAA") and addresses:
                for ip in addresses:
                    if (":" in ip) == (qtype == "AAAA"):
                        reply.add_answer(_address_rr(str(request.q.qname), ip))
            elif not known:
                reply.header.rcode = RCODE.NXDOMAIN
            if zone.truncate:
                # "Too big for UDP, ask again over TCP" with what fitted: here nothing (and no TCP here).
                reply.header.tc = 1
                reply.rr, reply.ar = [], []
        return reply


def _address_rr(name: str, ip: str) -> RR:
    if ":" in ip:
        return RR(name, QTYPE.AAAA, ttl=TTL, rdata=AAAA(ip))
    return RR(name, QTYPE.A, ttl=TTL, rdata=A(ip))


class ZoneServer:
    """A loopback UDP DNS server answering from a table the test edits."""

    def __init__(self, *, additional: bool = True) -> None:
        self.lock = threading.Lock()
        self.srv: dict[str, list[tuple[str, int, int]]] = {}
        self.a: dict[str, list[str]] = {}
        self.additional = additional
        self.queries: list[tuple[str, str]] = []
        self.delay = 0.0  # seconds before each answer
        self.truncate = False  # answer with TC set and no records (this server speaks no TCP)
        self.faults: dict[tuple[str, str], str] = {}  # (name, qtype) -> the fault of its next query
        self.faulted: list[tuple[str, str, str]] = []  # (name, qtype, fault) of the queries that failed
        self.rotations: dict[str, list[list[tuple[str, int, int]]]] = {}  # SRV answers taken in turn, by name
        self.late = 2.0  # seconds a "timeout" fault holds its answer back
        self.port = 0
        self._server: DNSServer | None = None

    def start(self, port: int = 0) -> ZoneServer:
        server = DNSServer(_ZoneResolver(self), port=port, address="127.0.0.1", logger=_QuietLogger())
        original = server.server.handle_error

        def handle_error(request: Any, client_address: Any) -> None:
            # A late answer to a query in flight when the test stopped the server: its socket is gone.
            if self._server is not None:
                original(request, client_address)

        server.server.handle_error = handle_error
        server.start_thread()
        self._server = server
        self.port = int(server.server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server.server.server_close()
            self._server = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_srv(self, name: str, records: Iterable[tuple[str, int] | tuple[str, int, int]]) -> None:
        """SRV records (target, port[, weight]) for `name`; an empty list means "no records"."""
        with self.lock:
            self.srv[_key(name)] = [(_key(r[0]), r[1], r[2] if len(r) > 2 else 50) for r in records]  # type: ignore[misc]

    def rotate_srv(self, name: str, answers: Sequence[Iterable[tuple[str, int]]]) -> None:
        """Each SRV query for `name` is answered with the next of `answers` (records as `set_srv`'s)."""
        with self.lock:
            self.rotations[_key(name)] = [[(_key(target), port, 50) for target, port in records]
                                          for records in answers]

    def set_a(self, name: str, addresses: Sequence[str]) -> None:
        with self.lock:
            self.a[_key(name)] = list(addresses)

    def fail_next(self, name: str, qtype: str, fault: str) -> None:
        """The next `qtype` query for `name` fails: "timeout" (answered `late`), "SERVFAIL" or "REFUSED"."""
        assert fault in ("timeout", "SERVFAIL", "REFUSED"), fault
        with self.lock:
            self.faults[(_key(name), qtype)] = fault

    def failed(self, name: str, qtype: str) -> bool:
        """Whether a query for `name` and `qtype` got its fault."""
        with self.lock:
            return any((n, t) == (_key(name), qtype) for n, t, _ in self.faulted)

    def queried(self, name: str) -> int:
        with self.lock:
            return sum(1 for n, _ in self.queries if n == _key(name))


class _QuietLogger:
    """dnslib logs every query to stdout by default; tests keep their output for failures."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *args, **kwargs: None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
