"""Which address is the client's: the peer, or what trusted proxies say in X-Forwarded-For.  [pure]

The peer is the connection's address as the balancer knows it: the PROXY
header's source on a `proxy_protocol` listener (`lb.http.proxy_header`), else the
socket's peer.  X-Forwarded-For is believed only when that peer is one of
`trusted_proxies` (SPEC part 2).  Then the chain is read right to left, the
way each proxy appended to it: every trusted hop is skipped, and the client is
the right-most hop that is not trusted (nginx `real_ip_recursive on`, Envoy's
`xff_trusted_cidrs`).  A hop that is not an IP address stops the walk and the
last trusted hop passed is taken: nothing to the left of a forged or broken
entry is believed.  If every hop is trusted, the left-most one is the client.

From an untrusted peer, X-Forwarded-For is never read: the client is the peer,
and the chain forwarded upstream is replaced by that address alone (a client
cannot plant an address for the backend to believe).  `forwarded_for` gives
the value to send either way.

IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack socket
reports) are compared and returned as IPv4.  Ports in a hop (`192.0.2.1:4711`,
`[2001:db8::1]:443`, as some cloud balancers write them) are ignored.

What it leaves to others: validating `trusted_proxies` at load time
(`lb.config.sections`), and using the address for rate limits, logs, `balance:
source` and the forwarded headers (the connection core).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Bounds on hostile input: a chain longer than this is read only at its right end,
# which is the part trusted proxies wrote.
MAX_HOPS = 64


_MAPPED_PREFIX = 96  # ::ffff:0:0/96 holds the IPv4-mapped addresses (RFC 4291 §2.5.5.2)


def _loose_network(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, IPNetwork] | None:
    """(the address, its network) of an `address/prefix` with host bits set; None for anything else."""
    if "/" not in text or "%" in text:
        return None
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
        address = ipaddress.ip_address(text.strip().partition("/")[0])
    except ValueError:
        return None
    return address, network


def parse_network(text: str) -> IPNetwork:
    """A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address (`/32` or `/128`).

    Raises:
        ValueError: not an address or network, or host bits set (`10.0.0.1/8`), with the reason.
    """
    try:
        if "%" in text:
            # A peer matches by its address, whatever interface it comes in on (`peer_address`):
            # accepted, `fe80::1%eth0` would have trusted fe80::1 on every link, unsaid.
            raise ValueError("write it without its zone: a peer matches by its address, on any interface")
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        loose = _loose_network(text)
        if loose is not None:
            # Refused, where nginx and HAProxy take the network: `10.0.0.1/8` may as well mean the one
            # address, and trusting 16 million in its place lets any of them name its own client.
            address, network = loose
            raise ValueError(
                f"expected a CIDR such as 10.0.0.0/8 or an IP address, got {text!r}, which has host bits set: "
                f"write {network} for the network, or {address}/{address.max_prefixlen} for the one address"
            ) from None
        raise ValueError(f"expected a CIDR such as 10.0.0.0/8 or an IP address, got {text!r} ({exc})") from None
    # Addresses are compared as IPv4 when IPv4-mapped (`::ffff:a.b.c.d`, as dual-stack logs show a
    # client), so a network written that way is its IPv4 one: else it would never match.
    mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
    if mapped is not None and network.prefixlen >= _MAPPED_PREFIX:
        return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED_PREFIX))
    return network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The peers whose X-Forwarded-For is believed; empty trusts nobody (the default).

    Also a listener's `proxy_protocol_from` (`lb.proxy.preamble`), where empty means any peer.
    """

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, cidrs: Iterable[str]) -> TrustedProxies:
        """From configuration strings.

        Raises:
            ValueError: one of them is not a CIDR or address.
        """
        return cls(tuple(parse_network(cidr) for cidr in cidrs))

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return any(address in network for network in self.networks)


def parse_address(text: str) -> IPAddress | None:
    """An IP address from a peer or an X-Forwarded-For hop (port and brackets allowed), or None.

    IPv4-mapped IPv6 comes back as IPv4; a zone (`%eth0`) is not an address here.
    """
    text = text.strip(" \t")  # OWS only: NBSP or NEL around an address is not an address
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not _is_port_suffix(text[end + 1 :])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unmapped(address)


def peer_address(peer: str) -> IPAddress | None:
    """A socket peer's IP address (the host `accept()` gives), or None: `parse_address`, less the
    zone of a link-local peer (`fe80::1%eth0`).

    The zone names our interface, not the peer, and a CIDR match ignores it (`ipaddress` compares
    the address alone), so such a peer matches `fe80::/10` or `fe80::1` in `proxy_protocol_from` and
    in `trusted_proxies`.  Refused, it was closed at accept (or never trusted) whatever the list said.
    """
    return parse_address(peer.partition("%")[0])


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (`::ffff:198.51.100.9`) as the IPv4 address it maps; any other as is.

    One spelling per client: logs, rate limits and `balance: source` would otherwise see two.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port_suffix(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit()


def _hops(forwarded_for: Sequence[str]) -> list[str]:
    """The X-Forwarded-For hops in order, from every field line (RFC 9110 §5.3 joins them with commas).

    Empty elements (`a, , b`, a trailing comma) are no hop: RFC 9110 §5.6.1.2 says to ignore them.
    Taken for garbage they stopped the walk at the proxy before them, which was then believed to
    be the client, while the chain sent on (without them) named another.
    """
    hops = [hop for value in forwarded_for for part in value.split(",") if (hop := part.strip(" \t"))]
    return hops[-MAX_HOPS:]


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The client's IP address.

    Args:
        peer: the connection's address (the PROXY header's source, else the socket's peer).
        forwarded_for: every X-Forwarded-For field value of the request, in order.
        trusted: the `trusted_proxies` networks.

    Returns:
        The peer itself unless it is trusted; else the right-most untrusted X-Forwarded-For hop
        (see the module docstring for broken hops and all-trusted chains), as a normalised IP.
    """
    address = peer_address(peer)
    if address is None:
        return peer  # not an IP (a UNIX socket path, say): nothing to match, nothing to believe
    if not trusted.networks or address not in trusted:
        return str(address)
    return client_behind(address, forwarded_for, trusted)


def client_behind(proxy: IPAddress, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """`client_address` for a peer already known to be a trusted proxy (a connection decides it once)."""
    found = proxy
    for hop in reversed(_hops(forwarded_for)):
        address = parse_address(hop)
        if address is None:
            break
        found = address
        if address not in trusted:
            break
    return str(found)


def forwarded_for(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The X-Forwarded-For value to send upstream.

    From a trusted peer, the chain it sent plus the peer (each proxy appends the address it
    saw); from anyone else, the peer alone: an untrusted chain is replaced, never passed on.
    """
    peer_address = parse_address(peer)
    peer_text = peer if peer_address is None else str(peer_address)
    if peer_address is None or not trusted.networks or peer_address not in trusted:
        return peer_text
    return chain_through(peer_text, forwarded_for)


def chain_through(proxy: str, forwarded_for: Sequence[str]) -> str:
    """`forwarded_for` for a peer already known to be a trusted proxy: its chain, then its address."""
    return ", ".join([*_hops(forwarded_for), proxy])
