"""Per-IP handshake token buckets (limits.handshake_rate_per_ip / handshake_burst_per_ip): pure, time passed in."""

from __future__ import annotations

import ipaddress
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.state.ratelimit import RateLimiter, source_key


def take(limiter: RateLimiter, key: str, n: int, now: float) -> list[float]:
    return [limiter.check(key, now) for _ in range(n)]


def test_burst_then_refused() -> None:
    """A quiet key may start `burst` handshakes at once; the next one waits."""
    limiter = RateLimiter(rate=2, burst=5)
    assert take(limiter, "10.0.0.1", 5, now=100.0) == [0.0] * 5
    assert limiter.check("10.0.0.1", 100.0) > 0


def test_retry_after_is_the_time_until_the_next_token() -> None:
    """Empty bucket at rate r: the next token comes in 1/r seconds, less whatever has already refilled."""
    limiter = RateLimiter(rate=4, burst=2)
    take(limiter, "a", 2, now=0.0)
    assert limiter.check("a", 0.0) == pytest.approx(0.25)
    assert limiter.check("a", 0.1) == pytest.approx(0.15)
    assert limiter.check("a", 0.25) == 0.0


def test_retry_after_header_value_rounds_up_to_whole_seconds() -> None:
    """Retry-After is whole seconds (RFC 9110 §10.2.3); at rate 0.5/s the wait is 2 s, never 0."""
    limiter = RateLimiter(rate=0.5, burst=1)
    assert limiter.check("a", 0.0) == 0.0
    wait = limiter.check("a", 0.0)
    assert wait == pytest.approx(2.0)
    assert math.ceil(wait) == 2
    assert math.ceil(limiter.check("a", 1.9)) == 1


def test_refill_at_rate_and_capped_at_burst() -> None:
    """Tokens come back at `rate` per second, but a long quiet spell gives back only `burst`."""
    limiter = RateLimiter(rate=10, burst=3)
    take(limiter, "a", 3, now=0.0)
    assert limiter.check("a", 0.0) > 0
    # 0.1 s later: exactly one token.
    assert limiter.check("a", 0.1) == 0.0
    assert limiter.check("a", 0.1) > 0
    # An hour later: still only `burst` at once.
    assert take(limiter, "a", 3, now=3600.0) == [0.0] * 3
    assert limiter.check("a", 3600.0) > 0


def test_steady_rate_is_sustained() -> None:
    """A client at exactly the configured rate is never refused."""
    limiter = RateLimiter(rate=4, burst=1)  # 0.25 s steps are exact in binary floating point
    assert all(limiter.check("a", i * 0.25) == 0.0 for i in range(100))


def test_refused_attempts_do_not_earn_tokens() -> None:
    """Hammering while refused does not shorten the wait (the refill clock is not reset into credit)."""
    limiter = RateLimiter(rate=1, burst=1)
    assert limiter.check("a", 0.0) == 0.0
    for i in range(1, 10):
        assert limiter.check("a", i * 0.1) > 0
    assert limiter.check("a", 0.95) > 0
    assert limiter.check("a", 1.0) == 0.0


def test_keys_are_independent() -> None:
    """One address out of tokens does not affect another."""
    limiter = RateLimiter(rate=1, burst=2)
    take(limiter, "10.0.0.1", 2, now=0.0)
    assert limiter.check("10.0.0.1", 0.0) > 0
    assert take(limiter, "10.0.0.2", 2, now=0.0) == [0.0, 0.0]


@pytest.mark.parametrize("burst", [1, 100])
def test_rate_zero_turns_limiting_off(burst: int) -> None:
    """handshake_rate_per_ip: 0 → never refused, and no state kept."""
    limiter = RateLimiter(rate=0, burst=burst)
    assert take(limiter, "a", 10_000, now=0.0) == [0.0] * 10_000
    assert len(limiter._buckets) == 0  # white-box: nothing remembered


def test_burst_below_one_still_allows_one() -> None:
    limiter = RateLimiter(rate=1, burst=0)
    assert limiter.check("a", 0.0) == 0.0


