"""lb.config.advice: settings that are valid but defeat their purpose are said, each naming its key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lb.config.advice import advice, reload_advice
from lb.config.load import parse_config
from lb.config.model import AffinityConfig, BackendConfig, Config, PoolConfig
from lb.devcerts import write_dev_certs

KEY = "k" * 43
TOKEN = "t" * 32


def config(
    tmp_path: Path, *, admin: str = f"{{token: {TOKEN}}}", affinity: str = "", tls: bool = False, extra: str = ""
) -> Config:
    listeners = '[{bind: "127.0.0.1:0"}'
    if tls:
        write_dev_certs(tmp_path / "certs", ["localhost"])
        listeners += ', {bind: "127.0.0.1:0", tls: {cert: certs/server.crt, key: certs/server.key}}'
    text = f"""
listeners: {listeners}]
admin: {admin}
affinity: {{secret_keys: [{KEY}]{affinity}}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
{extra}"""
    return parse_config(text, base_dir=tmp_path, environ={})


def test_a_plain_sensible_configuration_gets_no_advice(tmp_path: Path) -> None:
    assert advice(config(tmp_path)) == []


@pytest.mark.parametrize(("networks", "said"), [
    ('["0.0.0.0/0"]', "0.0.0.0/0"), ('["::/0", "10.0.0.0/8"]', "::/0"), ('["10.0.0.0/8", "::1"]', None),
])
def test_trusting_every_address_says_any_client_can_name_its_own(
    tmp_path: Path, networks: str, said: str | None
) -> None:
    """A valid setting that defeats its purpose (a reviewer's case: `lb validate` said only `ok:`)."""
    found = [s for s in advice(config(tmp_path, extra=f"trusted_proxies: {networks}\n")) if "trusted_proxies" in s]
    if said is None:
        assert found == []
    else:
        (sentence,) = found
        assert said in sentence and "X-Forwarded-For" in sentence


def test_no_admin_token_says_the_actions_answer_401(tmp_path: Path) -> None:
    (sentence,) = advice(config(tmp_path, admin="{bind: 127.0.0.1:9000}"))
    assert sentence.startswith("admin.token is not set") and "401" in sentence


@pytest.mark.parametrize(("keys", "advised"), [
    ('"k"', [1]), ('"test-key"', [8]), ('"' + "k" * 31 + '"', [31]), ('"' + "k" * 32 + '"', []),
    (f'{KEY}, "old-key"', [7]), ('"a-short-one", "another-short"', [11, 13]),
])
def test_a_short_secret_key_is_advice_not_refused(tmp_path: Path, keys: str, advised: list[int]) -> None:
    """A short key was refused at start, so a test rig's `secret_keys: [test-key]` did not run at all; it
    runs, and the operator is told why it should not (its length, never any of its characters)."""
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{keys}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    assert [int(s.split("a key of ")[1].split(" ")[0]) for s in said] == advised
    assert all("lb keygen" in s and "short-" not in s and "test-" not in s and "kkk" not in s for s in said)


@pytest.mark.parametrize(("token", "advised"), [("t", True), ("x" * 15, True), ("x" * 16, False), (TOKEN, False)])
def test_a_short_admin_token_is_advice(tmp_path: Path, token: str, advised: bool) -> None:
    """It drains and disables backends: one a script can guess is a way to take the fleet down."""
    said = advice(config(tmp_path, admin=f'{{token: "{token}"}}'))
    if not advised:
        assert said == []
        return
    (sentence,) = said
    assert sentence.startswith(f"admin.token is {len(token)} characters") and "16" in sentence


@pytest.mark.parametrize(("extra", "start"), [
    ("", None),
    ("pools: {p: {backends: [{id: a, address: '127.0.0.1:1'}], health_check: {interval: 1s, timeout: 500}}}",
     "pools.p.health_check.timeout is 500s, not shorter than its interval (1s)"),
    ("pools: {p: {backends: [{id: a, address: '127.0.0.1:1'}], health_check: {interval: 11s, timeout: 11s}}}",
     "pools.p.health_check.timeout is 11s"),
    ("pools: {p: {backends: [{id: a, address: '127.0.0.1:1'}], health_check: {interval: 1s, timeout: 10s}}}",
     None),
    ("pools: {p: {backends: [{id: a, address: '127.0.0.1:1'}], health_check: {interval: 1m, timeout: 30s}}}",
     None),
    ("timeouts: {backend_connect: 3000}", "timeouts.backend_connect is 3000s"),
    ("timeouts: {handshake: 10000}", "timeouts.handshake is 10000s"),
    ("timeouts: {handshake: 1m, backend_connect: 1m}", None),
])
def test_a_timeout_that_reads_as_a_unitless_number_of_milliseconds_is_advice(
    tmp_path: Path, extra: str, start: str | None
) -> None:
    """`timeout: 500` is 500 seconds (a bare number is seconds), which an HAProxy user meant as milliseconds:
    a frozen backend stayed up for minutes, and `lb validate` said only ok."""
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
{extra if extra.startswith("pools") else "pools: {p: {backends: [{id: a, address: '127.0.0.1:1'}]}}"}
{extra if not extra.startswith("pools") else ""}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    if start is None:
        assert said == []
    else:
        (sentence,) = said
        assert sentence.startswith(start) and "a bare number is seconds" in sentence, sentence


@pytest.mark.parametrize(("listener", "advised"), [
    ('{bind: "0.0.0.0:8080", proxy_protocol: true}', True),
    ('{bind: "[::]:8080", proxy_protocol: true}', True),
    ('{bind: "0.0.0.0:8080", proxy_protocol: true, proxy_protocol_from: [10.0.0.0/24]}', False),
    ('{bind: "127.0.0.1:8080", proxy_protocol: true}', False),
    ('{bind: "localhost:8080", proxy_protocol: true}', False),
    ('{bind: "LocalHost:8080", proxy_protocol: true}', False),
    ('{bind: "0.0.0.0:8080"}', False),
])
def test_a_proxy_listener_open_to_any_peer_is_advice(tmp_path: Path, listener: str, advised: bool) -> None:
    """Whoever reaches such a listener names its own client address in a PROXY header."""
    text = f"""
listeners: [{listener}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    assert [s.startswith("listeners[0].proxy_protocol without proxy_protocol_from") for s in said] == (
        [True] if advised else [])


@pytest.mark.parametrize(("max_age", "advised"), [("1h", False), ("9600h", False), ("9601h", True), ("20000h", True)])
def test_a_max_age_past_what_browsers_keep_is_advice(tmp_path: Path, max_age: str, advised: bool) -> None:
    """Browsers cap a cookie's Max-Age at 400 days: past it, a browser's pin ends sooner than configured."""
    said = advice(config(tmp_path, affinity=f", max_age: {max_age}"))
    assert [s.startswith("affinity.max_age is") and "400 days" in s for s in said] == ([True] if advised else [])
    # What to write instead, in the unit it is counted in now that durations take days (not 9600h).
    assert all(s.endswith("; 400d or less") for s in said if s.startswith("affinity.max_age is"))


@pytest.mark.parametrize(
    ("secure", "tls", "expected"),
    [
        ("auto", False, "on listeners[0] (no TLS)"),
        ("auto", True, "on listeners[0] (no TLS)"),
        ("always", False, None),
    ],
)
def test_same_site_none_without_secure_says_browsers_drop_the_cookie(
    tmp_path: Path, secure: str, tls: bool, expected: str | None
) -> None:
    said = advice(config(tmp_path, affinity=f", same_site: None, secure: {secure}", tls=tls))
    if expected is None:
        assert said == []
    else:
        (sentence,) = said
        assert expected in sentence and "drop" in sentence, sentence


@pytest.mark.parametrize(
    ("affinity", "tls", "expected"),
    [
        (", cookie: __Host-LB", False, "__Host- prefix: on listeners[0] (no TLS)"),
        (", cookie: __Secure-LB", True, "__Secure- prefix: on listeners[0] (no TLS)"),
        (", cookie: __Host-LB, secure: always", False, None),
        (", cookie: __Host-LB, mode: rewrite", False, None),  # the backend's own cookie: its attributes
        (", cookie: Host-LB", False, None),
    ],
)
def test_a_secure_prefixed_cookie_on_a_plain_listener_says_browsers_drop_it(
    tmp_path: Path, affinity: str, tls: bool, expected: str | None
) -> None:
    said = advice(config(tmp_path, affinity=affinity, tls=tls))
    if expected is None:
        assert said == []
    else:
        (sentence,) = said
        assert expected in sentence and "drop" in sentence, sentence


@pytest.mark.parametrize(("pool", "advised"), [
    ('balance: hash, hash_key: "header:X-User-Id"', "hash"),
    ("balance: source", "source"),
    ("balance: least_conn", None),
])
def test_slow_start_with_a_hash_says_it_is_ignored(tmp_path: Path, pool: str, advised: str | None) -> None:
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{{pool}, slow_start: 30s, backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    if advised is None:
        assert said == []
    else:
        (sentence,) = said
        assert sentence.startswith(f"pools.p.slow_start is ignored with balance: {advised}"), sentence


def test_same_site_none_on_tls_listeners_only_is_fine(tmp_path: Path) -> None:
    write_dev_certs(tmp_path / "certs", ["localhost"])
    text = f"""
listeners: [{{bind: "127.0.0.1:0", tls: {{cert: certs/server.crt, key: certs/server.key}}}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}], same_site: None}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    assert advice(parse_config(text, base_dir=tmp_path, environ={})) == []


def test_proxy_protocol_with_crc32c_in_python_says_what_it_costs(tmp_path: Path) -> None:
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}, {{bind: "127.0.0.1:0", proxy_protocol: true}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    proxied = parse_config(text, base_dir=tmp_path, environ={})
    assert advice(proxied) == []
    (sentence,) = advice(proxied, crc32c_in_c=False)
    assert sentence.startswith("listeners[1].proxy_protocol: google-crc32c runs its pure-Python fallback")
    assert advice(config(tmp_path), crc32c_in_c=False) == [], "no PROXY listener: the checksum is never computed"


def limited(
    tmp_path: Path, max_connections: int, workers: int = 1, discovery: str = "", bind: str = "127.0.0.1:8080"
) -> Config:
    text = f"""
listeners: [{{bind: "{bind}"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]{discovery}}}}}
limits: {{max_connections: {max_connections}}}
workers: {workers}
"""
    return parse_config(text, base_dir=tmp_path, environ={})


def test_max_connections_beyond_the_descriptor_limit_says_where_clients_start_failing(tmp_path: Path) -> None:
    """Each client connection holds two descriptors (its own, its backend's), plus the process's own
    (64) and one per backend for its health checks."""
    (sentence,) = advice(limited(tmp_path, 50000), descriptors=1024)
    assert sentence.startswith("limits.max_connections is 50000, but a process may open only 1024 descriptors")
    assert "past about 479 connections per process" in sentence and "ulimit -n" in sentence
    assert advice(limited(tmp_path, 50000), descriptors=1 << 20) == []
    assert advice(limited(tmp_path, 479), descriptors=1024) == []
    assert advice(limited(tmp_path, 480), descriptors=1024) != []
    assert advice(limited(tmp_path, 50000)) == [], "the limit unknown (lb validate): nothing said"


def proxied_limited(tmp_path: Path, max_connections: int) -> Config:
    text = f"""
listeners: [{{bind: "127.0.0.1:0", proxy_protocol: true}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
limits: {{max_connections: {max_connections}}}
"""
    return parse_config(text, base_dir=tmp_path, environ={})


def test_on_a_proxy_listener_where_clients_fail_does_not_count_an_overflow_that_never_comes(tmp_path: Path) -> None:
    """The 503s past the limit (a tenth of it, at least 64) need descriptors only past the limit: 300 descriptors
    and max_connections 50,000 said "past about 0 connections" where 117 fit (a hostile pass opened 141)."""
    (sentence,) = advice(proxied_limited(tmp_path, 50000), descriptors=300)
    assert "past about 117 connections per process" in sentence
    # The limit's own connections fit; the 64 answered past it do not all: said as that.
    (sentence,) = advice(proxied_limited(tmp_path, 100), descriptors=300)
    assert sentence.startswith("limits.max_connections is 100 and fits the 300 descriptors")
    assert "answer the 64 connections past it with a 503" in sentence and "only 35 of those fit" in sentence
    assert advice(proxied_limited(tmp_path, 100), descriptors=300 + 64 - 35) == []
    assert advice(proxied_limited(tmp_path, 100), descriptors=300 + 64 - 36) != []


def test_port_0_with_workers_is_advice(tmp_path: Path) -> None:
    """Each worker binds its listeners itself: port 0 gave each worker, and each restarted one, a port of its own."""
    any_port = "127.0.0.1:0"
    (sentence,) = [said for said in advice(limited(tmp_path, 50000, workers=2, bind=any_port)) if "port 0" in said]
    assert sentence.startswith("listeners[0].bind: port 0 (any free port) with workers: 2")
    assert not [said for said in advice(limited(tmp_path, 50000, workers=1, bind=any_port)) if "port 0" in said]
    assert not [said for said in advice(limited(tmp_path, 50000, workers=2)) if "port 0" in said]


def test_with_workers_each_process_needs_descriptors_for_its_share(tmp_path: Path) -> None:
    assert advice(limited(tmp_path, 1916, workers=4), descriptors=1024) == []  # 479 each
    (sentence,) = advice(limited(tmp_path, 1917, workers=4), descriptors=1024)
    assert "is 1917 (480 for each of 4 workers)" in sentence


def test_discovered_backends_count_at_their_maximum(tmp_path: Path) -> None:
    """Each discovered backend is health-checked like a static one: up to `max_backends` of them."""
    discovered = ', discovery: {dns: gw.example, type: a, port: 9000, max_backends: 100}'
    assert advice(limited(tmp_path, 429, discovery=discovered), descriptors=1024) == []  # (1024 - 65 - 100) // 2
    (sentence,) = advice(limited(tmp_path, 430, discovery=discovered), descriptors=1024)
    assert "past about 429 connections per process" in sentence


_DISCOVERED = "discovery: {{dns: gw.example, type: a, port: 9000, interval: {interval}}}"
_CHECKED = 'health_check: {{interval: {interval}}}, backends: [{{id: a, address: "127.0.0.1:9001"}}]'


@pytest.mark.parametrize(
    ("key", "pool", "interval", "advised"),
    [
        # `1ms` for `1m` validated silently and made about 270 DNS lookups a second.
        *[("discovery.interval", _DISCOVERED, interval, advised)
          for interval, advised in [("1ms", True), ("500ms", True), ("1s", False), ("1m", False)]],
        # `1ms` for `1m` validated silently and sent each backend some 700 probes a second.
        *[("health_check.interval", _CHECKED, interval, advised)
          for interval, advised in [("1ms", True), ("99ms", True), ("100ms", False), ("1m", False)]],
    ],
)
def test_an_interval_too_short_is_advice(tmp_path: Path, key: str, pool: str, interval: str, advised: bool) -> None:
    """A discovery interval under a second, or a health check interval under 100ms, is said (was `1m` meant?)."""
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{{pool.format(interval=interval)}}}}}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    if not advised:
        assert said == []
        return
    (sentence,) = said
    assert sentence.startswith(f"pools.p.{key} is {interval}") and "1m meant" in sentence


