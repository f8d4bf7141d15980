"""What a valid configuration will do that its operator may not expect.  [pure]

Not problems (`lb.config.sections` refuses those): each is a setting that works as written
but quietly defeats its purpose.  `lb validate` prints them, and the balancer logs them
as warnings at start and on every reload, so they are seen before a player is.
"""

from __future__ import annotations

from collections.abc import Iterator

from lb.affinity.carriers import MAX_PINS
from lb.config.model import (
    HASHED_METHODS,
    AffinityMode,
    Config,
    DiscoveryType,
    PoolConfig,
    SameSite,
    SecureMode,
    host_port,
    over_limit_answered,
)
from lb.config.scalars import is_loopback
from lb.http.cookies import secure_prefix

# Descriptors a process needs besides its client connections and its health checks (one per backend
# at a time, counted apart): listeners, the admin API and its clients, DNS queries, logs, the loop's own.
DESCRIPTOR_RESERVE = 64
# Shorter than this, an admin token is advice (not refused: a test rig may want `t`).  16 random
# base64 characters are 96 bits; `lb keygen` gives 43.
MIN_ADMIN_TOKEN_CHARS = 16
# Shorter than this, a secret key is advice, not refused (a test rig may write its own): whoever holds one
# cookie can try guesses offline against its seal, and a guessed key forges a pin to any backend and opens
# rewrite mode's sealed session values.  `lb keygen` prints 43 characters, 256 bits.
MIN_SECRET_KEY_CHARS = 32
# Under this, `limits.max_header_bytes` is advice: a browser's WebSocket handshake (its User-Agent,
# Sec-WebSocket-* fields and a few cookies) is 500 bytes to well over a kilobyte, and one over gets 431.
MIN_HEADER_BYTES = 1024
# Shorter than this, a discovery's interval is advice: `1ms` (for `1m`) was 270 lookups a second and
# 40 % of a core for three records, where a Kubernetes zone follows its endpoints within seconds.
MIN_DISCOVERY_INTERVAL = 1.0
# Shorter than this, a health check's interval is advice: `1ms` (for `1m` or `1s`) was some 700 probes
# a second to each backend and a third of a core for three of them, and a backend that stops answering
# is seen within `fall` intervals anyway.
MIN_HEALTH_CHECK_INTERVAL = 0.1
# Longer than this, `timeouts.handshake` or `backend_connect` is advice: each is seconds in HAProxy's and
# nginx's defaults, and an HAProxy user's `backend_connect: 3000` (a bare number is seconds) is 50 minutes.
MAX_LIKELY_TIMEOUT = 60.0
# Longer than this, and not shorter than its interval, a health check's timeout is advice: a frozen backend
# is marked down only after `fall` of them (`timeout: 500`, meant as ms, kept one up for 1000 s).
MAX_LIKELY_PROBE_TIMEOUT = 10.0
BARE_NUMBER_HINT = " (if it was written without a unit: a bare number is seconds, not milliseconds)"
# Longer than this, a cookie's Max-Age is advice: browsers cap it there (RFC 6265bis, 400 days), so a
# browser's pin ends sooner than `affinity.max_age` says; a native client keeps it as long.
BROWSER_COOKIE_DAYS = 400
# Backends a sentence names at most (a pool of thousands would make a line of them).
MAX_NAMED = 8


def _most_backends(config: Config) -> int:
    """Backends the configuration may bring at once: the static ones, and each discovery's `max_backends`."""
    return sum(
        len(pool.backends) + (pool.discovery.max_backends if pool.discovery is not None else 0)
        for pool in config.pools.values()
    )


