"""The storm benchmark's pure parts: overflow counter, percentiles, pacing series, table, HAProxy config."""

from __future__ import annotations

from bench.storm import (
    haproxy_storm_config,
    listen_overflows,
    per_second,
    percentile,
    render_storm,
    source_ip,
)

NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops
TcpExt: 0 0 427 431
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def test_listen_overflows_reads_tcpext() -> None:
    """ListenOverflows comes from the TcpExt value line; absent means 0."""
    assert listen_overflows(NETSTAT) == 427
    assert listen_overflows("IpExt: a\nIpExt: 1\n") == 0


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 of 1..100 are 50 and 99; no values give None."""
    values = [float(v) for v in range(100, 0, -1)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.99) == 7.0


def test_per_second_buckets_from_start() -> None:
    """Reconnect times bucketed by whole seconds after the drain started (earlier ones ignored)."""
    assert per_second([10.1, 10.5, 11.2, 13.9, 9.0], 10.0) == [2, 1, 0, 1]
    assert per_second([], 10.0) == []


def test_source_ips_spread_over_loopback() -> None:
    """Clients bind distinct 127.x addresses, in turn."""
    ips = {source_ip(i, 300) for i in range(300)}
    assert len(ips) == 300 and all(ip.startswith("127.0.") for ip in ips)
    assert source_ip(0, 300) == source_ip(300, 300) == "127.0.1.1"


def test_render_storm_shows_failures_and_values() -> None:
    """One column per target; a target that failed shows '-' cells and its reason."""
    text = render_storm({"balancer": {"last_s": 0.5, "failed_attempts": 0}, "haproxy": "failed: no haproxy"})
    assert "0.50 s" in text and "haproxy: failed: no haproxy" in text
    assert text.splitlines()[0].split() == ["balancer", "haproxy"]


def test_haproxy_config_redispatches_with_retries() -> None:
    """The reference HAProxy: cookie insert, option redispatch, retries, a 4096 backlog."""
    text = haproxy_storm_config(("127.0.0.1", 8080), [("gw-1", "127.0.0.1", 9001)], 1000)
    for line in ("option redispatch", "retries 3", "cookie SRV insert", "backlog 4096", "cookie gw-1 check"):
        assert line in text