def test_pruning_keeps_memory_bounded() -> None:
    """Many distinct addresses over time: the table stays near `max_keys` (full buckets are forgotten)."""
    limiter = RateLimiter(rate=10, burst=5, max_keys=100)  # a bucket is full again 0.5 s after its last use
    peak = 0
    for i in range(20_000):
        assert limiter.check(f"198.51.{i // 256}.{i % 256}", now=i * 0.01) == 0.0
        peak = max(peak, len(limiter._buckets))  # white-box: the table's size
    assert peak <= 101


def test_pruning_forgets_only_full_buckets() -> None:
    """An address that is still out of tokens is not forgotten by pruning (it would get a fresh burst)."""
    limiter = RateLimiter(rate=1, burst=2, max_keys=3)
    take(limiter, "busy", 2, now=0.0)
    for i in range(10):
        limiter.check(f"other-{i}", now=0.5)
    assert limiter.check("busy", 0.5) > 0, "the busy address got its burst back through pruning"


def test_a_prune_forgets_refilled_buckets_and_halves_a_flood_of_live_ones() -> None:
    """Past max_keys, the buckets already full again go first; a flood of live ones is cut to max_keys/2,
    the headroom that keeps the next prune max_keys/2 checks away."""
    limiter = RateLimiter(rate=1, burst=2, max_keys=8)
    for i in range(8):
        limiter.check(f"old-{i}", now=0.0)
    limiter.check("new", now=10.0)  # the ninth key: the eight old ones have refilled
    assert len(limiter) == 1
    for i in range(8):
        limiter.check(f"flood-{i}", now=10.0)
    assert len(limiter) == 4


def test_a_sweep_forgets_the_refilled_buckets_of_quiet_addresses_whatever_the_table_size() -> None:
    """50,000 one-off addresses far below `max_keys`: a sweep once they have refilled gives the table
    back (they stayed until the table reached max_keys: 18 MB at 100,000).  An address still short of
    tokens keeps its bucket, so the sweep gives nothing away."""
    limiter = RateLimiter(rate=1, burst=2)  # full again 2 s after the last use
    for n in range(50_000):
        limiter.check(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", now=0.0)
    limiter.check("busy", now=2.5)
    limiter.check("busy", now=2.5)
    assert len(limiter) == 50_001
    limiter.sweep(now=1.9)
    assert len(limiter) == 50_001  # not yet refilled
    limiter.sweep(now=3.0)
    assert len(limiter) == 1
    assert limiter.check("busy", now=3.0) > 0  # its empty bucket kept: still limited


@pytest.mark.parametrize(("ip", "key"), [
    ("10.0.0.1", "10.0.0.1"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::1", "::/64"),
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not an address", "not an address"),
])
def test_an_ipv6_client_counts_per_64(ip: str, key: str) -> None:
    assert source_key(ip) == key


# Any IPv6 address, or one that maps an IPv4 address (whose client is that IPv4 address).
_v6 = st.ip_addresses(v=6) | st.ip_addresses(network="::ffff:0:0/96")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(_v6, _v6, st.integers(0, 63))
def test_a_host_rotating_inside_its_64_shares_one_bucket(
    first: ipaddress.IPv6Address, second: ipaddress.IPv6Address, bit: int
) -> None:
    """RFC 6177: a subscriber holds a /64; privacy addresses and a script picking one per handshake stay in it.
    Another /64 has a bucket of its own, and so has each IPv4 address an IPv4-mapped one maps."""
    same_64 = ipaddress.IPv6Address(first.packed[:8] + second.packed[8:])
    other_64 = ipaddress.IPv6Address(int(first) ^ (1 << (64 + bit)))
    mapped = first.ipv4_mapped is not None or same_64.ipv4_mapped is not None  # those are IPv4 clients
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.check(str(first), 0.0) == 0.0
    assert limiter.check(str(other_64), 0.0) == 0.0
    if mapped and same_64 != first:
        assert limiter.check(str(same_64), 0.0) == 0.0
    else:
        assert limiter.check(str(same_64), 0.0) > 0
