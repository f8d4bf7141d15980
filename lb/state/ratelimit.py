"""Per-client token buckets: how many handshakes a source IP (an IPv6 /64) may start per second.  [pure]

Memory stays bounded: buckets that have refilled completely (their owners went
quiet) are dropped, since a full bucket is what a new key starts with anyway:
at once when the table grows past `max_keys`, and otherwise by `sweep`, which
the balancer calls every few seconds so that a burst of one-off addresses
gives its memory back (it stayed until the table reached `max_keys`: 18 MB).
"""

from __future__ import annotations

import ipaddress

from lb.http.client_address import unmapped


def source_key(ip: str) -> str:
    """The bucket of a client address: an IPv4 address is its own, an IPv6 one shares its /64's.

    One subscriber gets a whole /64 (RFC 6177, and every mobile carrier): a host that rotates its
    address inside it (privacy addresses, or a script choosing one per connection) was a new client
    at every handshake, and never limited.  An IPv4-mapped address is its IPv4 one.
    """
    if ":" not in ip:
        return ip
    try:
        address = unmapped(ipaddress.IPv6Address(ip.partition("%")[0]))
    except ValueError:
        return ip
    if address.version == 4:
        return str(address)
    return f"{ipaddress.IPv6Address(address.packed[:8] + bytes(8))}/64"


class RateLimiter:
    __slots__ = ("_buckets", "_burst", "_max_keys", "_rate")

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        """Args:
        rate: tokens added per second (0 turns limiting off).
        burst: bucket size: how many may come at once after a quiet spell.
        """
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, updated at)

    def check(self, ip: str, now: float) -> float:
        """Take one token for the client at `ip` (its `source_key`); return 0 if allowed, else the seconds
        until one is available."""
        if self._rate <= 0:
            return 0.0
        key = source_key(ip)
        tokens, updated = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - updated) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._prune(now)
        return 0.0

    def sweep(self, now: float) -> None:
        """Drop the buckets that have refilled completely by `now`."""
        if self._buckets and self._rate > 0:
            refill = self._burst / self._rate
            self._buckets = {key: entry for key, entry in self._buckets.items() if now - entry[1] < refill}

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        refill = self._burst / self._rate
        buckets = {key: entry for key, entry in self._buckets.items() if now - entry[1] < refill}
        keep = self._max_keys // 2
        if len(buckets) > keep:
            # A flood from many addresses: keep the emptiest buckets (forgetting a fuller
            # one gives away least), and leave headroom so the next prune is max_keys/2
            # checks away: pruning stays O(log n) per check on average.
            def level(entry: tuple[float, float]) -> float:
                return min(self._burst, entry[0] + (now - entry[1]) * self._rate)

            buckets = dict(sorted(buckets.items(), key=lambda item: level(item[1]))[:keep])
        self._buckets = buckets
