"""Addresses no gateway can have (`lb.config.backend_address`), and discovery's question to the kernel of
which addresses are this host's (`lb.control.discovery.is_local_address`)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config.backend_address import OwnListeners, as_ipv4, not_a_host
from lb.config.model import host_port
from lb.control.discovery import is_local_address

_ipv4 = st.ip_addresses(v=4)
_ipv6 = st.ip_addresses(v=6)
_hosts = st.one_of(_ipv4.map(str), _ipv6.map(str), st.sampled_from(["localhost", "gw.internal", "0.0.0.0", "::"]))
_ports = st.integers(0, 65535)
_few_hosts = st.sampled_from(["127.0.0.1", "::1", "localhost", "10.0.0.1", "::ffff:10.0.0.1", "0.0.0.0", "::"])


@st.composite
def _listeners_and_backend(draw: st.DrawFn) -> tuple[list[tuple[str, int]], str, int]:
    """Listeners and a backend's host and port: a third of the time a listener's, a third of the time
    its port with another host (random ones met a listener's port in 13% of examples, its address in none)."""
    binds = draw(st.lists(st.tuples(_hosts | _few_hosts, _ports), min_size=1, max_size=4))
    host, port = draw(_hosts | _few_hosts), draw(_ports)
    near = draw(st.sampled_from(["port", "bind", "none"]))
    if near != "none":
        host, port = draw(st.sampled_from(binds)) if near == "bind" else (host, draw(st.sampled_from(binds))[1])
    return binds, host, port


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(drawn=_listeners_and_backend())
def test_only_a_listener_on_the_backends_port_is_ever_reached(drawn: tuple[list[tuple[str, int]], str, int]) -> None:
    """Whatever the addresses, a listener on another port, or on port 0 (any free one), is never the one;
    one on the port is, if it binds the backend's own host."""
    binds, host, port = drawn
    own = OwnListeners(tuple(binds), is_local=lambda _ip: True)
    reached = own.reached_by(host, port)
    on_the_port = [bind_host for bind_host, bind_port in binds if bind_port == port != 0]
    assert reached is None or reached in {host_port(bind_host, port) for bind_host in on_the_port}
    if host in on_the_port:
        assert reached is not None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(ip=_ipv4)
def test_an_ipv6_wildcard_never_takes_an_ipv4_address(ip: ipaddress.IPv4Address) -> None:
    """Every socket here is IPV6_V6ONLY, and an IPv4-mapped address is its IPv4 one."""
    own = OwnListeners((("::", 8080),), is_local=lambda _ip: True)
    assert own.reached_by(str(ip), 8080) is None
    assert own.reached_by(f"::ffff:{ip}", 8080) is None


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


# Random addresses were IPv4-mapped in 3% of examples and no host's in 7%: drawn as often as the others are
# IPv4-mapped addresses, addresses no host has, and those IPv4-mapped.
_no_hosts_v4 = st.one_of(st.ip_addresses(network="224.0.0.0/4"),
                         st.sampled_from(["0.0.0.0", "255.255.255.255"]).map(ipaddress.IPv4Address))
_no_hosts = st.one_of(_no_hosts_v4, st.ip_addresses(network="ff00::/8"), st.just(ipaddress.IPv6Address("::")))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(ip=st.one_of(_ipv4, _ipv6, _ipv4.map(_mapped), _no_hosts, _no_hosts_v4.map(_mapped)))
def test_a_mapped_address_reads_as_its_ipv4_and_only_then(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    mapped = as_ipv4(ip)
    assert mapped == ip or (isinstance(ip, ipaddress.IPv6Address) and mapped == ip.ipv4_mapped)
    assert (not_a_host(ip) is None) == (not (ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255"))


def test_loopback_addresses_are_this_hosts() -> None:
    assert is_local_address(ipaddress.ip_address("127.0.0.9"))
    assert is_local_address(ipaddress.ip_address("::1"))


def test_an_address_of_this_host_is_told_from_one_beyond_it() -> None:
    """The address the kernel sends from towards another network is one of ours; that network's is not."""
    elsewhere = ipaddress.ip_address("198.51.100.7")  # TEST-NET-2: no host here has it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(elsewhere), 9))
        except OSError:
            pytest.skip("this host has no route beyond its loopback addresses")
        ours = ipaddress.ip_address(probe.getsockname()[0])
    assert is_local_address(ours)
    assert not is_local_address(elsewhere)
