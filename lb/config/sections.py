"""The configuration's keys, section by section: the expanded tree → `Config`, each problem at its key path.

Owns which keys exist, their defaults, and the checks across keys and sections: a route naming a
pool that does not exist, an admin bind that is also a listener's, a TLS pair that does not load
(checked the way `nginx -t` does), `workers: auto`.  Scalars are parsed by `lb.config.scalars`,
problems collected by `lb.config.checker`.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from lb.config.backend_address import OwnListeners, own_listener_reason
from lb.config.checker import (
    REPORTED,
    Bad,
    Checker,
    Expanded,
    Field,
    Parser,
    got,
    join_path,
    kind_of,
    list_of,
    mapping_of,
    optional_list,
    parse_each_field,
    parse_fields,
    scalar_mapping,
    settled,
    show,
    simple_section,
    value_at,
)
from lb.config.document import read_tls_file, relative_to_config
from lb.config.model import (
    DEFAULT_BACKLOG,
    HASHED_METHODS,
    AdminConfig,
    AffinityConfig,
    AffinityMode,
    BackendConfig,
    BalanceMethod,
    Config,
    DiscoveryConfig,
    DiscoveryType,
    EventLoop,
    HashKey,
    HashKeySource,
    HealthCheckConfig,
    HealthCheckExpect,
    HealthCheckType,
    LimitsConfig,
    ListenerConfig,
    LogFormat,
    LoggingConfig,
    PoolConfig,
    RouteConfig,
    RuntimeConfig,
    SameSite,
    SecureMode,
    TimeoutsConfig,
    TlsConfig,
    implied_health_check,
)
from lb.config.scalars import (
    HOSTNAME_RE,
    NOT_UTF8,
    address,
    backend_address,
    bind_address,
    boolean,
    choice,
    cookie_name,
    duration,
    enum_of,
    hash_key,
    header_name,
    identifier,
    integer,
    is_ip,
    is_loopback,
    is_utf8,
    matching,
    number,
    request_path,
    route_prefix,
    secret,
    secure_mode,
    string,
)
from lb.http.client_address import parse_network
from lb.http.cookies import secure_prefix
from lb.http.forwarding import BALANCER_HEADERS, REPLACED_HEADERS
from lb.http.head import PROXY_CLAIMS, dropped_as_alias, protected_headers
from lb.tls import server_ssl_context, tls_files_fault

MAX_WORKERS: Final = 64
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_backlog(somaxconn_path: str = "/proc/sys/net/core/somaxconn") -> int:
    """max(net.core.somaxconn, DEFAULT_BACKLOG): the kernel caps listen() at somaxconn anyway."""
    try:
        with open(somaxconn_path, encoding="ascii") as file:
            return max(int(file.read().strip()), DEFAULT_BACKLOG)
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


_TIMEOUT_FIELDS = (
    Field("handshake", duration()),
    Field("backend_connect", duration()),
    Field("shutdown_grace", duration(allow_zero=True)),
    Field("shutdown_delay", duration(allow_zero=True)),
    Field("idle", duration(allow_zero=True)),
    Field("response", duration()),
)
_LIMIT_FIELDS = (
    # From 1: a limit under a browser's head is advice (lb.config.advice), not refused; a test rig may want
    # `100` to see its 431 without sending kilobytes.
    Field("max_header_bytes", integer(1, 1024 * 1024)),
    Field("max_connections", integer(1, 10_000_000)),
    Field("handshake_rate_per_ip", number(0, 1_000_000)),
    Field("handshake_burst_per_ip", integer(1, 1_000_000)),
)
_LOGGING_FIELDS = (
    Field("level", choice({level: level for level in LOG_LEVELS})),
    Field("format", enum_of(LogFormat)),
    Field("access_log", boolean),
)
_RUNTIME_FIELDS = (Field("event_loop", enum_of(EventLoop)),)
_ADMIN_FIELDS = (Field("bind", bind_address), Field("token", secret))
_AFFINITY_FIELDS = (
    Field("mode", enum_of(AffinityMode)),
    Field("cookie", cookie_name),
    Field("max_age", duration()),
    Field("same_site", enum_of(SameSite)),
    Field("http_only", boolean),
    Field("secure", secure_mode),
    Field("header", header_name),
    Field("query_param", identifier),
    Field("redispatch_grace", duration(allow_zero=True)),
    Field("token_version", integer(2, 3)),
)
_LISTENER_FIELDS = (
    Field("bind", bind_address, required=True),
    Field("proxy_protocol", boolean),
    Field("backlog", integer(1, 1_000_000)),
)
_TLS_FIELDS = (Field("cert", string, required=True), Field("key", string, required=True))
_ROUTE_FIELDS = (Field("path_prefix", route_prefix, required=True), Field("pool", string, required=True))
_POOL_FIELDS = (
    Field("balance", enum_of(BalanceMethod)),
    Field("slow_start", duration(allow_zero=True)),
    Field("hash_key", hash_key),
    Field("sticky", boolean),
    Field("retries", integer(0, 100)),
)
_HEALTH_FIELDS = (
    Field("type", enum_of(HealthCheckType)),
    Field("path", request_path),
    Field("interval", duration()),
    Field("timeout", duration()),
    Field("rise", integer(1, 1000)),
    Field("fall", integer(1, 1000)),
    Field("expect", enum_of(HealthCheckExpect)),
)
_BACKEND_FIELDS = (
    Field("id", identifier, required=True),
    Field("address", backend_address, required=True),
    Field("weight", integer(1, 256)),
    Field("max_connections", integer(1, 10_000_000)),
)
_TOP_KEYS = (
    "listeners", "admin", "affinity", "routes", "pools", "timeouts", "limits", "logging", "runtime", "workers",
    "trusted_proxies",
)
# RFC 1035 §2.3.4: a name is at most 255 octets on the wire, 253 characters as text (without the root's
# dot).  Not the 64 characters of an id: a Kubernetes SRV name is `_port._proto.service.namespace.svc.
# cluster.local`, whose service and namespace may have 63 characters each.
MAX_DNS_NAME_CHARS = 253
_dns_name_text = matching(HOSTNAME_RE, "a DNS name", max_chars=MAX_DNS_NAME_CHARS + 1)


def dns_name(value: object) -> str:
    """`discovery.dns`: a DNS name of at most 253 characters, a trailing dot aside.

    Raises:
        Bad: longer, or not a DNS name.
    """
    # Measured before the pattern's own bound (one more, for the dot), which said "at most 254".
    chars = len(string(value).removesuffix("."))
    if chars > MAX_DNS_NAME_CHARS:
        raise Bad(f"expected at most {MAX_DNS_NAME_CHARS} characters, got {chars}")
    return _dns_name_text(value)


# `discovery.max_backends` at most (and what a worker accepts in a set its owner sends: lb.control.ipc).
MAX_DISCOVERED_BACKENDS = 10_000

_DISCOVERY_FIELDS = (
    Field("dns", dns_name, required=True),
    Field("type", enum_of(DiscoveryType)),
    Field("port", integer(1, 65535)),
    Field("interval", duration()),
    Field("timeout", duration()),
    Field("max_backends", integer(1, MAX_DISCOVERED_BACKENDS)),
)


def _workers(cpu_count: int | None) -> Parser:
    """`workers: N`, or `auto`: one per CPU this process may run on (capped at MAX_WORKERS)."""
    in_range = integer(1, MAX_WORKERS)

    def parse(value: object) -> int:
        if value == "auto":
            cpus = cpu_count if cpu_count is not None else _usable_cpus()
            return max(1, min(MAX_WORKERS, cpus))
        try:
            return int(in_range(value))
        except Bad:
            raise Bad(f"expected auto or an integer from 1 to {MAX_WORKERS}, got {got(value)}") from None

    return parse


CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


def _usable_cpus(cgroup: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by the container's cgroup CPU quota if one is set.

    Not os.cpu_count(): a container pinned to 2 of 64 cores, or limited to 2 CPUs of quota
    (Kubernetes `resources.limits.cpu: 2`), wants 2 workers, not 64.  The quota is cgroup v2's
    `cpu.max`, else cgroup v1's `cpu.cfs_quota_us` (nodes still on v1: there auto used to mean a
    worker per CPU of the node, 16-64 processes of ~60 MB in a pod limited to 2 CPUs and 1 GiB).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup / "cpu.max")
    if quota is None:
        # A container's v1 cpu controller: `cpu,cpuacct` with a `cpu` link (Docker, containerd), or `cpu` alone.
        quota = _cgroup_v1_cpu_quota(cgroup / "cpu") or _cgroup_v1_cpu_quota(cgroup / "cpu,cpuacct")
    return max(1, min(cpus, quota)) if quota is not None else cpus


def _cgroup_cpu_quota(path: Path) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("200000 100000" → 2, rounded up); None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _cgroup_v1_cpu_quota(directory: Path) -> int | None:
    """CPUs allowed by a cgroup v1 quota (`cpu.cfs_quota_us` over `cpu.cfs_period_us`, rounded up); None
    without one (a quota of -1) or without the files."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def root_of(tree: object, check: Checker) -> dict[Any, object] | None:
    """The file's top level: a mapping of the known sections (each unknown key reported)."""
    if tree is None:
        check.add("", "the configuration is empty; expected listeners, affinity, routes and pools")
        return None
    return mapping_of(tree, "", check, _TOP_KEYS)


