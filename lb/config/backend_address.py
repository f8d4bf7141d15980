"""Addresses that can never be a gateway's, for the config file and DNS discovery alike.  [pure]

- No host's address: `0.0.0.0` and `::` (Linux connects them to this host), multicast and the IPv4
  broadcast address (a TCP connect to them fails, after the handshake's time is spent).
- An IPv4-mapped IPv6 address (`::ffff:10.0.0.5`) is an IPv4 address: DNS's are read as such (an A
  and a mapped AAAA record of one pod are one backend, not two); the config file is asked to write it.
- This balancer's own listener: a request sent there comes back as a new request, which is sent
  there again, until `limits.max_connections` is spent (3,930 connections in under a second in
  stop 42's pass, before the health check's timeout marked the backend down).  HAProxy and nginx do
  not look; an operator who points discovery at the balancer's own Service makes this loop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lb.config.model import ListenerConfig, host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_LOCALHOST = ("localhost", "localhost.")
_LOOPBACKS = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def as_ipv4(ip: IPAddress) -> IPAddress:
    """`ip`, with an IPv4-mapped IPv6 address read as the IPv4 address it carries."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped if mapped is not None else ip


def not_a_host(ip: IPAddress) -> str | None:
    """Why no gateway can listen at `ip` (None: one can)."""
    if ip.is_unspecified:
        return f"{ip} is no host's address (connecting to it reaches this host)"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip == _BROADCAST:
        return f"{ip} is the broadcast address"
    return None


def is_loopback(ip: IPAddress) -> bool:
    """The default `is_local` of `OwnListeners`: the addresses every host has (its loopback ones)."""
    return ip.is_loopback


@dataclass(frozen=True, slots=True)
class OwnListeners:
    """This balancer's listeners, to tell a backend address that would send requests back to them.

    Attributes:
        binds: each listener's host and port, as configured (port 0, any free port, is never matched).
        is_local: whether an address is this host's, which a wildcard listener (`0.0.0.0`, `::`) of its
            family accepts on.  The config file knows only the loopback addresses; discovery also asks
            the host (`lb.control.discovery.is_local_address`).
    """

    binds: tuple[tuple[str, int], ...] = ()
    is_local: Callable[[IPAddress], bool] = is_loopback

    @classmethod
    def of(cls, listeners: Iterable[ListenerConfig], is_local: Callable[[IPAddress], bool] = is_loopback,
           ) -> OwnListeners:
        """The binds of `listeners`, with `is_local` telling which addresses a wildcard bind accepts on."""
        return cls(tuple((listener.host, listener.port) for listener in listeners), is_local)

    def reached_by(self, host: str, port: int) -> str | None:
        """The listener a connection to `host`:`port` would reach (its bind, `0.0.0.0:8080`), or None.

        Names are compared as written (resolving them is the start's business), but for `localhost`,
        which is the loopback addresses.
        """
        targets = _targets(host)
        for bind_host, bind_port in self.binds:
            if bind_port != port or port == 0:
                continue
            bound = _targets(bind_host)
            wildcard = _wildcard_version(bind_host)
            if wildcard is None and not targets.isdisjoint(bound):
                return host_port(bind_host, bind_port)
            if wildcard is not None and any(
                isinstance(t, ipaddress.IPv4Address | ipaddress.IPv6Address) and t.version == wildcard
                and self.is_local(t) for t in targets
            ):
                return host_port(bind_host, bind_port)
        return None


def _targets(host: str) -> set[IPAddress | str]:
    """What a host stands for: its address, the loopback addresses for `localhost`, else its name."""
    name = host.lower().strip("[]")
    if name in _LOCALHOST:
        return set(_LOOPBACKS)
    try:
        return {as_ipv4(ipaddress.ip_address(name))}
    except ValueError:
        return {name}


def _wildcard_version(host: str) -> int | None:
    """4 for a bind on every IPv4 address, 6 for every IPv6 one (IPv6-only sockets here), else None."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return ip.version if ip.is_unspecified else None


def own_listener_reason(bind: str) -> str:
    """Why a backend at a listener's address is refused (the config file and discovery say the same)."""
    return f"reaches this balancer's own listener {bind}: each request sent there would come back as a new one"


NO_LISTENERS = OwnListeners()  # none to avoid (the pure functions' default, for tests)