def advice(config: Config, *, crc32c_in_c: bool = True, descriptors: int | None = None) -> list[str]:
    """One sentence per surprise, each naming the key to change.

    Args:
        crc32c_in_c: whether google-crc32c runs its C code (`lb.http.proxy_header.CRC32C_IN_C`).
        descriptors: the descriptors each balancer process may open (its RLIMIT_NOFILE), if known.
    """
    said: list[str] = []
    if descriptors is not None:
        said += _descriptor_advice(config, descriptors)
    if config.workers > 1:
        # Each worker binds its listeners itself (SO_REUSEPORT): port 0 gives each a port of its own.
        said += [
            f"listeners[{i}].bind: port 0 (any free port) with workers: {config.workers}: each worker listens on "
            "a port of its own (a restarted one on yet another), and clients reach one worker's; give a port"
            for i, listener in enumerate(config.listeners) if listener.port == 0
        ]
    proxied = [f"listeners[{i}]" for i, listener in enumerate(config.listeners) if listener.proxy_protocol]
    if proxied and not crc32c_in_c:
        said.append(
            f"{', '.join(proxied)}.proxy_protocol: google-crc32c runs its pure-Python fallback here, so a PROXY "
            "v2 header's CRC32c costs ~200 µs instead of 0.2 µs; install a google-crc32c wheel for this platform"
        )
    # A PROXY header names any client it likes: believed from every peer, any client that reaches the
    # listener picks its own address (per-IP limits, balance: source, the logs, trusted_proxies' claims).
    said += [
        f"listeners[{i}].proxy_protocol without proxy_protocol_from: a PROXY header is believed from any peer, so "
        f"anyone who reaches {host_port(listener.host, listener.port)} names its own client address; list the L4 "
        "balancers' CIDRs there, unless a firewall or NetworkPolicy lets only them in"
        for i, listener in enumerate(config.listeners)
        if listener.proxy_protocol and not listener.proxy_protocol_from and not is_loopback(listener.host)
    ]
    token = config.admin.token
    if token is None:
        said.append(
            "admin.token is not set: the admin API serves GET only, and drain, disable and enable "
            "(the dashboard's buttons, lb ctl) answer 401"
        )
    elif len(token) < MIN_ADMIN_TOKEN_CHARS:
        said.append(
            f"admin.token is {len(token)} characters: short enough to guess, and it drains and disables "
            f"backends; use {MIN_ADMIN_TOKEN_CHARS} random characters or more (`lb keygen` prints 43)"
        )
    said += [
        # The length alone: a key is never shown, not even in part.
        f"affinity.secret_keys holds a key of {len(key)} characters: short enough to guess offline from one "
        f"cookie, and it forges pins and opens rewrite mode's session values; use {MIN_SECRET_KEY_CHARS} random "
        "characters or more (`lb keygen` prints 43)"
        for key in config.affinity.secret_keys if len(key) < MIN_SECRET_KEY_CHARS
    ]
    if config.limits.max_header_bytes < MIN_HEADER_BYTES:
        said.append(
            f"limits.max_header_bytes is {config.limits.max_header_bytes}: a browser's handshake with a few "
            f"cookies is more, and gets 431; {MIN_HEADER_BYTES} or more (the default is 16384)"
        )
    everyone = [str(network) for network in config.trusted_proxies if network.prefixlen == 0]
    if everyone:
        said.append(
            f"trusted_proxies holds {', '.join(everyone)}: every peer is believed, so any client names its own "
            "address in X-Forwarded-For (per-IP limits, balance: source and the logs follow it); list the "
            "proxies in front only"
        )
    for name, pool in config.pools.items():
        interval = pool.health_check.interval
        if interval < MIN_HEALTH_CHECK_INTERVAL and (pool.backends or pool.discovery is not None):
            said.append(
                f"pools.{name}.health_check.interval is {interval * 1000:g}ms: up to {1 / interval:.0f} probes a "
                f"second to each backend (a share of a core here, and load on every backend); "
                f"{MIN_HEALTH_CHECK_INTERVAL * 1000:g}ms or more (was 1s or 1m meant?)"
            )
        check = pool.health_check
        if check.timeout >= check.interval and check.timeout > MAX_LIKELY_PROBE_TIMEOUT and (
            pool.backends or pool.discovery is not None
        ):
            said.append(
                f"pools.{name}.health_check.timeout is {check.timeout:g}s, not shorter than its interval "
                f"({check.interval:g}s): a backend that stops answering is marked down only after "
                f"{check.fall} x {check.timeout:g}s{BARE_NUMBER_HINT}"
            )
        discovery = pool.discovery
        if discovery is not None and discovery.interval < MIN_DISCOVERY_INTERVAL:
            said.append(
                f"pools.{name}.discovery.interval is {discovery.interval * 1000:g}ms: about "
                f"{1 / discovery.interval:.0f} DNS lookups a second (a share of a core, and the nameserver's "
                f"load), where a zone's changes take seconds to spread anyway; {MIN_DISCOVERY_INTERVAL:g}s or "
                "more (was 1m meant?)"
            )
        if discovery is not None and discovery.type is DiscoveryType.SRV and discovery.port is not None:
            said.append(
                f"pools.{name}.discovery.port is ignored with type: srv: each record carries its own port "
                "(the port is for type: a)"
            )
        if pool.slow_start > 0 and pool.balance in HASHED_METHODS:
            said.append(
                f"pools.{name}.slow_start is ignored with balance: {pool.balance.value}: a weight ramping on each "
                "instance's own clock would send one key to different backends through different instances"
            )
    timeouts = config.timeouts
    for key, seconds, why in (
        ("handshake", timeouts.handshake, "a client may take that long to send its head, holding a connection"),
        ("backend_connect", timeouts.backend_connect,
         "a client waits that long on a gateway that does not answer before another is tried"),
    ):
        if seconds > MAX_LIKELY_TIMEOUT:
            said.append(f"timeouts.{key} is {seconds:g}s: {why}{BARE_NUMBER_HINT}")
    limits = config.limits
    if limits.handshake_burst_per_ip is not None and limits.handshake_rate_per_ip == 0:
        said.append(
            "limits.handshake_burst_per_ip is set but handshake_rate_per_ip is 0 (off): nothing is limited; "
            "set a rate per second too"
        )
    said += _zero_share_advice(config)
    pinning = _pinning_pools(config)
    if len(pinning) > MAX_PINS:
        said.append(
            f"{len(pinning)} routed pools pin their clients ({', '.join(pinning)}): the affinity cookie holds "
            f"{MAX_PINS} pins, one per pool, so a client that uses more than {MAX_PINS} of them loses its oldest "
            "pin on each visit to another and may move; merge pools, or give hashed ones sticky: false"
        )
    affinity = config.affinity
    if affinity.max_age > BROWSER_COOKIE_DAYS * 86400:
        said.append(
            f"affinity.max_age is {affinity.max_age / 86400:g} days: browsers keep a cookie {BROWSER_COOKIE_DAYS} "
            f"days at most (RFC 6265bis), so a browser client's pin ends sooner than that; "
            f"{BROWSER_COOKIE_DAYS}d or less"
        )
    plain = [f"listeners[{i}]" for i, listener in enumerate(config.listeners) if listener.tls is None]
    if plain and affinity.secure is SecureMode.AUTO:
        # Browsers drop a `SameSite=None` cookie, or one named `__Secure-`/`__Host-`, without `Secure`
        # (and so never send it back); `secure: never` with either is a problem lb.config.sections refuses.
        if affinity.same_site is SameSite.NONE:
            said.append(
                f"affinity.same_site is None: on {', '.join(plain)} (no TLS) the cookie goes without "
                "Secure, and browsers drop it there, so their browser clients never stick"
            )
        prefix = secure_prefix(affinity.cookie)
        if prefix is not None and affinity.mode is AffinityMode.INSERT:
            said.append(
                f"affinity.cookie {affinity.cookie} has the {prefix} prefix: on {', '.join(plain)} (no TLS) the "
                f"cookie goes without Secure, and browsers drop a {prefix} cookie without it, so their browser "
                "clients never stick"
            )
    return said


