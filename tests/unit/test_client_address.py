"""The client's address: X-Forwarded-For believed only from trusted proxies, right-most untrusted hop wins."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.http.client_address import (
    MAX_HOPS,
    TrustedProxies,
    client_address,
    forwarded_for,
    parse_address,
    parse_network,
    peer_address,
)

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "192.168.1.1", "2001:db8:ffff::/48"])

CASES = {
    # name: (peer, X-Forwarded-For values, client, forwarded upstream)
    "untrusted peer, no XFF": ("203.0.113.9", [], "203.0.113.9", "203.0.113.9"),
    "untrusted peer spoofs XFF": ("203.0.113.9", ["1.1.1.1"], "203.0.113.9", "203.0.113.9"),
    "untrusted peer spoofs a trusted hop": ("203.0.113.9", ["10.0.0.1"], "203.0.113.9", "203.0.113.9"),
    "trusted peer, one hop": ("10.1.2.3", ["198.51.100.4"], "198.51.100.4", "198.51.100.4, 10.1.2.3"),
    "trusted peer, no XFF": ("10.1.2.3", [], "10.1.2.3", "10.1.2.3"),
    "spoofed left part is ignored": (
        "10.1.2.3",
        ["6.6.6.6, 198.51.100.4"],
        "198.51.100.4",
        "6.6.6.6, 198.51.100.4, 10.1.2.3",
    ),
    "trusted hops are skipped": (
        "10.1.2.3",
        ["198.51.100.4, 192.168.1.1, 10.9.9.9"],
        "198.51.100.4",
        "198.51.100.4, 192.168.1.1, 10.9.9.9, 10.1.2.3",
    ),
    "several field lines form one chain": (
        "10.1.2.3",
        ["6.6.6.6", "198.51.100.4, 10.2.2.2"],
        "198.51.100.4",
        "6.6.6.6, 198.51.100.4, 10.2.2.2, 10.1.2.3",
    ),
    "all hops trusted: left-most": ("10.1.2.3", ["10.4.4.4, 10.5.5.5"], "10.4.4.4", "10.4.4.4, 10.5.5.5, 10.1.2.3"),
    "garbage hop stops the walk": (
        "10.1.2.3",
        ["6.6.6.6, unknown, 10.5.5.5"],
        "10.5.5.5",
        "6.6.6.6, unknown, 10.5.5.5, 10.1.2.3",
    ),
    "garbage right-most hop: the peer": (
        "10.1.2.3",
        ["6.6.6.6, not-an-ip"],
        "10.1.2.3",
        "6.6.6.6, not-an-ip, 10.1.2.3",
    ),
    # RFC 9110 §5.6.1.2: empty list elements are ignored, in the walk as in the chain sent on.
    "empty hops are no hops": ("10.1.2.3", ["198.51.100.4,,"], "198.51.100.4", "198.51.100.4, 10.1.2.3"),
    "an empty hop between a client and a trusted proxy": (
        "10.1.2.3",
        ["1.1.1.1, , 10.5.5.5"],
        "1.1.1.1",
        "1.1.1.1, 10.5.5.5, 10.1.2.3",
    ),
    "hop with a port": ("10.1.2.3", ["198.51.100.4:4711"], "198.51.100.4", "198.51.100.4:4711, 10.1.2.3"),
    "IPv6 hop with brackets and port": (
        "10.1.2.3",
        ["[2001:db8::7]:443"],
        "2001:db8::7",
        "[2001:db8::7]:443, 10.1.2.3",
    ),
    "IPv6 trusted peer": ("2001:db8:ffff::1", ["2001:db8::7"], "2001:db8::7", "2001:db8::7, 2001:db8:ffff::1"),
    "IPv4-mapped peer is IPv4": ("::ffff:10.1.2.3", ["198.51.100.4"], "198.51.100.4", "198.51.100.4, 10.1.2.3"),
    "IPv4-mapped untrusted peer": ("::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9", "203.0.113.9"),
    "IPv4-mapped hop": ("10.1.2.3", ["::ffff:198.51.100.4"], "198.51.100.4", "::ffff:198.51.100.4, 10.1.2.3"),
    "zone id is not an address": ("10.1.2.3", ["fe80::1%eth0"], "10.1.2.3", "fe80::1%eth0, 10.1.2.3"),
}


@pytest.mark.parametrize(("peer", "xff", "client", "upstream"), CASES.values(), ids=CASES.keys())
def test_client_address_and_forwarded_chain(peer: str, xff: list[str], client: str, upstream: str) -> None:
    """The client is the right-most untrusted hop from a trusted peer, else the peer; untrusted chains are replaced."""
    assert client_address(peer, xff, TRUSTED) == client
    assert forwarded_for(peer, xff, TRUSTED) == upstream


def test_nobody_is_trusted_by_default() -> None:
    """With `trusted_proxies: []`, X-Forwarded-For is never believed, even from loopback."""
    assert client_address("127.0.0.1", ["1.2.3.4"], TrustedProxies()) == "127.0.0.1"
    assert forwarded_for("127.0.0.1", ["1.2.3.4"], TrustedProxies()) == "127.0.0.1"


def test_non_ip_peer_is_returned_as_is() -> None:
    """A peer that is no IP (a UNIX socket) is the client; its XFF is not believed."""
    assert client_address("/run/lb.sock", ["1.2.3.4"], TRUSTED) == "/run/lb.sock"
    assert forwarded_for("/run/lb.sock", ["1.2.3.4"], TRUSTED) == "/run/lb.sock"


def test_long_chains_are_read_at_their_right_end() -> None:
    """A chain of thousands of hops is cut to its right-most MAX_HOPS: bounded work per request."""
    chain = ", ".join(["10.0.0.1"] * 5000 + ["10.0.0.2"])
    assert client_address("10.1.1.1", [chain], TRUSTED) == "10.0.0.1"
    assert forwarded_for("10.1.1.1", [chain], TRUSTED).count(",") == MAX_HOPS


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        (" 192.168.1.1 ", "192.168.1.1/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        # IPv4-mapped, as dual-stack logs write a client: peers are compared as IPv4, so are these
        ("::ffff:127.0.0.2", "127.0.0.2/32"),
        ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
    ],
)
def test_parse_network(text: str, network: str) -> None:
    """CIDRs and single addresses are accepted."""
    assert str(parse_network(text)) == network


def test_a_trusted_proxy_written_ipv4_mapped_is_believed() -> None:
    """`trusted_proxies: ["::ffff:127.0.0.2/128"]` validated, then never matched the peer 127.0.0.2."""
    trusted = TrustedProxies.parse(["::ffff:127.0.0.2/128"])
    assert client_address("127.0.0.2", ["203.0.113.9"], trusted) == "203.0.113.9"


@pytest.mark.parametrize(
    ("peer", "address"),
    [("fe80::1%eth0", "fe80::1"), ("fe80::1%2", "fe80::1"), ("2001:db8::7", "2001:db8::7"), ("10.1.2.3", "10.1.2.3"),
     ("::ffff:10.1.2.3", "10.1.2.3"), ("/run/lb.sock", None)],
)
def test_peer_address_drops_a_link_local_zone(peer: str, address: str | None) -> None:
    """A socket's peer `fe80::1%eth0` is fe80::1 on our interface eth0: matched by its address."""
    found = peer_address(peer)
    assert (str(found) if found is not None else None) == address