def build_config(tree: object, check: Checker) -> Config | None:
    """The whole `Config` from the expanded tree, every section checked even after one fails.

    Args:
        tree: the parsed YAML with every `${...}` expanded (`lb.config.document.expand`).
        check: where each problem is added, at its key path.

    Returns:
        The config, or None when `check` holds at least one problem from this pass.
    """
    root = root_of(tree, check)
    if root is None:
        return None
    listeners = _listeners(value_at(root, "listeners", "", check, required=True), check)
    admin = admin_section(root.get("admin"), check)
    if admin is not None and listeners is not None:
        _check_admin_bind(admin, listeners, check)
    affinity = _affinity(value_at(root, "affinity", "", check, required=True), check)
    # Routes are checked against the pool names present, even if a pool is otherwise invalid,
    # so problems come out in the file's usual key order (routes before pools).
    pools_value = root.get("pools")
    pool_names = {str(name) for name in pools_value} if isinstance(pools_value, dict) else None
    pool_names = pool_names or None  # no pools at all: that problem is reported under pools
    routes = _routes(value_at(root, "routes", "", check, required=True), check, pool_names)
    pools = _pools(value_at(root, "pools", "", check, required=True), check)
    if pools is not None and listeners is not None:
        _check_backend_loops(pools, listeners, check)
    timeouts = simple_section(root, "timeouts", check, _TIMEOUT_FIELDS, TimeoutsConfig)
    limits = simple_section(root, "limits", check, _LIMIT_FIELDS, LimitsConfig)
    logging = simple_section(root, "logging", check, _LOGGING_FIELDS, LoggingConfig)
    runtime = simple_section(root, "runtime", check, _RUNTIME_FIELDS, RuntimeConfig)
    top = parse_fields(root, "", check, [Field("workers", _workers(check.cpu_count))])
    trusted_proxies = _networks(root.get("trusted_proxies"), "trusted_proxies", check)
    if affinity is not None:
        # With pools wrong, affinity.header is still checked (every problem at once); hash keys need
        # both pools and trusted_proxies right.
        checked = pools if pools is not None and trusted_proxies is not None else {}
        _check_request_keys(checked, affinity, bool(trusted_proxies), check)
    if (
        top is None
        or trusted_proxies is None
        or
        listeners is None
        or admin is None
        or affinity is None
        or pools is None
        or routes is None
        or timeouts is None
        or limits is None
        or logging is None
        or runtime is None
    ):
        return None
    return Config(
        listeners=listeners,
        admin=admin,
        affinity=affinity,
        routes=routes,
        pools=pools,
        timeouts=timeouts,
        limits=limits,
        logging=logging,
        runtime=runtime,
        trusted_proxies=trusted_proxies,
        workers_auto=root.get("workers") == "auto",
        **top,
    )