@pytest.mark.parametrize(
    ("kind", "port", "advised"), [("srv", "9000", True), ("srv", "null", False), ("a", "9000", False)]
)
def test_a_port_with_srv_discovery_is_advice(tmp_path: Path, kind: str, port: str, advised: bool) -> None:
    """SRV records carry their own ports: a `port` beside `type: srv` did nothing, without a word."""
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{discovery: {{dns: gw.example, type: {kind}, port: {port}}}}}}}
"""
    said = advice(parse_config(text, base_dir=tmp_path, environ={}))
    assert said == (["pools.p.discovery.port is ignored with type: srv: each record carries its own port "
                     "(the port is for type: a)"] if advised else [])


def _pools(tmp_path: Path, pools: dict[str, str]) -> Config:
    """A configuration whose pools are `pools` (name: the pool's YAML), each routed at /name."""
    routes = ", ".join(f"{{path_prefix: /{name}, pool: {name}}}" for name in pools)
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{token: {TOKEN}}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{routes}]
pools: {{{", ".join(f"{name}: {pool}" for name, pool in pools.items())}}}
"""
    return parse_config(text, base_dir=tmp_path, environ={})


def _backend(n: int) -> str:
    return f'{{backends: [{{id: b{n}, address: "127.0.0.1:{1000 + n}"}}]}}'


@pytest.mark.parametrize(("count", "advised"), [(8, False), (9, True)])
def test_more_pinning_pools_than_a_cookie_holds_is_advice(tmp_path: Path, count: int, advised: bool) -> None:
    """A cookie holds 8 pins, one per pool: a client of nine pools lost a pin on every visit, silently."""
    found = [s for s in advice(_pools(tmp_path, {f"p{n}": _backend(n) for n in range(count)})) if "pins" in s]
    assert bool(found) is advised, found
    if advised:
        assert "9 routed pools pin their clients" in found[0] and "holds 8 pins" in found[0]


def test_hashed_pools_without_a_cookie_do_not_count_as_pinning(tmp_path: Path) -> None:
    pools = {f"p{n}": _backend(n) for n in range(8)}
    pools["h"] = '{balance: source, sticky: false, backends: [{id: h, address: "127.0.0.1:2000"}]}'
    assert [s for s in advice(_pools(tmp_path, pools)) if "pins" in s] == []


@pytest.mark.parametrize(
    ("new_pool", "advised"),
    [
        ('{backends: [{id: b1, address: "127.0.0.1:1001"}]}', True),  # the same backends under a new name
        ('{backends: [{id: other, address: "127.0.0.1:1001"}]}', True),  # same address, id changed too
        ('{backends: [{id: b1, address: "127.0.0.1:1002"}]}', True),  # same id, moved
        ('{backends: [{id: fresh, address: "127.0.0.1:3000"}]}', False),  # a different pool
    ],
)
def test_a_pool_renamed_by_a_reload_says_its_pins_are_dropped(tmp_path: Path, new_pool: str, advised: bool) -> None:
    """A pin names its pool: renamed, every client of the pool got a new cookie and some moved, and
    neither the reload nor anything else said so."""
    running = _pools(tmp_path, {"games": _backend(1), "chat": _backend(5)})
    renamed = _pools(tmp_path, {"arena": new_pool, "chat": _backend(5)})
    said = reload_advice(running, renamed)
    if not advised:
        assert said == []
        return
    (sentence,) = said
    assert sentence.startswith("pool games is gone and pool arena has its backends")
    assert "keep the name games" in sentence
    assert reload_advice(running, running) == []


def test_renaming_a_pool_that_pins_nothing_is_not_said_to_drop_pins(tmp_path: Path) -> None:
    """A hashed pool without `sticky` issues no cookie, so its rename moves no pin."""
    hashed = '{balance: source, sticky: false, backends: [{id: b1, address: "127.0.0.1:1001"}]}'
    assert reload_advice(_pools(tmp_path, {"games": hashed}), _pools(tmp_path, {"arena": hashed})) == []


@pytest.mark.parametrize(("max_connections", "workers", "zero_shares"), [(1, 2, 1), (3, 4, 1), (2, 2, 0), (1, 1, 0)])
def test_a_connection_limit_below_the_workers_says_some_refuse_everyone(
    tmp_path: Path, max_connections: int, workers: int, zero_shares: int
) -> None:
    """Each worker enforces its share: with max_connections 1 and 2 workers, one of them refused every
    client it got while the instance held none, and nothing said so."""
    found = [s for s in advice(limited(tmp_path, max_connections, workers=workers)) if "share of 0" in s]
    if not zero_shares:
        assert found == []
        return
    (sentence,) = found
    assert sentence.startswith(f"limits.max_connections is {max_connections} with {workers} workers: ")
    assert f"so {zero_shares} of them have a share of 0" in sentence


def test_a_backend_limit_below_the_workers_is_advice_too(tmp_path: Path) -> None:
    text = limited(tmp_path, 100, workers=4)
    capped = dataclasses.replace(
        text, pools={"p": dataclasses.replace(text.pools["p"], backends=(
            dataclasses.replace(text.pools["p"].backends[0], max_connections=2),
        ))}
    )
    (sentence,) = [s for s in advice(capped) if "share of 0" in s]
    assert sentence.startswith("pools.p.backends[0].max_connections is 2 with 4 workers: ")
    assert "so 2 of them have a share of 0" in sentence


def test_a_burst_without_a_rate_limits_nothing_and_says_so(tmp_path: Path) -> None:
    found = [s for s in advice(config(tmp_path, extra="limits: {handshake_burst_per_ip: 5}\n")) if "burst" in s]
    assert found == [
        "limits.handshake_burst_per_ip is set but handshake_rate_per_ip is 0 (off): nothing is limited; "
        "set a rate per second too"
    ]
    with_rate = config(tmp_path, extra="limits: {handshake_burst_per_ip: 5, handshake_rate_per_ip: 2}\n")
    assert [s for s in advice(with_rate) if "burst" in s] == []


def test_a_rename_says_a_bounded_amount_however_many_pools_and_backends() -> None:
    """A sentence names 8 backends and the rest by count; 8 renamed pools are said one by one, the rest in
    one sentence.  Each gone pool is matched through an index, not against every added pool."""
    def pools(prefix: str, count: int, backends: int) -> dict[str, PoolConfig]:
        return {
            f"{prefix}{n}": PoolConfig(f"{prefix}{n}", tuple(
                BackendConfig(f"b{n}-{i}", "127.0.0.1", 1000 + n * backends + i) for i in range(backends)
            ))
            for n in range(count)
        }

    def config(pooled: dict[str, PoolConfig]) -> Config:
        return Config(listeners=(), affinity=AffinityConfig(secret_keys=(KEY,)), routes=(), pools=pooled)

    (one,) = reload_advice(config(pools("old", 1, 20)), config(pools("new", 1, 20)))
    assert "(b0-0, b0-1, b0-2, b0-3, b0-4, b0-5, b0-6, b0-7 and 12 more)" in one
    said = reload_advice(config(pools("old", 500, 3)), config(pools("new", 500, 3)))
    assert len(said) == 9 and said[-1] == "and 492 more pools renamed so, whose clients' pins are dropped too"


@pytest.mark.parametrize(("limit", "advised"), [(1, True), (100, True), (1023, True), (1024, False), (16384, False)])
def test_a_head_limit_under_a_browsers_head_is_advice(tmp_path: Path, limit: int, advised: bool) -> None:
    """Under 1024 bytes was refused at start; it runs (a test rig's 431), and says browsers will get 431."""
    said = advice(config(tmp_path, extra=f"limits: {{max_header_bytes: {limit}}}\n"))
    if not advised:
        assert said == []
        return
    (sentence,) = said
    assert sentence.startswith(f"limits.max_header_bytes is {limit}:") and "431" in sentence
