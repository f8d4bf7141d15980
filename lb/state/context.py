"""What every connection handler reads: config, pools, token codec, counters and live tunnels.

The balancer builds one `ProxyContext` and hands it to each listener; handlers
read it per request, so swapping a field swaps behaviour for new requests only.
Counters are plain integers bumped on the event loop thread; Prometheus reads
them at scrape time (`metrics`), so the per-message path never touches a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lb.access_log import RateLimitSummary
from lb.affinity.codec import TokenCodec
from lb.config.model import Config, HashKeySource, RouteConfig, over_limit_answered
from lb.http.client_address import TrustedProxies
from lb.http.head import PROTECTED_HEADERS, protected_headers
from lb.http.routing import sort_routes
from lb.state.observations import Observations
from lb.state.pool import PoolState
from lb.state.ratelimit import RateLimiter
from lb.state.tally import Tally

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from lb.proxy.server import ClientConnection
    from lb.proxy.tunnel import Tunnel


@dataclass(slots=True)
class Stats:
    """Event counters; keys are label tuples of the matching lb_* metric."""

    handshakes: Tally[tuple[str, str, str]] = field(default_factory=Tally)  # pool, backend, outcome
    # pool, backend, result (hit, new, redispatch, invalid): lb_affinity_decisions_total sums it over
    # backends, and a backend's handshakes, hits and redispatches come from it (`backend_counts`).
    # Kept here, for the process's life, not on the BackendStatus: a backend that leaves (DNS, a
    # reload) and comes back under its id counts on, so no series ever goes back (SPEC).
    decisions: Tally[tuple[str, str, str]] = field(default_factory=Tally)
    # pool, result: the decisions of backends whose series were forgotten (`forget`), so that the
    # pool's lb_affinity_decisions_total, a sum over its backends, never goes back when one is.
    forgotten_decisions: Tally[tuple[str, str]] = field(default_factory=Tally)
    invalid_tokens: Tally[str] = field(default_factory=Tally)  # reason
    rejected: Tally[int] = field(default_factory=Tally)  # status we answered ourselves
    unsealed_cookies: Tally[str] = field(default_factory=Tally)  # pool; rewrite mode, value too large
    closed_bytes_in: int = 0  # client → backend, of tunnels already closed
    closed_bytes_out: int = 0  # backend → client
    tunnels_closed: int = 0
    tls_failures: int = 0  # TLS handshakes that failed or timed out (lb_tls_handshake_failures_total)
    shed: int = 0  # connections closed at accept, past the limit and its answered overflow (lb_connections_shed_total)
    # Tunnels the balancer ended: (cause, "close_frame" | "tcp") → count (lb_tunnel_closes_total).
    balancer_closes: Tally[tuple[str, str]] = field(default_factory=Tally)

    def forget(self, keep: Callable[[str, str], bool], keep_pool: Callable[[str], bool] | None = None) -> None:
        """Drop the per-backend series of every (pool, backend) that `keep` refuses (`lb.state.series`);
        their decisions stay in the pool's sum (`pool_decisions`), until `keep_pool` refuses the pool
        (removed long enough ago): then its per-pool series go too."""
        for key in [key for key in self.handshakes if not keep(key[0], key[1])]:
            del self.handshakes[key]
        for key in [key for key in self.decisions if not keep(key[0], key[1])]:
            self.forgotten_decisions[(key[0], key[2])] += self.decisions.pop(key)
        if keep_pool is not None:
            for counted in [counted for counted in self.forgotten_decisions if not keep_pool(counted[0])]:
                del self.forgotten_decisions[counted]
            for pool in [pool for pool in self.unsealed_cookies if not keep_pool(pool)]:
                del self.unsealed_cookies[pool]

    def pool_decisions(self) -> Tally[tuple[str, str]]:
        """(pool, result) → decisions, over every backend ever counted (lb_affinity_decisions_total)."""
        totals: Tally[tuple[str, str]] = Tally()
        totals.update(self.forgotten_decisions)
        for (pool, _, result), count in self.decisions.items():
            totals[(pool, result)] += count
        return totals

    def backend_counts(self) -> dict[tuple[str, str], BackendCounts]:
        """(pool, backend) → its handshakes, affinity hits and redispatches: one pass, per scrape or /status."""
        counts: dict[tuple[str, str], BackendCounts] = {}
        for (pool, backend, result), count in self.decisions.items():
            entry = counts.get((pool, backend))
            if entry is None:
                entry = counts[(pool, backend)] = BackendCounts()
            entry.handshakes += count
            if result == "hit":
                entry.affinity_hits += count
            elif result == "redispatch":
                entry.redispatches += count
        return counts


@dataclass(slots=True)
class BackendCounts:
    """What /status and lb_backend_*_total show per backend (`Stats.backend_counts`)."""

    handshakes: int = 0
    affinity_hits: int = 0
    redispatches: int = 0


@dataclass(slots=True)
class ProxyContext:
    config: Config
    codec: TokenCodec
    pools: dict[str, PoolState]
    routes: tuple[RouteConfig, ...]
    # A backend failed a handshake (refused, reset, silent): a failed health check, wherever checks run.
    on_backend_failure: Callable[[str, str, str], None]  # pool, backend id, what happened
    # The connections' events carry the monotonic clock, so that a step of the wall clock (an NTP
    # step, a VM resumed, `date -s`) neither stretches nor cuts a timeout, a rate limit or a
    # latency.  What must be wall time (a token's issue time and expiry, backend states' times,
    # which every instance and the control plane share) is that clock plus this offset, which the
    # balancer reads again every second (`Balancer._each_second`): a step reaches tokens within 1 s.
    # No default: whoever builds one gives it (`lb.proxy.server.wall_offset()`); a forgotten 0 would
    # issue tokens dated 1970, expired at once.
    wall_offset: float
    # The header names a client may not send spelt with `_` for `-` (nor as trailers): ours, and the
    # configuration's (`configured_protected`).  Swapped with `config` on reload, as `codec` is.
    protected: frozenset[str] = PROTECTED_HEADERS
    # `trusted_proxies`, made once per configuration: a connection from a trusted proxy built it again
    # at its accept, and at its next head after a reload.  Swapped with `config`.
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    stats: Stats = field(default_factory=Stats)
    tunnels: set[Tunnel] = field(default_factory=set)
    rate_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0, 1))
    rate_limited_log: RateLimitSummary = field(default_factory=RateLimitSummary)  # 429s: a line per interval
    # 503s beyond limits.max_connections: a storm of them is one line per interval too.
    over_limit_log: RateLimitSummary = field(default_factory=lambda: RateLimitSummary(
        status=503, reason="too_many_connections", event="over_max_connections"
    ))
    handshaking: int = 0  # client connections not (yet) handed to a tunnel
    # The most client connections held at once since `take_peak`: the memory release looks once a second
    # (lb.control.memory), and a burst of handshakes that came and went between two looks was never seen.
    peak_connections: int = 0
    # The same connections, so that stop() can answer each one (503, or let it complete).
    in_flight: set[ClientConnection] = field(default_factory=set)
    # `workers: N`, in the owner: its workers' client connections as they last reported them.
    worker_clients: int = 0
    accepting: bool = True
    # From SIGTERM (its `shutdown_delay` included, while /readyz says 503): answers say Connection: close,
    # so keep-alive clients reconnect to another instance rather than stay until accepting stops.
    deregistering: bool = False
    # From SIGTERM's stop of accepting: the event loop time at which its spread of 1001s ends.
    spread_until: float = 0.0
    # Latency histograms, backend errors, health checks (lb.state.observations); survives reloads.
    observations: Observations = field(default_factory=Observations)
    # Set by the last tunnel to close while shutdown waits for them.
    all_tunnels_closed: asyncio.Event | None = None

    def client_connections(self) -> int:
        """Client connections now, as limits.max_connections counts them (lb_client_connections).

        Handshakes in flight (TLS handshakes and PROXY headers included) and live tunnels; in
        the owner of `workers: N`, its workers' as they last reported them.
        """
        return self.own_connections() + self.worker_clients

    def own_connections(self) -> int:
        """This process's client connections: handshakes in flight and live tunnels."""
        return self.handshaking + len(self.tunnels)

    def sheds(self) -> bool:
        """Whether a connection accepted now, on a listener where a TLS handshake or a PROXY header
        comes first, is closed at once, without an answer.

        Such a connection past `limits.max_connections` is still counted and gets its 503 once its
        head is read, which takes its handshake first: until then it holds a descriptor, for up to
        `timeouts.handshake`.  Unbounded, connections that open and send nothing ran a process out
        of descriptors (its admin API and probes with it).  So only an overflow of
        `over_limit_answered` gets that 503; beyond it a connection is closed as it is accepted,
        as HAProxy leaves it in the backlog past `maxconn`.
        """
        limit = self.config.limits.max_connections  # with workers: this one's share (lb.control.ipc.split_limits)
        return self.own_connections() >= limit + over_limit_answered(limit, self.config.workers)

    def count_in(self) -> bool:
        """Count a client connection in `handshaking` at its accept; whether it is within the limit.

        The answer is decided here, at accept, in accept order: a TLS handshake (or a PROXY
        header) completes later, and counted then, a burst larger than `limits.max_connections`
        saw itself over the limit connection by connection, and refused everyone.
        """
        held = self.own_connections()
        self.handshaking += 1
        if held >= self.peak_connections:
            self.peak_connections = held + 1
        return held < self.config.limits.max_connections

    def take_peak(self) -> int:
        """The most client connections this process held at once since the last call (those held now at
        least); the next call counts from those held now."""
        held = self.own_connections()
        peak = max(self.peak_connections, held)
        self.peak_connections = held
        return peak

    def bytes_relayed(self) -> tuple[int, int]:
        """(client → backend, backend → client) so far: closed tunnels plus live ones."""
        return (
            self.stats.closed_bytes_in + sum(t.bytes_in for t in self.tunnels),
            self.stats.closed_bytes_out + sum(t.bytes_out for t in self.tunnels),
        )

    @classmethod
    def build(
        cls, config: Config, on_backend_failure: Callable[[str, str, str], None], *, wall_offset: float
    ) -> ProxyContext:
        return cls(
            wall_offset=wall_offset,
            config=config,
            codec=TokenCodec(config.affinity.secret_keys, config.affinity.max_age, config.affinity.token_version),
            pools={name: PoolState(config=pool) for name, pool in config.pools.items()},
            routes=sort_routes(config.routes),
            protected=configured_protected(config),
            trusted_proxies=TrustedProxies(config.trusted_proxies),
            on_backend_failure=on_backend_failure,
            rate_limiter=RateLimiter(config.limits.handshake_rate_per_ip, config.limits.burst_per_ip),
        )


def configured_protected(config: Config) -> frozenset[str]:
    """The header names `config` protects: ours, its `affinity.header`, and each header a pool routes by
    (`hash_key: header:NAME`), so that a backend reading `_` as `-`, or merging trailers into the head,
    sees the key the balancer hashed."""
    return protected_headers(config.affinity.header, (
        pool.hash_key.name for pool in config.pools.values()
        if pool.hash_key is not None and pool.hash_key.source is HashKeySource.HEADER
    ))
