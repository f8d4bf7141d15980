"""Typed, frozen configuration objects: what `lb.config.load` builds and everything else reads.

Durations are float seconds, sequences are tuples, choices are StrEnums.  No
validation lives here; `lb.config.sections` checks every value before building these.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


def host_port(host: str, port: int) -> str:
    """`host:port` as operators write it, an IPv6 host in brackets (`[::1]:9000`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AffinityMode(StrEnum):
    INSERT = "insert"    # the balancer's own cookie
    REWRITE = "rewrite"  # the backend's cookie, value wrapped in our token


class SameSite(StrEnum):
    STRICT = "Strict"
    LAX = "Lax"
    NONE = "None"


class SecureMode(StrEnum):
    AUTO = "auto"    # Secure on TLS listeners only
    ALWAYS = "always"
    NEVER = "never"


class BalanceMethod(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"
    SOURCE = "source"  # rendezvous hash of the client address (the layer-4 baseline)
    HASH = "hash"      # rendezvous hash of `hash_key`; requests without it fall back to least_conn


# The methods that route by a hash of the client's key, and may do without pins (`sticky: false`).
HASHED_METHODS: Final = frozenset({BalanceMethod.SOURCE, BalanceMethod.HASH})


class HashKeySource(StrEnum):
    HEADER = "header"
    QUERY = "query"
    COOKIE = "cookie"


@dataclass(frozen=True, slots=True)
class HashKey:
    """Where `balance: hash` finds its key: `header:X-User-Id`, `query:uid`, `cookie:NAME`."""

    source: HashKeySource
    name: str

    def __str__(self) -> str:
        return f"{self.source.value}:{self.name}"


class HealthCheckType(StrEnum):
    HTTP = "http"
    TCP = "tcp"


class HealthCheckExpect(StrEnum):
    """What an `http` check's answer must be to pass."""

    SUCCESS = "success"  # a 2xx or 3xx (HAProxy's `option httpchk`, Envoy's and Traefik's default status range)
    ANY = "any"          # any complete HTTP answer, whatever its status: the backend is alive and speaks HTTP


class DiscoveryType(StrEnum):
    SRV = "srv"  # one backend per SRV record, id = first label of the target
    A = "a"      # one backend per A/AAAA record, id "ip:port"


class EventLoop(StrEnum):
    AUTO = "auto"        # uvloop when installed, else asyncio
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


class LogFormat(StrEnum):
    PLAIN = "plain"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str  # absolute path after loading
    key: str
    # What the two files held when the configuration was read (lb.config.sections): every context is
    # built from these, never from the paths again.  So a worker restarted after the files changed, or
    # broke, runs its owner's pair (it crash-looped on broken files), and a reload reads each file once.
    cert_pem: bytes = field(repr=False, compare=False)
    key_pem: bytes = field(repr=False, compare=False)  # a secret: never in a repr or a log


# A listener's backlog when none is written, at least (lb.config.sections.default_backlog).
DEFAULT_BACKLOG: Final = 4096


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str
    port: int
    tls: TlsConfig | None = None
    # Each connection starts with a PROXY v1/v2 header from an L4 balancer (lb.http.proxy_header);
    # without a valid one it is closed without an answer.
    proxy_protocol: bool = False
    # The peers whose PROXY header is believed (the L4 balancers in front); empty: any peer, so anyone
    # who can reach the listener names their own client address.  Others are closed at accept.
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # listen() queue; lb.config.sections fills in max(net.core.somaxconn, DEFAULT_BACKLOG) when absent.
    # A reconnect storm arrives as one burst of SYNs: each overflow costs the client a 1s retransmit.
    backlog: int = DEFAULT_BACKLOG
    # No `backlog` in the file: the value above is this host's default.  config_hash hashes it as
    # DEFAULT_BACKLOG, so replicas on hosts whose somaxconn differ do not count as different configurations.
    backlog_default: bool = field(default=False, repr=False, compare=False)

    @property
    def bind(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    token: str | None = None
    # Whether `admin.bind` was written: a default address that is taken costs the instance its admin
    # API, not its start (lb.control.balancer.Balancer._bind_admin).
    bind_given: bool = False

    @property
    def bind(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    secret_keys: tuple[str, ...]
    mode: AffinityMode = AffinityMode.INSERT
    cookie: str = "LB_AFFINITY"
    max_age: float = 3600.0
    same_site: SameSite = SameSite.LAX
    http_only: bool = True
    secure: SecureMode = SecureMode.AUTO
    # Native clients without a cookie jar send the token back in this query parameter, or in this header
    # (None: no header), which answers then carry too.  Off unless named: SPEC's answer is the backend's
    # "plus the cookie", and a header on a plain answer would show page scripts the token that an
    # HttpOnly cookie hides from them.
    header: str | None = None
    query_param: str = "lb_affinity"
    # A backend that went down less than this long ago keeps its clients' cookies
    # (they are served elsewhere meanwhile): a flapping gateway does not re-pin everyone.
    redispatch_grace: float = 0.0
    # The token layout this instance seals (every instance opens 1, 2 and 3): 2 while a fleet still runs
    # instances that cannot open 3 (lb.affinity.codec), so that a client they reach keeps its pin.
    token_version: int = 3
    # The cookie's Max-Age: whole seconds, rounded up, so the cookie outlives its token, and never 0
    # (`max_age: 500ms` as Max-Age=0 would tell a browser to delete the cookie at once).  Derived
    # once here, not per handshake.
    cookie_max_age: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cookie_max_age", max(1, math.ceil(self.max_age)))


@dataclass(frozen=True, slots=True)
class RouteConfig:
    path_prefix: str
    pool: str


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    type: HealthCheckType = HealthCheckType.HTTP
    path: str = "/health"
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    # `success` once `health_check` is written; `any` for the check a pool gets without one
    # (`implied_health_check`).
    expect: HealthCheckExpect = HealthCheckExpect.SUCCESS


def implied_health_check() -> HealthCheckConfig:
    """The check of a pool that writes no `health_check`: `GET /health` on the usual schedule, passed by any
    complete HTTP answer (a 403 or a 404 too), failed by a refused or reset connect, silence past the
    timeout, or an answer that is not HTTP.

    HAProxy, Envoy and Traefik check nothing unless asked; wanting a 2xx/3xx from a path nobody
    configured took every backend of a gateway without `/health` down (`HTTP 404`), and every client
    got a 503.  Checking liveness alone still finds dead backends with no configuration, and still
    reads `X-Backend-State` from the answer.
    """
    return HealthCheckConfig(expect=HealthCheckExpect.ANY)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    id: str
    host: str
    port: int
    weight: int = 1
    max_connections: int | None = None  # beyond it, clients are balanced elsewhere
    # `host:port`, formatted once: a handshake reads it (the backend's Host), a property would format
    # it each time.  Out of repr and comparison: derived, and config_hash hashes repr(config).
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", host_port(self.host, self.port))


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """`pools.X.discovery`: backends learned from DNS, re-resolved every `interval`."""

    dns: str
    type: DiscoveryType = DiscoveryType.SRV
    port: int | None = None  # required for type a
    interval: float = 5.0
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver
    timeout: float = 2.0  # one lookup, all nameservers included
    max_backends: int = 256  # a huge answer is cut to this many (logged)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    balance: BalanceMethod = BalanceMethod.LEAST_CONN
    health_check: HealthCheckConfig = field(default_factory=implied_health_check)
    slow_start: float = 0.0  # seconds over which a backend back up ramps to its full weight
    discovery: DiscoveryConfig | None = None  # backends from DNS, besides the static ones
    hash_key: HashKey | None = None  # balance: hash only
    # source/hash pools: false = no cookie, the hash alone routes (what /route says is where
    # every client is); true = the cookie wins while its backend is up or draining.
    sticky: bool = True
    # A handshake whose backend fails goes on to another while there is one, but waits out
    # backend_connect on at most 1 + this many (HAProxy's `retries 3`, counting waits alone): a
    # wedged pool answers 502 after 4 waits, not after one per gateway.
    retries: int = 3

    @property
    def pins(self) -> bool:
        """Whether the pool pins its clients by token: all do but a `source` or `hash` pool with
        `sticky: false`, which the hash alone routes (in rewrite mode its backend's cookie is then the
        backend's alone: it passes unchanged, on interim answers and final ones)."""
        return self.sticky or self.balance not in HASHED_METHODS


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0        # whole request head must arrive within this
    backend_connect: float = 3.0   # TCP connect + backend's handshake answer
    shutdown_grace: float = 10.0   # SIGTERM: live tunnels get 1001 spread over this window
    shutdown_delay: float = 0.0    # SIGTERM: keep serving this long with /readyz at 503 first
    idle: float = 0.0              # close tunnels silent this long; 0 = never (games idle)
    response: float | None = None  # plain HTTP: the final answer once the request is out (None = backend_connect),
    #                                and each quiet spell of an answer's body (None = ANSWER_BODY_SILENCE)

    @property
    def plain_answer(self) -> float:
        """How long a plain (not upgrade) request, sent whole, waits for its final answer."""
        return self.backend_connect if self.response is None else self.response

    @property
    def answer_body(self) -> float:
        """How long an answer's body may go without a byte from the backend (HAProxy's `timeout server`)."""
        return ANSWER_BODY_SILENCE if self.response is None else self.response


# An answer body's quiet spell when `timeouts.response` is unset: nginx's proxy_read_timeout.  Not
# backend_connect's 3 s, which cut server-sent events and long polls between their heartbeats.
ANSWER_BODY_SILENCE = 60.0


def over_limit_answered(limit: int, workers: int = 1) -> int:
    """How many connections past `limit` still get their 503 on TLS or PROXY-protocol listeners (the
    rest are closed as accepted: lb.state.context.ProxyContext.sheds): a tenth of it, at least 64,
    so that a burst a little over a small limit is answered, not cut.

    With `workers`, `limit` is one worker's share of `limits.max_connections`, and the 64 is shared
    too: each worker kept 64 of its own, and the instance N x 64 silent connections where 64 were
    promised (2,048 descriptors with `workers: auto` on 32 cores)."""
    return max(-(-64 // max(1, workers)), limit // 10)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 16384
    max_connections: int = 50000          # client connections at once, all listeners
    handshake_rate_per_ip: float = 0.0    # handshakes per second per source IP; 0 = off (carrier NAT)
    handshake_burst_per_ip: int | None = None  # unset: `burst_per_ip`

    @property
    def burst_per_ip(self) -> int:
        """How many handshakes one address may open at once after a quiet spell: as set, else one
        second's worth of the rate (at least 1).  Not a fixed 100: with a rate of 5/s, a fixed
        burst let one address through 100 handshakes at once, 20 seconds' worth of what the operator
        asked for, where nginx's `limit_req` and HAProxy's `sc_http_req_rate` allow none past it."""
        if self.handshake_burst_per_ip is not None:
            return self.handshake_burst_per_ip
        return max(1, math.ceil(self.handshake_rate_per_ip))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "INFO"
    format: LogFormat = LogFormat.PLAIN
    access_log: bool = True  # one line per handshake and per closed tunnel


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    event_loop: EventLoop = EventLoop.AUTO


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    affinity: AffinityConfig
    routes: tuple[RouteConfig, ...]
    pools: dict[str, PoolConfig]  # by name; never mutated after loading
    admin: AdminConfig = field(default_factory=AdminConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT); >1 adds an owner process
    workers_auto: bool = False  # `workers: auto`: `workers` is what it meant on this machine
    # Peers whose X-Forwarded-For is believed (lb.http.client_address); empty: nobody's.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
