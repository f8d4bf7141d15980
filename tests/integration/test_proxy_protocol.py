"""`listeners[].proxy_protocol: true` (SPEC part 2): the client address comes from a PROXY v1/v2 header.

One module stack: a recording spy backend and a balancer with three listeners on loopback: a plain
one without PROXY protocol, a plain one with it, and a TLS one with it (the header comes before the
TLS ClientHello).  Clients are blocking sockets with timeouts, so each one sends exactly the bytes
the scenario needs (a header split over segments, garbage, nothing at all).

What must hold: the spy sees X-Forwarded-For = the header's source address (v1 and v2, TCP4 and
TCP6; LOCAL and UNKNOWN fall back to the socket's peer) and the access log line names it; a
connection without a valid header (a plain HTTP request, garbage, silence past
`timeouts.handshake`) is closed without one byte of answer and never reaches a backend; the
listener without `proxy_protocol` is unchanged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.procs import free_port
from tests.harness import HOST, UNIT
from tests.harness.ops import launched, rewrite_config, signal_balancer
from tests.harness.processes import STEADY_HEALTH, Balancer, Launcher, lb_certs, lb_config
from tests.harness.spy import SeenRequest, SpyBackend

HANDSHAKE = 1.0  # timeouts.handshake of this stack, seconds
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@dataclass
class PPStack:
    balancer: Balancer
    spy: SpyBackend
    plain_port: int  # no PROXY protocol
    pp_port: int  # PROXY protocol, plain HTTP
    pp_tls_port: int  # PROXY protocol, then TLS
    ca: Path


@pytest.fixture(scope="module")
def pp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PPStack]:
    with launched(tmp_path_factory, "pp") as launcher:
        certs = lb_certs(launcher.workdir / "certs")
        spy = launcher.spy()
        config = lb_config(
            pools={"spy": [spy]},
            health=STEADY_HEALTH,
            overrides={
                "timeouts": {"handshake": f"{int(HANDSHAKE * 1000)}ms"},
                "logging": {"level": "INFO", "format": "json", "access_log": True},
                "limits": {"handshake_rate_per_ip": 0},
            },
        )
        plain, pp_port, pp_tls = free_port(), free_port(), free_port()
        tls = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
        config["listeners"] = [
            {"bind": f"{HOST}:{plain}"},
            {"bind": f"{HOST}:{pp_port}", "proxy_protocol": True},
            {"bind": f"{HOST}:{pp_tls}", "proxy_protocol": True, "tls": tls},
        ]
        balancer = launcher.balancer(config, name="pp")
        balancer.wait_states({("spy", spy.id): "up"})
        yield PPStack(balancer, spy, plain, pp_port, pp_tls, certs / "ca.crt")


# -- headers ---------------------------------------------------------------------------------------


def v1(src: str, dst: str | None = None, sport: int = 40000, dport: int = 443) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = dst or ("2001:db8::1" if ":" in src else "127.0.0.1")
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str | None = None, sport: int = 40000, dport: int = 443, *, tlvs: bytes = b"") -> bytes:
    source = ipaddress.ip_address(src)
    destination = ipaddress.ip_address(dst or ("2001:db8::1" if source.version == 6 else "127.0.0.1"))
    family = 0x11 if source.version == 4 else 0x21  # TCP over IPv4 / IPv6
    block = source.packed + destination.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + len(block).to_bytes(2, "big") + block


def v2_local() -> bytes:
    """LOCAL: the L4 balancer's own connection (a health check): the peer's address stands."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + (0).to_bytes(2, "big")


# -- clients ---------------------------------------------------------------------------------------


def request(tag: str) -> bytes:
    return f"GET /pp/{tag} HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n".encode()


def read_all(sock: socket.socket | ssl.SSLSocket, within: float) -> bytes:
    """Everything until the peer closes (a reset counts as a close), or fail after `within`."""
    sock.settimeout(within)
    out = b""
    deadline = time.monotonic() + within
    with contextlib.suppress(ConnectionResetError, ssl.SSLError, BrokenPipeError):
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"still open after {within}s, got {out[:200]!r}") from None
            if not chunk:
                break
            out += chunk
    return out