def _listeners(value: object, check: Checker) -> tuple[ListenerConfig, ...] | None:
    items = list_of(value, "listeners", check, what="listeners")
    if items is None:
        return None
    listeners = [_listener(item, f"listeners[{i}]", check) for i, item in enumerate(items)]
    # The first listener at each (port, bind key): one look-up per listener, whatever their number
    # (a walk over the earlier ones made a 50,000-listener file a matter of minutes).
    firsts: dict[tuple[int, _BindKey], int] = {}
    for i, listener in enumerate(listeners):
        # Port 0 (an ephemeral port, as tests use) can repeat; anything else would fail to bind,
        # and so would an address beside its family's wildcard (127.0.0.1:8080 and 0.0.0.0:8080).
        if listener is None or listener.port == 0:
            continue
        own, collides = _bind_keys(listener.host)
        first = min((firsts[listener.port, key] for key in collides if (listener.port, key) in firsts), default=None)
        for key in own:
            firsts.setdefault((listener.port, key), i)
        if first is None:
            continue
        earlier = listeners[first]
        assert earlier is not None
        if earlier.host.lower().strip("[]") == listener.host.lower().strip("[]"):
            check.add(f"listeners[{i}].bind", f"duplicate bind {listener.bind} (first at listeners[{first}])")
        else:
            check.add(f"listeners[{i}].bind", f"{listener.bind} overlaps listeners[{first}] ({earlier.bind}): "
                                              "both cannot listen")
    return None if None in listeners else tuple(lis for lis in listeners if lis is not None)