def test_a_zoned_peer_is_in_the_networks_of_its_address() -> None:
    """`proxy_protocol_from: [fe80::/10]` or `[fe80::1]` holds a peer the socket reports as `fe80::1%eth0`."""
    for written in ("fe80::/10", "fe80::1", "fe80::1/128"):
        assert peer_address("fe80::1%eth0") in TrustedProxies.parse([written]), written
    assert peer_address("fe80::1%eth0") not in TrustedProxies.parse(["fe80::2", "2001:db8::/32"])


def test_a_network_with_a_zone_says_how_to_write_it() -> None:
    """A zone matches nothing more (peers match by address, on any interface): refused with the way to write it."""
    with pytest.raises(ValueError, match="without its zone"):
        parse_network("fe80::1%eth0")


@pytest.mark.parametrize(
    "text", ["10.0.0.1/8", "10.0.0.0/33", "example.com", "", "10.0.0.0/8,10.1.0.0/16", "fe80::1%1"]
)
def test_parse_network_rejects(text: str) -> None:
    """Host bits set, bad prefixes, names and lists are refused with the expected form in the message."""
    with pytest.raises(ValueError, match="expected a CIDR"):
        parse_network(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:80", "1.2.3.4"),
        ("[::1]", "::1"),
        ("[::1]:8080", "::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_parse_address(text: str, address: str) -> None:
    """Addresses with optional port and brackets; IPv4-mapped comes back as IPv4."""
    assert str(parse_address(text)) == address


@pytest.mark.parametrize("text", ["", "unknown", "1.2.3.4:", "1.2.3.4:x", "[::1", "[::1]x", "01.2.3.4", "_hidden"])
def test_parse_address_rejects(text: str) -> None:
    """Anything else is not an address (None)."""
    assert parse_address(text) is None


_in_10 = st.integers(0, 2**24 - 1).map(lambda n: ipaddress.IPv4Address(0x0A000000 + n))
# Any address; one inside 10.0.0.0/8, as itself or IPv4-mapped (the same client); one just outside it.
_peers = st.one_of(
    st.ip_addresses(),
    _in_10,
    _in_10.map(lambda a: ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)),
    st.sampled_from(["9.255.255.255", "11.0.0.0", "::ffff:9.255.255.255", "::a00:1"]).map(ipaddress.ip_address),
)


@settings(max_examples=300, deadline=None)
@given(
    peer=_peers,
    hops=st.lists(st.one_of(st.ip_addresses().map(str), _in_10.map(str), st.text(max_size=12)), max_size=8),
)
def test_untrusted_peer_is_always_the_client(
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address, hops: list[str]
) -> None:
    """Whatever an untrusted peer writes in X-Forwarded-For, the client is the peer and the chain is replaced;
    a trusted one (IPv4-mapped too) names the peer or a hop it sent, and the chain goes on with it."""
    trusted = TrustedProxies.parse(["10.0.0.0/8"])
    normal = str(parse_address(str(peer)))
    client = client_address(str(peer), [", ".join(hops)], trusted)
    chain = forwarded_for(str(peer), [", ".join(hops)], trusted)
    if parse_address(str(peer)) in trusted:
        assert client in {normal, *(str(parse_address(hop)) for hop in hops)}
        assert chain == normal or chain.endswith(", " + normal)
        return
    assert client == normal
    assert chain == normal


@settings(max_examples=300, deadline=None)
@given(
    client=st.ip_addresses(v=4).filter(lambda a: a not in ipaddress.ip_network("10.0.0.0/8")),
    spoofed=st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=12)), max_size=5),
    proxies=st.lists(st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n))), max_size=4),
)
def test_trusted_chain_finds_the_real_client(
    client: ipaddress.IPv4Address, spoofed: list[str], proxies: list[str]
) -> None:
    """Behind any number of trusted proxies, whatever the client prepended, its own address is found."""
    trusted = TrustedProxies.parse(["10.0.0.0/8"])
    chain = [*(hop.replace(",", "") for hop in spoofed), str(client), *proxies[:-1]]
    peer = proxies[-1] if proxies else str(client)
    if not proxies:
        chain = [hop.replace(",", "") for hop in spoofed]
    assert client_address(peer, [", ".join(chain)], trusted) == str(client)


@pytest.mark.parametrize("text", ["1.2.3.4\xa0", "\x851.2.3.4", "\xa0[::1]"])
def test_only_space_and_tab_surround_an_address(text: str) -> None:
    """NBSP and NEL are not OWS (RFC 9110 §5.6.3): a hop wrapped in them is no address."""
    assert parse_address(text) is None
    assert parse_address(" \t1.2.3.4\t ") == ipaddress.ip_address("1.2.3.4")