def exchange(
    port: int, pieces: list[bytes], *, tls_ca: Path | None = None, header: bytes = b"", source: str = ""
) -> bytes:
    """Send `header` (before TLS, if any), then `pieces` one write each; return all that came back.

    `source`: the client's own address (any 127.x is a distinct peer), else the system's choice."""
    with socket.create_connection((HOST, port), timeout=5 * UNIT, source_address=(source, 0)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if header:
            raw.sendall(header)
        if tls_ca is None:
            for piece in pieces:
                raw.sendall(piece)
            return read_all(raw, 5 * UNIT)
        context = ssl.create_default_context(cafile=str(tls_ca))
        with context.wrap_socket(raw, server_hostname=HOST) as sock:
            for piece in pieces:
                sock.sendall(piece)
            return read_all(sock, 5 * UNIT)


def seen(pp: PPStack, tag: str) -> SeenRequest:
    found = [r for r in pp.spy.requests if r.path == f"/pp/{tag}"]
    assert len(found) == 1, f"the spy saw {len(found)} requests for /pp/{tag}"
    return found[0]


def access_entry(pp: PPStack, tag: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5 * UNIT
    while True:
        for line in pp.balancer.err_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "request" and entry.get("path") == f"/pp/{tag}":
                    return dict(entry)
        assert time.monotonic() < deadline, f"no access log line for /pp/{tag}:\n{pp.balancer.logs_tail()}"
        time.sleep(0.05)


def assert_forwarded(pp: PPStack, answer: bytes, tag: str, client: str) -> None:
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]  # the spy's own answer: it was forwarded
    assert seen(pp, tag).get("X-Forwarded-For") == client
    assert access_entry(pp, tag)["client"] == client


def new_tag() -> str:
    return secrets.token_hex(6)


# -- the header gives the client address -------------------------------------------------------------

SOURCES = ["203.0.113.7", "2001:db8::7"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_plain_listener_takes_the_client_from_the_header(pp: PPStack, make: Any, source: str) -> None:
    """On a proxy_protocol listener the client address is the v1/v2 header's source, not the peer's."""
    tag = new_tag()
    answer = exchange(pp.pp_port, [make(source) + request(tag)])  # header and request in one segment
    assert_forwarded(pp, answer, tag, source)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_tls_listener_reads_the_header_before_the_handshake(pp: PPStack, make: Any, source: str) -> None:
    """A TLS proxy_protocol listener reads the header first, then the TLS handshake, and uses its source."""
    tag = new_tag()
    answer = exchange(pp.pp_tls_port, [request(tag)], tls_ca=pp.ca, header=make(source))
    assert_forwarded(pp, answer, tag, source)


@pytest.mark.parametrize("port", ["pp_port", "pp_tls_port"])
@pytest.mark.parametrize("header", [v2_local(), b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_header_without_an_address_leaves_the_peer(pp: PPStack, port: str, header: bytes) -> None:
    """A header with no address (v2 LOCAL, v1 UNKNOWN) is accepted and the client address stays the peer's."""
    tag = new_tag()
    tls = pp.ca if port == "pp_tls_port" else None
    answer = exchange(getattr(pp, port), [request(tag)], tls_ca=tls, header=header)
    assert_forwarded(pp, answer, tag, "127.0.0.1")


def test_v2_with_tlvs_is_accepted(pp: PPStack) -> None:
    """Cloud balancers add TLVs (an AWS VPC endpoint id here): skipped, the address still counts."""
    tag = new_tag()
    tlv = bytes([0xEA]) + (9).to_bytes(2, "big") + b"\x01vpce-123"
    answer = exchange(pp.pp_port, [v2("198.51.100.9", tlvs=tlv) + request(tag)])
    assert_forwarded(pp, answer, tag, "198.51.100.9")


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_header_split_over_many_segments(pp: PPStack, make: Any) -> None:
    """The header arrives a few bytes at a time; the request after it is intact."""
    tag = new_tag()
    header = make("192.0.2.44")
    with socket.create_connection((HOST, pp.pp_port), timeout=5 * UNIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(header), 3):
            sock.sendall(header[start : start + 3])
            time.sleep(0.005)  # separate segments; correctness does not depend on it
        sock.sendall(request(tag))
        answer = read_all(sock, 5 * UNIT)
    assert_forwarded(pp, answer, tag, "192.0.2.44")


def test_keep_alive_after_the_header(pp: PPStack) -> None:
    """Two requests on one connection: the header is read once, both carry its address."""
    first, second = new_tag(), new_tag()
    keep = f"GET /pp/{first} HTTP/1.1\r\nHost: lb.test\r\n\r\n".encode()
    answer = exchange(pp.pp_port, [v1("192.0.2.80") + keep + request(second)])
    # The spy closes after each answer: the balancer reaches it again for the second request, on a new
    # backend connection, and both answers go out on the client's one connection.
    assert answer.count(b"HTTP/1.1 404") == 2, answer[:400]
    assert seen(pp, first).get("X-Forwarded-For") == "192.0.2.80"
    assert seen(pp, second).get("X-Forwarded-For") == "192.0.2.80"


# -- no valid header: closed without an answer ------------------------------------------------------


def assert_closed_silently(pp: PPStack, port: int, data: bytes, tag: str) -> None:
    answer = exchange(port, [data] if data else [])
    assert answer == b"", f"answered {answer[:200]!r}"
    assert not [r for r in pp.spy.requests if r.path == f"/pp/{tag}"], "it reached the backend"


@pytest.mark.parametrize("port", ["pp_port", "pp_tls_port"])
def test_missing_header_is_closed_without_an_answer(pp: PPStack, port: str) -> None:
    """A connection without the PROXY header is closed unanswered and reaches no backend."""
    tag = new_tag()
    assert_closed_silently(pp, getattr(pp, port), request(tag), tag)


@pytest.mark.parametrize(
    "garbage",
    [
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\r\n",
        b"PROXY \x00\x01\x02\x03\x04",
        V2_SIGNATURE + bytes([0x31, 0x11]) + (12).to_bytes(2, "big") + bytes(12),  # version 3
        V2_SIGNATURE + bytes([0x21, 0x11]) + (60000).to_bytes(2, "big"),  # longer than any real header
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello with no header before it
        bytes(range(256)) * 4,
    ],
    ids=["v1-bad-ip", "v1-short", "v1-binary", "v2-version", "v2-huge", "tls-first", "noise"],
)
def test_garbage_is_closed_without_an_answer(pp: PPStack, garbage: bytes) -> None:
    """A malformed PROXY header is closed unanswered and what follows it reaches no backend."""
    tag = new_tag()
    assert_closed_silently(pp, pp.pp_port, garbage + request(tag), tag)


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n", bytes(range(256)) * 40])
def test_a_refused_connection_is_closed_with_a_fin_not_a_reset(pp: PPStack, sent: bytes) -> None:
    """What the peer sent is read off before the close, so a client reading to the end gets an orderly end
    (b""), not ECONNRESET (SPEC: "closed without an answer")."""
    tag = new_tag()
    with socket.create_connection((HOST, pp.pp_port), timeout=5 * UNIT) as sock:
        sock.sendall(sent + request(tag))
        sock.settimeout(5 * UNIT)
        assert sock.recv(65536) == b"", "closed, unanswered"  # ConnectionResetError: a reset


def test_silent_client_is_closed_after_the_handshake_timeout(pp: PPStack) -> None:
    """A client that sends no header is closed, unanswered, once timeouts.handshake runs out."""
    started = time.monotonic()
    with socket.create_connection((HOST, pp.pp_port), timeout=5 * UNIT) as sock:
        answer = read_all(sock, HANDSHAKE + 5 * UNIT)
    took = time.monotonic() - started
    assert answer == b""
    assert HANDSHAKE * 0.8 <= took <= HANDSHAKE + 4 * UNIT, took


def test_half_a_header_then_silence_is_closed_after_the_handshake_timeout(pp: PPStack) -> None:
    """Half a header, then silence: closed, unanswered, once timeouts.handshake runs out."""
    started = time.monotonic()
    with socket.create_connection((HOST, pp.pp_port), timeout=5 * UNIT) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2")
        answer = read_all(sock, HANDSHAKE + 5 * UNIT)
    took = time.monotonic() - started
    assert answer == b""
    assert HANDSHAKE * 0.8 <= took <= HANDSHAKE + 4 * UNIT, took


def test_a_bad_connection_does_not_disturb_others(pp: PPStack) -> None:
    """A silent preamble and a garbage one are open while a good client is served at once."""
    with socket.create_connection((HOST, pp.pp_port)) as silent, socket.create_connection((HOST, pp.pp_port)) as bad:
        bad.sendall(b"PROXY TCP4 192.0.2")
        tag = new_tag()
        started = time.monotonic()
        answer = exchange(pp.pp_port, [v2("192.0.2.99") + request(tag)])
        assert time.monotonic() - started < HANDSHAKE, "the good client waited for the bad ones"
        assert_forwarded(pp, answer, tag, "192.0.2.99")
        silent.settimeout(0.01)
        del silent, bad


# -- a listener without proxy_protocol is unchanged ---------------------------------------------------


def test_listener_without_proxy_protocol_is_unchanged(pp: PPStack) -> None:
    """A listener without proxy_protocol forwards as before, with the peer as the client."""
    tag = new_tag()
    answer = exchange(pp.plain_port, [request(tag)])
    assert_forwarded(pp, answer, tag, "127.0.0.1")


def test_listener_without_proxy_protocol_does_not_read_a_header(pp: PPStack) -> None:
    """There a PROXY line is just a bad request line: answered 400, never trusted for the address."""
    tag = new_tag()
    answer = exchange(pp.plain_port, [v1("203.0.113.50") + request(tag)])
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert not [r for r in pp.spy.requests if r.path == f"/pp/{tag}"]


def test_balancer_survived(pp: PPStack) -> None:
    """After every hostile preamble above, the balancer still runs and logged no traceback."""
    pp.balancer.assert_alive()
    text = pp.balancer.log_text()
    assert "Traceback" not in text, pp.balancer.logs_tail()


# -- reload: turning proxy_protocol on or off is a different listener on the same socket --------------


def wait_reloaded(lb: Balancer, mark: int) -> None:
    deadline = time.monotonic() + 10 * UNIT
    while True:
        lines = lb.log_text().splitlines()[mark:]
        assert not [line for line in lines if "reload failed" in line], lb.logs_tail()
        if [line for line in lines if "reloaded configuration" in line]:
            return
        assert time.monotonic() < deadline, f"no reload within {10 * UNIT}s:\n{lb.logs_tail()}"
        time.sleep(0.05)


def reload_with(lb: Balancer, config: dict[str, Any]) -> None:
    """tests.harness.ops.reload_with for these blocking tests: also fails at once on a "reload failed" line."""
    rewrite_config(lb, config)
    mark = lb.log_lines()
    signal_balancer(lb, signal.SIGHUP)
    wait_reloaded(lb, mark)


def forwarded_for(spy: SpyBackend, tag: str) -> str | None:
    found = [r for r in spy.requests if r.path == f"/pp/{tag}"]
    assert len(found) == 1, f"the spy saw {len(found)} requests for /pp/{tag}"
    return found[0].get("X-Forwarded-For")


def test_reload_turns_proxy_protocol_on_and_off(launcher: Launcher) -> None:
    """SIGHUP with proxy_protocol flipped on the same address: the reload succeeds (no busy port),
    and from then on the listener reads, or no longer reads, the header."""
    spy = launcher.spy()
    config = lb_config(
        pools={"spy": [spy]},
        health=STEADY_HEALTH,
        overrides={"timeouts": {"handshake": "1s"}, "limits": {"handshake_rate_per_ip": 0}},
    )
    lb = launcher.balancer(config, name="pp-reload")
    lb.wait_states({("spy", spy.id): "up"})
    assert lb.port is not None
    tag = new_tag()
    assert exchange(lb.port, [request(tag)]).startswith(b"HTTP/1.1 404")
    assert forwarded_for(spy, tag) == "127.0.0.1"

    config["listeners"][0]["proxy_protocol"] = True
    reload_with(lb, config)
    tag = new_tag()
    assert exchange(lb.port, [v2("203.0.113.77") + request(tag)]).startswith(b"HTTP/1.1 404")
    assert forwarded_for(spy, tag) == "203.0.113.77"
    tag = new_tag()
    assert exchange(lb.port, [request(tag)]) == b"", "a headerless request was answered"
    assert not [r for r in spy.requests if r.path == f"/pp/{tag}"]

    config["listeners"][0]["proxy_protocol"] = False
    reload_with(lb, config)
    tag = new_tag()
    assert exchange(lb.port, [request(tag)]).startswith(b"HTTP/1.1 404")
    assert forwarded_for(spy, tag) == "127.0.0.1"
    lb.assert_alive()


def test_a_header_is_believed_only_from_the_peers_in_proxy_protocol_from(launcher: Launcher) -> None:
    """`proxy_protocol_from`: a peer outside it is closed unanswered (its header would name any client it
    likes), and says so in the log; a reload that keeps the listener changes whom it believes."""
    spy = launcher.spy()
    config = lb_config(
        pools={"spy": [spy]},
        health=STEADY_HEALTH,
        overrides={"limits": {"handshake_rate_per_ip": 0}, "logging": {"level": "INFO"}},
    )
    config["listeners"][0].update(proxy_protocol=True, proxy_protocol_from=["127.0.0.2/32", "2001:db8::/32"])
    lb = launcher.balancer(config, name="pp-from")
    lb.wait_states({("spy", spy.id): "up"})
    assert lb.port is not None

    def believed_only_from(believed: str, refused: str, client: str) -> None:
        assert lb.port is not None
        tag = new_tag()
        assert exchange(lb.port, [v1(client) + request(tag)], source=believed).startswith(b"HTTP/1.1 404")
        assert forwarded_for(spy, tag) == client
        tag = new_tag()
        assert exchange(lb.port, [v1(client) + request(tag)], source=refused) == b""
        assert not [r for r in spy.requests if r.path == f"/pp/{tag}"]

    believed_only_from("127.0.0.2", "127.0.0.3", "203.0.113.8")
    lb.wait_logged(lambda text: "not in listeners[].proxy_protocol_from" in text, within=5 * UNIT,
                   what="no line for a peer not in proxy_protocol_from")
    config["listeners"][0]["proxy_protocol_from"] = ["127.0.0.3"]
    reload_with(lb, config)
    believed_only_from("127.0.0.3", "127.0.0.2", "203.0.113.10")
    lb.assert_alive()


def test_a_refused_connection_is_logged_for_the_operator(pp: PPStack) -> None:
    """An L4 balancer that does not send the header is a misconfiguration: it shows in the log (rate-limited)."""
    tag = new_tag()
    assert_closed_silently(pp, pp.pp_port, request(tag), tag)
    pp.balancer.wait_logged(lambda text: "without an answer" in text, within=5 * UNIT,
                            what="no line for the connection closed without an answer")
    assert "proxy_protocol" in pp.balancer.log_text()


def test_workers_share_a_proxy_protocol_listener(launcher: Launcher) -> None:
    """`workers: 2`: each worker binds the PROXY listener with SO_REUSEPORT and reads the header itself."""
    spy = launcher.spy()
    config = lb_config(
        pools={"spy": [spy]},
        health=STEADY_HEALTH,
        overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}},
    )
    config["listeners"][0]["proxy_protocol"] = True
    lb = launcher.balancer(config, name="pp-workers")
    lb.wait_states({("spy", spy.id): "up"})
    assert lb.port is not None
    lb.wait_logged(lambda text: "listening on" in text and text.count("PROXY protocol") >= 2, within=10 * UNIT,
                   what="two workers not listening")
    for index in range(12):
        tag, source = new_tag(), f"192.0.2.{index + 1}"
        assert exchange(lb.port, [v1(source) + request(tag)]).startswith(b"HTTP/1.1 404")
        assert forwarded_for(spy, tag) == source
    tag = new_tag()
    assert exchange(lb.port, [request(tag)]) == b""
    lb.assert_alive()


def test_a_spoofed_forwarded_for_does_not_beat_the_header(pp: PPStack) -> None:
    """The header's source is not a trusted proxy: the client's own X-Forwarded-For is replaced, not believed."""
    tag = new_tag()
    spoofed = f"GET /pp/{tag} HTTP/1.1\r\nHost: lb.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n"
    answer = exchange(pp.pp_port, [v2("203.0.113.9") + spoofed.encode()])
    assert_forwarded(pp, answer, tag, "203.0.113.9")


def test_header_and_client_hello_in_one_segment(pp: PPStack) -> None:
    """As an L4 balancer may send them: the header and the TLS ClientHello in one write.  The listener
    must take exactly the header and leave the ClientHello, whole, to TLS."""
    context = ssl.create_default_context(cafile=str(pp.ca))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    tag = new_tag()
    with socket.create_connection((HOST, pp.pp_tls_port), timeout=5 * UNIT) as sock:
        sock.sendall(v2("192.0.2.123") + hello)
        deadline = time.monotonic() + 5 * UNIT
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                chunk = sock.recv(65536)
                assert chunk, "closed during the TLS handshake"
                incoming.write(chunk)
            assert time.monotonic() < deadline, "TLS handshake did not finish"
        tls.write(request(tag))
        sock.sendall(outgoing.read())
        answer = b""
        while not answer.endswith(b"spy: no such page\n"):
            try:
                answer += tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
            assert time.monotonic() < deadline + 5 * UNIT, answer
    assert_forwarded(pp, answer, tag, "192.0.2.123")


# -- TLS listeners accept the same way (lb.proxy.preamble.AcceptingServer without a header) --------


def test_reload_turns_tls_on_and_off_on_the_same_port(launcher: Launcher) -> None:
    """SIGHUP adding `tls` to a running listener: the same socket is taken over by a TLS listener that
    accepts itself, and taken back by a plain one when `tls` goes again."""
    certs = lb_certs(launcher.workdir / "certs-reload")
    spy = launcher.spy()
    config = lb_config(pools={"spy": [spy]}, health=STEADY_HEALTH, overrides={"limits": {"handshake_rate_per_ip": 0}})
    lb = launcher.balancer(config, name="tls-reload")
    lb.wait_states({("spy", spy.id): "up"})
    assert lb.port is not None
    assert exchange(lb.port, [request(new_tag())]).startswith(b"HTTP/1.1 404")

    config["listeners"][0]["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    reload_with(lb, config)
    assert exchange(lb.port, [request(new_tag())], tls_ca=certs / "ca.crt").startswith(b"HTTP/1.1 404")
    assert not exchange(lb.port, [request(new_tag())]).startswith(b"HTTP/"), "plain HTTP answered on TLS"

    del config["listeners"][0]["tls"]
    reload_with(lb, config)
    assert exchange(lb.port, [request(new_tag())]).startswith(b"HTTP/1.1 404")
    lb.assert_alive()


def test_workers_share_a_tls_listener(launcher: Launcher) -> None:
    """`workers: 2`: each worker binds the TLS listener with SO_REUSEPORT and runs its own handshakes."""
    certs = lb_certs(launcher.workdir / "certs-workers")
    spy = launcher.spy()
    config = lb_config(pools={"spy": [spy]}, health=STEADY_HEALTH,
                       overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}})
    config["listeners"][0]["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    lb = launcher.balancer(config, name="tls-workers")
    lb.wait_states({("spy", spy.id): "up"})
    port = lb.tls_port or lb.port
    assert port is not None
    lb.wait_logged(lambda text: text.count("(TLS)") >= 2, within=10 * UNIT, what="two workers not listening")
    for _ in range(8):
        assert exchange(port, [request(new_tag())], tls_ca=certs / "ca.crt").startswith(b"HTTP/1.1 404")
    lb.assert_alive()
