"""Who gets an admin API connection: the open ones counted by address, in all and per address.  [pure]

A flood of idle admin connections (each held 15 s, lb.control.admin's IDLE_TIMEOUT) took every
descriptor of the process, the listeners' and the health checks' too; capped in all alone, it locked
out the kubelet's probes and Prometheus.  So (`AdminConnections.admit`):
- an address holding `per_address` connections gets no more: the new one is refused;
- under `limit` in all, a new connection is let in;
- at `limit`, a new one takes the place of a connection of the address holding the most, when that
  address holds more than the new one's would with it; otherwise it is refused.  The one closed is
  its oldest idle connection (no request in progress: an operator's drain is not cut), else its
  oldest: a connection kept busy on purpose (pipelined requests whose answers it never reads) must
  not make a flood's places its own for good.  The flood, not the probe, gives way; and floods
  from many addresses share the cap evenly.

An address is the peer's IP; an IPv6 one counts by its /64 (one host's usual share: a /64 is
otherwise 2^64 addresses of one flood), an IPv4-mapped one as its IPv4 address (`address_key`).

The counts are this module's own, not the server's list: a connection closed here leaves them at
once, where the server lists it until its task has ended, and a burst of connections accepted in one
turn saw one victim each time, still listed, and all got in past the cap (a reviewer's case).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable

MAX_ADMIN_CONNECTIONS = 512
MAX_ADMIN_CONNECTIONS_PER_ADDRESS = 32  # a browser opens about 6 per origin
_IPV6_SHARE = 64  # the prefix an IPv6 peer counts by


def address_key(host: str | None) -> str:
    """What a peer's connections are counted by: its IPv4 address, or its IPv6 /64."""
    if host is None:
        return "-"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a Unix socket's path): counted as given
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((ip, _IPV6_SHARE), strict=False))
    return str(ip)


class AdminConnections:
    """The open admin connections, by address (oldest first in each), and who gets in."""

    def __init__(
        self, limit: int = MAX_ADMIN_CONNECTIONS, per_address: int = MAX_ADMIN_CONNECTIONS_PER_ADDRESS
    ) -> None:
        self.limit = limit
        self.per_address = per_address
        self._by_address: dict[str, dict[Hashable, None]] = {}
        self._address_of: dict[Hashable, str] = {}

    def __len__(self) -> int:
        return len(self._address_of)

    def admit(
        self, connection: Hashable, address: str, idle: Callable[[Hashable], bool]
    ) -> tuple[str | None, Hashable | None]:
        """(why `connection`, from `address`, is refused, or None: it is counted; the connection to close
        in its place, already forgotten here, or None).  `idle(c)`: no request of `c` is in progress."""
        held = self._by_address.get(address, {})
        if len(held) >= self.per_address:
            return f"{self.per_address} admin connections open from that address", None
        evicted = None
        if len(self._address_of) >= self.limit:
            most = max(self._by_address.values(), key=len)  # the first address to hold the most
            if len(most) <= len(held) + 1:
                return f"{self.limit} admin connections open", None
            evicted = next((c for c in most if idle(c)), next(iter(most)))
            self.remove(evicted)
        self._by_address.setdefault(address, {})[connection] = None
        self._address_of[connection] = address
        return None, evicted

    def remove(self, connection: Hashable) -> None:
        """`connection` has closed (or was closed here): no longer counted.  Once, or never counted: no-op."""
        address = self._address_of.pop(connection, None)
        if address is None:
            return
        held = self._by_address[address]
        del held[connection]
        if not held:
            del self._by_address[address]
