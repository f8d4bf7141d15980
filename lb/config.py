"""Typed, frozen configuration objects: what `config_load` builds and everything else reads.

Durations are float seconds, sequences are tuples, choices are StrEnums.  No
validation lives here; `config_load` checks every value before building these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


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


class HealthCheckType(StrEnum):
    HTTP = "http"
    TCP = "tcp"


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


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str
    port: int
    tls: TlsConfig | None = None

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    token: str | None = None


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    secret_keys: tuple[str, ...]
    mode: AffinityMode = AffinityMode.INSERT
    cookie: str = "LB_AFFINITY"
    max_age: float = 3600.0
    same_site: SameSite = SameSite.LAX
    http_only: bool = True
    secure: SecureMode = SecureMode.AUTO
    # Native clients without a cookie jar send the token back in this header or query parameter.
    header: str = "X-LB-Affinity"
    query_param: str = "lb_affinity"
    # A backend that went down less than this long ago keeps its clients' cookies
    # (they are served elsewhere meanwhile): a flapping gateway does not re-pin everyone.
    redispatch_grace: float = 0.0


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


@dataclass(frozen=True, slots=True)
class BackendConfig:
    id: str
    host: str
    port: int
    weight: int = 1
    max_connections: int | None = None  # beyond it, clients are balanced elsewhere

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    balance: BalanceMethod = BalanceMethod.LEAST_CONN
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    slow_start: float = 0.0  # seconds over which a backend back up ramps to its full weight


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0        # whole request head must arrive within this
    backend_connect: float = 3.0   # TCP connect + backend's handshake answer
    shutdown_grace: float = 10.0   # SIGTERM: time before live tunnels are closed
    idle: float = 0.0              # close tunnels silent this long; 0 = never (games idle)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 16384
    max_connections: int = 50000          # client connections at once, all listeners
    handshake_rate_per_ip: float = 0.0    # handshakes per second per source IP; 0 = off (carrier NAT)
    handshake_burst_per_ip: int = 100


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