def _listener(value: object, path: str, check: Checker) -> ListenerConfig | None:
    node = mapping_of(value, path, check, ("bind", "tls", "proxy_protocol", "proxy_protocol_from", "backlog"))
    if node is None:
        return None
    kwargs, valid = parse_each_field(node, path, check, _LISTENER_FIELDS)
    proxy_from = _networks(node.get("proxy_protocol_from"), join_path(path, "proxy_protocol_from"), check)
    tls: TlsConfig | None = None
    tls_value = node.get("tls")
    if tls_value is not None:
        tls = _tls(tls_value, join_path(path, "tls"), check)
        valid = valid and tls is not None
    if proxy_from and settled(node, kwargs, "proxy_protocol") and not kwargs.get("proxy_protocol"):
        # Without the header there is nothing to believe: the operator meant the listener to read one.
        check.add(join_path(path, "proxy_protocol_from"), "has no effect without proxy_protocol: true")
        return None
    if not valid or proxy_from is None:
        return None
    kwargs["proxy_protocol_from"] = proxy_from
    host, port = kwargs.pop("bind")
    kwargs["backlog_default"] = not kwargs.get("backlog")
    kwargs["backlog"] = kwargs.get("backlog") or default_backlog()
    return ListenerConfig(host=host, port=port, tls=tls, **kwargs)