def _descriptor_advice(config: Config, descriptors: int) -> list[str]:
    """`limits.max_connections` beyond what the descriptor limit lets a process hold."""
    workers = max(1, config.workers)
    per_process = -(-config.limits.max_connections // workers)  # a worker's share, rounded up
    reserve = DESCRIPTOR_RESERVE + _most_backends(config)
    # TLS and PROXY-protocol listeners answer an overflow past the limit with a 503, one descriptor each
    # while its handshake runs (ProxyContext.sheds).  Only past the limit: when the descriptors run out
    # first, there is no such overflow to count (a shed reserve of 5,000 said "past about 0").
    shed = (over_limit_answered(per_process, workers)
            if any(listener.tls is not None or listener.proxy_protocol for listener in config.listeners) else 0)
    # Each client connection holds two descriptors while it lasts: its own and its backend's.
    if 2 * per_process + reserve + shed <= descriptors:
        return []
    fits = max(0, (descriptors - reserve) // 2)
    each = f" ({per_process} for each of {workers} workers)" if workers > 1 else ""
    if fits >= per_process:
        room = descriptors - reserve - 2 * per_process
        return [
            f"limits.max_connections is {config.limits.max_connections}{each} and fits the {descriptors} "
            "descriptors a process may open (RLIMIT_NOFILE), but TLS and PROXY-protocol listeners answer "
            f"the {shed} connections past it{' (per process)' if workers > 1 else ''} with a 503, one descriptor "
            f"each, and only {room} of those fit: "
            "past them new clients are closed without an answer; raise the limit (ulimit -n, systemd "
            "LimitNOFILE=, the container runtime's nofile) or lower limits.max_connections"
        ]
    return [
        f"limits.max_connections is {config.limits.max_connections}{each}, but a process may open only "
        f"{descriptors} descriptors (RLIMIT_NOFILE) and each client connection holds two, its own and its "
        f"backend's: past about {fits} connections per process new clients fail instead of getting a 503; "
        "raise the limit (ulimit -n, systemd LimitNOFILE=, the container runtime's nofile) or lower "
        "limits.max_connections"
    ]


def _zero_share_advice(config: Config) -> list[str]:
    """Connection limits below the number of workers: each worker enforces its share, and a share of 0
    refuses every client that worker gets, however few connections the instance holds."""
    workers = config.workers
    if workers <= 1:
        return []
    limited = [("limits.max_connections", config.limits.max_connections)] + [
        (f"pools.{name}.backends[{i}].max_connections", backend.max_connections)
        for name, pool in config.pools.items()
        for i, backend in enumerate(pool.backends)
        if backend.max_connections is not None
    ]
    return [
        f"{key} is {limit} with {workers} workers: each worker enforces its share, so {workers - limit} of them "
        f"have a share of 0 and refuse every client they get (503, or another backend), however few are "
        f"connected; set {workers} or more, or fewer workers"
        for key, limit in limited
        if limit < workers
    ]


def _pinning_pools(config: Config) -> list[str]:
    """The routed pools that pin their clients with a cookie (all but hashed pools with `sticky: false`)."""
    routed = {route.pool for route in config.routes}
    return [name for name, pool in config.pools.items() if name in routed and pool.pins]


def reload_advice(running: Config, new: Config) -> list[str]:
    """What a reload from `running` to `new` will do to clients that its operator may not expect: one
    sentence per surprise.  Today, a pool that pins its clients renamed (the new name has its backends)."""
    said = []
    # Which added pools hold each backend id, address and discovery name: one pass over each side,
    # not every gone pool against every added one (a release-named pool of thousands renamed at
    # every reload would hold the event loop for seconds).
    holders: dict[str, set[str]] = {}
    for name, pool in new.pools.items():
        if name not in running.pools:
            for key, _ in _backend_keys(pool):
                holders.setdefault(key, set()).add(name)
    for old_name, old_pool in running.pools.items():
        if old_name in new.pools or not old_pool.pins:
            continue
        shared: dict[str, dict[str, None]] = {}  # added pool -> the backends it shares with this one, in order
        for key, shown in _backend_keys(old_pool):
            for new_name in holders.get(key, ()):
                shared.setdefault(new_name, {})[shown] = None
        for new_name, names in sorted(shared.items()):
            listed = ", ".join(list(names)[:MAX_NAMED])
            if len(names) > MAX_NAMED:
                listed += f" and {len(names) - MAX_NAMED} more"
            said.append(
                f"pool {old_name} is gone and pool {new_name} has its backends ({listed}): a pin "
                f"names its pool, so {old_name}'s clients get new cookies and some move; to keep them, "
                f"keep the name {old_name} (a route can send any path to it)"
            )
    if len(said) > MAX_NAMED:  # a line each for the first few, not thousands of lines at one reload
        said[MAX_NAMED:] = [f"and {len(said) - MAX_NAMED} more pools renamed so, whose clients' pins are dropped too"]
    return said


def _backend_keys(pool: PoolConfig) -> Iterator[tuple[str, str]]:
    """(what a renamed pool is matched by, the name to show) for each of `pool`'s backends (its id, its
    address) and its discovery."""
    for backend in pool.backends:
        yield f"id {backend.id}", backend.id
        yield f"address {backend.address}", backend.id
    if pool.discovery is not None:
        yield f"dns {pool.discovery.dns}", f"discovery {pool.discovery.dns}"