def _networks(
    value: object, path: str, check: Checker
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """`trusted_proxies` or a listener's `proxy_protocol_from`: a list (possibly empty) of CIDRs or
    addresses; absent or null is empty."""
    items = optional_list(value, path, check, what="CIDRs such as [10.0.0.0/8]")
    if items is None:
        return None
    networks = []
    valid = True
    for i, item in enumerate(items):
        path_i = f"{path}[{i}]"
        if item is REPORTED:  # said already (an unset ${VAR}, an integer too long): said once
            valid = False
            continue
        if not isinstance(item, str):
            check.add(path_i, f"expected a CIDR such as 10.0.0.0/8, got {kind_of(item)}")
            valid = False
            continue
        try:
            networks.append(parse_network(item))
        except ValueError as exc:
            # Its message quotes the value, which a `${...}` may have taken from a secret.
            check.add(path_i, f"expected a CIDR such as 10.0.0.0/8, got {show(item)}" if isinstance(item, Expanded)
                      else str(exc))
            valid = False
    return tuple(networks) if valid else None


def _tls(value: object, path: str, check: Checker) -> TlsConfig | None:
    node = mapping_of(value, path, check, ("cert", "key"))
    if node is None:
        return None
    kwargs = parse_fields(node, path, check, _TLS_FIELDS)
    if kwargs is None:
        return None
    files: dict[str, tuple[str, bytes]] = {}
    for key in ("cert", "key"):
        # Relative to the config file, so `lb run --config deploy/lb.yaml` works from anywhere.
        try:
            resolved = relative_to_config(check.base_dir, kwargs[key])
        except ValueError as exc:
            check.add(join_path(path, key), str(exc))
            continue
        content, problem = read_tls_file(resolved, "certificate" if key == "cert" else "private key", check)
        if problem is not None:
            check.add(join_path(path, key), problem)
        else:
            files[key] = str(resolved), content
    if len(files) < 2:
        return None
    (cert, cert_pem), (key, key_pem) = files["cert"], files["key"]
    tls = TlsConfig(cert, key, cert_pem, key_pem)
    try:
        server_ssl_context(tls)
    except (ssl.SSLError, OSError) as exc:
        faults = tls_files_fault(tls, exc)
        for which, why in faults:
            check.add(join_path(path, which), why)
        if not faults:
            check.add(path, f"cannot load the certificate and key: {exc}")
        return None
    return tls


def admin_section(value: object, check: Checker) -> AdminConfig | None:
    """The `admin:` section (its defaults when absent); `lb ctl` reads it alone.

    Returns:
        The admin config, or None with its problems added to `check` (a token is required off loopback).
    """
    if value is None:
        return AdminConfig()
    node = mapping_of(value, "admin", check, [f.key for f in _ADMIN_FIELDS])
    if node is None:
        return None
    kwargs = parse_fields(node, "admin", check, _ADMIN_FIELDS)
    if kwargs is None:
        return None
    if "bind" in kwargs:
        kwargs["host"], kwargs["port"] = kwargs.pop("bind")
        kwargs["bind_given"] = True
    admin = AdminConfig(**kwargs)
    # The admin API can drain and disable backends; off-host it must not be open to anyone.
    if admin.token is None and not is_loopback(admin.host):
        check.add("admin.token", "a token is required when admin listens on a non-loopback address")
        return None
    return admin


def _check_admin_bind(admin: AdminConfig, listeners: Sequence[ListenerConfig], check: Checker) -> None:
    """The admin API on a listener's address would fail to bind at start: said by `lb validate` instead."""
    if admin.port == 0:
        return
    for i, listener in enumerate(listeners):
        if listener.port == admin.port and _overlap(admin.host, listener.host):
            check.add("admin.bind", f"{admin.bind} overlaps listeners[{i}] ({listener.bind}); the admin API needs "
                                    "an address of its own")
            return


def _check_backend_loops(pools: Mapping[str, PoolConfig], listeners: Sequence[ListenerConfig], check: Checker) -> None:
    """A backend at one of the balancer's own listeners (`lb.config.backend_address`)."""
    own = OwnListeners.of(listeners)
    for name, pool in pools.items():
        for i, backend in enumerate(pool.backends):
            bind = own.reached_by(backend.host, backend.port)
            if bind is not None:
                check.add(f"pools.{name}.backends[{i}].address", f"{backend.address} {own_listener_reason(bind)}")


_WILDCARDS = {"0.0.0.0": 4, "::": 6}
_BindKey = tuple[str, str | int]


def _bind_keys(host: str) -> tuple[tuple[_BindKey, ...], tuple[_BindKey, ...]]:
    """The keys a bind on `host` claims on its port, and those of other binds it collides with: the
    host itself; an address also claims its family, which its family's wildcard collides with, and
    the wildcard claims the family's wildcard, which its addresses collide with.  Tagged, so that a
    host name can never equal a family's key.

    `::` takes no IPv4 address: every socket here is IPV6_V6ONLY.  Names are compared as written
    (resolving them is the start's business).
    """
    host = host.lower().strip("[]")
    wildcard = _WILDCARDS.get(host)
    if wildcard is not None:
        return (("host", host), ("any", wildcard)), (("host", host), ("ip", wildcard))
    for version in (4, 6):
        if is_ip(host, version=version):
            return (("host", host), ("ip", version)), (("host", host), ("any", version))
    return (("host", host),), (("host", host),)


def _overlap(one: str, other: str) -> bool:
    """Whether two binds on one port collide (`_bind_keys`, for a pair)."""
    return not set(_bind_keys(one)[0]).isdisjoint(_bind_keys(other)[1])


def _affinity(value: object, check: Checker) -> AffinityConfig | None:
    node = mapping_of(value, "affinity", check, [*(f.key for f in _AFFINITY_FIELDS), "secret_keys"])
    if node is None:
        return None
    kwargs, valid = parse_each_field(node, "affinity", check, _AFFINITY_FIELDS)
    keys = _secret_keys(value_at(node, "secret_keys", "affinity", check, required=True), check)
    # Each check across keys runs once the keys it reads parsed (or are absent, at their defaults), so
    # that a bad key or secret hides no other problem, and a wrong one (a misspelt `mode`) is not
    # judged as its default.
    affinity = AffinityConfig(secret_keys=keys or (), **kwargs)
    valid = valid and keys is not None
    if affinity.header is not None and affinity.header.lower() in BALANCER_HEADERS:
        check.add(
            "affinity.header",
            f"{affinity.header} is a header the balancer reads or writes itself: the token would take its place; "
            "name one of your own (X-LB-Affinity, say)",
        )
        valid = False
    # RFC 6265bis §5.4.7: browsers drop SameSite=None cookies that lack Secure.
    if settled(node, kwargs, "same_site", "secure") and affinity.same_site is SameSite.NONE \
            and affinity.secure is SecureMode.NEVER:
        check.add("affinity.same_site", "same_site None needs the Secure attribute, but secure is never (false)")
        valid = False
    prefix = secure_prefix(affinity.cookie)
    if settled(node, kwargs, "cookie", "mode", "secure") and prefix is not None \
            and affinity.mode is AffinityMode.INSERT and affinity.secure is SecureMode.NEVER:
        check.add("affinity.cookie", f"a {prefix} cookie needs the Secure attribute (browsers drop it without), "
                  "but secure is never (false)")
        valid = False
    return affinity if valid else None


def _check_request_keys(
    pools: Mapping[str, PoolConfig], affinity: AffinityConfig, trusted_proxies: bool, check: Checker
) -> None:
    """The names the balancer reads a request by must reach it, and a hash key must be what the backend
    gets: not a header it replaces or drops (an untrusted client's X-Forwarded-For chose its backend,
    which saw the balancer's), nor the affinity token's header, cookie or query parameter."""
    routing = [
        pool.hash_key.name for pool in pools.values()
        if pool.hash_key is not None and pool.hash_key.source is HashKeySource.HEADER
    ]
    protected = protected_headers(affinity.header, routing)
    if affinity.header is not None and dropped_as_alias(affinity.header, protected):
        check.add(
            "affinity.header",
            f"{affinity.header} stands for a header of ours once '_' reads as '-' (as CGI and WSGI read it): every "
            "request's parse leaves it out, so the token would never come back; name one with '-'",
        )
    replaced = REPLACED_HEADERS if trusted_proxies else REPLACED_HEADERS | PROXY_CLAIMS
    for name, pool in pools.items():
        key = pool.hash_key
        if key is None:
            continue
        lowered = key.name.lower()
        if key.source is HashKeySource.HEADER and lowered in PROXY_CLAIMS and lowered in replaced:
            why = ("is dropped before the backend (for the client's address, use balance: source; a proxy in front "
                   "that sets it passes it once trusted_proxies names it)")
        elif key.source is HashKeySource.HEADER and lowered in replaced:
            why = "is replaced or dropped before the backend (for the client's address, use balance: source)"
        elif key.source is HashKeySource.HEADER and dropped_as_alias(key.name, protected):
            why = "stands for a header of ours once '_' reads as '-': every request's parse leaves it out"
        elif key.source is HashKeySource.HEADER and lowered == "cookie":
            # The whole Cookie line holds the affinity cookie too, which the backend never gets (insert
            # mode takes it off, rewrite mode opens it): a client's pin of another pool, re-sealed at
            # every refresh, moved it between gateways, and /route could not say where.
            why = "carries the affinity cookie, which is taken off the request (hash one cookie: cookie:NAME)"
        elif _carries_token(key, affinity):
            why = "carries the affinity token, which is taken off the request"
        else:
            continue
        check.add(f"pools.{name}.hash_key", f"{key} {why}: a client would pick its backend by a value no backend sees")


def _carries_token(key: HashKey, affinity: AffinityConfig) -> bool:
    """Whether `key` names where the affinity token travels (taken off every request before the backend)."""
    if key.source is HashKeySource.HEADER:
        return affinity.header is not None and key.name.lower() == affinity.header.lower()
    # Cookie names and query parameters are case-sensitive.
    return key.name == (affinity.cookie if key.source is HashKeySource.COOKIE else affinity.query_param)


# A short key is advice (lb.config.advice: a test rig may want one), an empty one no key at all.
_EMPTY_KEY = "expected a secret key, got an empty string; generate one with `lb keygen`"


def _secret_keys(value: object, check: Checker) -> tuple[str, ...] | None:
    path = "affinity.secret_keys"
    items = list_of(value, path, check, what="secret keys")
    if items is None:
        return None
    keys: list[str] = []
    for i, item in enumerate(items):
        if item is REPORTED:
            continue
        if not isinstance(item, str):
            check.add(f"{path}[{i}]", f"expected a string, got {type(item).__name__}")  # never echo a key
        elif not item:
            check.add(f"{path}[{i}]", _EMPTY_KEY)
        elif not is_utf8(item):
            check.add(f"{path}[{i}]", NOT_UTF8)
        else:
            keys.append(str(item))
    if len(keys) != len(items):
        return None
    # A key given twice opens nothing the first copy does not, but each copy is tried on every token
    # that names its key id, a forged one too: 20,000 copies (a list of aliases) made a forged cookie
    # cost 40 ms of the event loop.  Given twice on purpose too: `[current, previous]` from two Secret
    # files that hold one key until the first rotation.  Kept once, in the place it was first given.
    return tuple(dict.fromkeys(keys))


def _routes(value: object, check: Checker, pools: Collection[str] | None) -> tuple[RouteConfig, ...] | None:
    items = list_of(value, "routes", check, what="routes")
    if items is None:
        return None
    routes: list[RouteConfig | None] = []
    first_at: dict[str, int] = {}
    for i, item in enumerate(items):
        route = _route(item, f"routes[{i}]", check, pools)
        routes.append(route)
        if route is None:
            continue
        first = first_at.setdefault(route.path_prefix, i)
        if first != i:
            check.add(
                f"routes[{i}].path_prefix",
                f"duplicate path_prefix {show(route.path_prefix)} (first at routes[{first}])",
            )
    return None if None in routes else tuple(r for r in routes if r is not None)


def _route(value: object, path: str, check: Checker, pools: Collection[str] | None) -> RouteConfig | None:
    kwargs = scalar_mapping(value, path, check, _ROUTE_FIELDS)
    # When pools is not a non-empty mapping, an "unknown pool" here would only be noise.  Checked
    # even when another field of the route is wrong: every problem at once.
    pool = kwargs["pool"] if kwargs is not None else _unchecked_text(value, "pool", path, check)
    if pools is not None and pool is not None and pool not in pools:
        known = ", ".join(sorted(pools))
        check.add(join_path(path, "pool"), f"unknown pool {show(pool)}; defined pools: {known}")
        return None
    return None if kwargs is None else RouteConfig(**kwargs)


def _unchecked_text(value: object, key: str, path: str, check: Checker) -> str | None:
    """The text at `key` of an entry whose other fields failed, when nothing was said of this one."""
    text = value.get(key) if isinstance(value, dict) else None
    if not isinstance(text, str) or check.said(join_path(path, key)):
        return None
    return text


def _pools(value: object, check: Checker) -> dict[str, PoolConfig] | None:
    if value is REPORTED:
        return None
    if not isinstance(value, dict):
        check.add("pools", f"expected a mapping of pool names to pools, got {kind_of(value)}")
        return None
    if not value:
        check.add("pools", "expected at least one pool")
        return None
    pools: dict[str, PoolConfig] = {}
    valid = True
    for name, item in value.items():
        path = join_path("pools", name)
        try:
            pool_name = identifier(name)
        except Bad as exc:
            check.add(path, f"invalid pool name: {exc}")
            valid = False
            continue
        pool = _pool(pool_name, item, path, check)
        if pool is None:
            valid = False
        else:
            pools[pool_name] = pool
    return pools if valid else None


def _pool(name: str, value: object, path: str, check: Checker) -> PoolConfig | None:
    node = mapping_of(value, path, check, (*(f.key for f in _POOL_FIELDS), "health_check", "backends", "discovery"))
    if node is None:
        return None
    kwargs, valid = parse_each_field(node, path, check, _POOL_FIELDS)
    health = _health_check(node.get("health_check"), join_path(path, "health_check"), check)
    discovery: DiscoveryConfig | None = None
    discovered = node.get("discovery") is not None
    if discovered:  # a wrong discovery still lets the rest of the pool be checked: every problem at once
        discovery = _discovery(node["discovery"], join_path(path, "discovery"), check)
    # A pool needs backends from somewhere: a static list, DNS, or both.
    backends_value = value_at(node, "backends", path, check, required=not discovered,
                              instead="a pool needs backends, a discovery, or both")
    # `backends: []` beside a discovery is "none static" (what a template emits), as the key left out is.
    none_static = backends_value is None or (discovered and backends_value == [])
    backends = () if none_static else _backends(backends_value, join_path(path, "backends"), check)
    # Each check across keys runs once the keys it reads parsed (or are absent): judged even when
    # another key is wrong, never on a wrong one.
    balance = kwargs.get("balance")
    if settled(node, kwargs, "balance", "hash_key"):
        if balance is BalanceMethod.HASH and kwargs.get("hash_key") is None:
            check.add(
                join_path(path, "hash_key"), "balance: hash needs a hash_key (header:NAME, query:NAME or cookie:NAME)"
            )
            valid = False
        elif balance is not BalanceMethod.HASH and kwargs.get("hash_key") is not None:
            check.add(join_path(path, "hash_key"), "only used with balance: hash")
            valid = False
    if settled(node, kwargs, "balance", "sticky") and balance not in HASHED_METHODS and kwargs.get("sticky") is False:
        check.add(join_path(path, "sticky"), "only used with balance: source or hash (other pools always pin)")
        valid = False
    if not valid or health is None or backends is None or (discovered and discovery is None):
        return None
    return PoolConfig(name=name, backends=backends, health_check=health, discovery=discovery, **kwargs)


def _discovery(value: object, path: str, check: Checker) -> DiscoveryConfig | None:
    node = mapping_of(value, path, check, (*(f.key for f in _DISCOVERY_FIELDS), "nameservers"))
    if node is None:
        return None
    kwargs, valid = parse_each_field(node, path, check, _DISCOVERY_FIELDS)
    nameservers = _nameservers(node.get("nameservers"), join_path(path, "nameservers"), check)
    if kwargs.get("type") is DiscoveryType.A and node.get("port") is None:  # absent (a wrong one is said already)
        check.add(join_path(path, "port"), "type a needs a port (A records carry none)")
        return None
    if not valid or nameservers is None:
        return None
    return DiscoveryConfig(nameservers=nameservers, **kwargs)


def _nameservers(value: object, path: str, check: Checker) -> tuple[tuple[str, int], ...] | None:
    """`discovery.nameservers`: IP address and port of each (absent, null or empty: the system resolver);
    None: a problem, said."""
    items = optional_list(value, path, check, what="host:port")
    if items is None:
        return None
    parse = address(min_port=1)
    nameservers: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        if item is REPORTED:  # said already (an unset ${VAR}, an integer too long): said once
            continue
        try:
            host, port = parse(item)
        except Bad as exc:
            check.add(f"{path}[{i}]", str(exc))
            continue
        if host.lower().rstrip(".") == "localhost":
            # RFC 6761 §6.3: the name is the loopback address, whatever a resolver says (a test's or a
            # sidecar's DNS server on `localhost:5353`); IPv4's, as /etc/hosts lists it first.
            host = "127.0.0.1"
        # dnspython talks to nameservers by address only: any other name would need a resolver first.
        if not (is_ip(host, version=4) or is_ip(host, version=6)):
            check.add(f"{path}[{i}]", f"expected an IP address (or localhost), got {show(host)}")
            continue
        nameservers.append((host, port))
    return tuple(nameservers) if len(nameservers) == len(items) else None


def _health_check(value: object, path: str, check: Checker) -> HealthCheckConfig | None:
    """`pools.X.health_check`; absent (or null): the implied check, which any HTTP answer passes.

    Written, even as `{type: http}` alone, it wants a 2xx/3xx unless it says `expect: any`.
    """
    if value is None:
        return implied_health_check()
    node = mapping_of(value, path, check, [f.key for f in _HEALTH_FIELDS])
    if node is None:
        return None
    kwargs, valid = parse_each_field(node, path, check, _HEALTH_FIELDS)
    if settled(node, kwargs, "type", "expect") and kwargs.get("type") is HealthCheckType.TCP and "expect" in kwargs:
        check.add(join_path(path, "expect"), "only used with type: http (a tcp check passes on a connect)")
        valid = False
    return HealthCheckConfig(**kwargs) if valid else None


def _backends(value: object, path: str, check: Checker) -> tuple[BackendConfig, ...] | None:
    items = list_of(value, path, check, what="backends")
    if items is None:
        return None
    backends = [_backend(item, f"{path}[{i}]", check) for i, item in enumerate(items)]
    first_id: dict[str, int] = {}
    first_address: dict[tuple[str, int], int] = {}
    for i, backend in enumerate(backends):
        # A repeated id is said even when another field of the entry is wrong: every problem at once.
        backend_id = backend.id if backend is not None else _unchecked_text(items[i], "id", f"{path}[{i}]", check)
        if backend_id is not None:
            first = first_id.setdefault(backend_id, i)
            if first != i:
                check.add(
                    f"{path}[{i}].id", f"duplicate backend id {show(backend_id)} (first at {path}[{first}])"
                )
        if backend is None:
            continue
        first = first_address.setdefault((backend.host.lower(), backend.port), i)
        if first != i:
            check.add(
                f"{path}[{i}].address",
                f"duplicate backend address {backend.address} (first at {path}[{first}])",
            )
    if None in backends or len(first_id) < len(backends) or len(first_address) < len(backends):
        return None
    return tuple(b for b in backends if b is not None)


def _backend(value: object, path: str, check: Checker) -> BackendConfig | None:
    kwargs = scalar_mapping(value, path, check, _BACKEND_FIELDS)
    if kwargs is None:
        return None
    kwargs["host"], kwargs["port"] = kwargs.pop("address")
    return BackendConfig(**kwargs)
