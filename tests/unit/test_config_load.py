"""Configuration loading: YAML → ${ENV} → one-pass validation → Config or every Problem."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config import document
from lb.config.load import load_config, parse_config
from lb.config.model import (
    AdminConfig,
    AffinityMode,
    BalanceMethod,
    Config,
    EventLoop,
    HealthCheckConfig,
    HealthCheckExpect,
    HealthCheckType,
    LimitsConfig,
    LogFormat,
    LoggingConfig,
    RuntimeConfig,
    SameSite,
    SecureMode,
    TimeoutsConfig,
    implied_health_check,
)
from lb.devcerts import write_dev_certs
from lb.errors import ConfigError

COOKIE_KEY = "k" * 43
ENV = {"LB_COOKIE_KEY": COOKIE_KEY, "LB_ADMIN_TOKEN": "admin-secret"}

GOOD_YAML = """
listeners:
  - bind: 127.0.0.1:8080
  - bind: 127.0.0.1:8443
    tls: {cert: certs/server.crt, key: certs/server.key}
admin:
  bind: 127.0.0.1:9000
  token: ${LB_ADMIN_TOKEN}
affinity:
  mode: insert
  cookie: LB_AFFINITY
  max_age: 1h
  secret_keys: ["${LB_COOKIE_KEY}"]
  same_site: Lax
  http_only: true
  secure: auto
routes:
  - path_prefix: /
    pool: gateways
pools:
  gateways:
    balance: least_conn
    health_check: {type: http, path: /health, interval: 1s, timeout: 500ms, rise: 2, fall: 2}
    backends:
      - {id: gw-1, address: 127.0.0.1:9001, weight: 1}
      - {id: gw-2, address: 127.0.0.1:9002, weight: 1}
timeouts:
  handshake: 10s
  backend_connect: 3s
  shutdown_grace: 10s
limits:
  max_header_bytes: 16384
"""

MINIMAL_YAML = f"""
listeners: [{{bind: "127.0.0.1:0"}}]
affinity: {{secret_keys: [{COOKIE_KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding certs/server.crt and certs/server.key, as the config expects."""
    root = tmp_path_factory.mktemp("config")
    write_dev_certs(root / "certs", ["localhost", "127.0.0.1"])
    return root


def good_tree() -> dict[str, Any]:
    tree: dict[str, Any] = yaml.safe_load(GOOD_YAML)
    return tree


def parse(tree: object, base_dir: Path, environ: dict[str, str] | None = None) -> Config:
    return parse_config(yaml.safe_dump(tree), base_dir=base_dir, environ=ENV if environ is None else environ)


def problems_of(tree: object, base_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Path → message for every problem (an error if the config is valid)."""
    with pytest.raises(ConfigError) as info:
        parse(tree, base_dir, environ)
    return {p.path: p.message for p in info.value.problems}


_STEP_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _steps(path: str) -> list[str | int]:
    return [int(index) if index else key for key, index in _STEP_RE.findall(path)]


def set_at(tree: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of `tree` with the value at a problem-style path replaced."""
    tree = copy.deepcopy(tree)
    *parents, last = _steps(path)
    node: Any = tree
    for step in parents:
        node = node[step]
    node[last] = value
    return tree


def delete_at(tree: dict[str, Any], path: str) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    *parents, last = _steps(path)
    node: Any = tree
    for step in parents:
        node = node[step]
    del node[last]
    return tree


# --------------------------------------------------------------------------- a good config


def test_good_config_builds_typed_values(base_dir: Path) -> None:
    """The SPEC example loads into frozen, typed values: seconds, tuples, enums, absolute paths."""
    config = parse_config(GOOD_YAML, base_dir=base_dir, environ=ENV)

    plain, tls = config.listeners
    assert (plain.host, plain.port, plain.tls) == ("127.0.0.1", 8080, None)
    assert tls.port == 8443 and tls.tls is not None
    assert tls.tls.cert == str(base_dir / "certs" / "server.crt")
    assert tls.tls.key == str(base_dir / "certs" / "server.key")
    assert config.admin == AdminConfig(host="127.0.0.1", port=9000, token="admin-secret", bind_given=True)
    affinity = config.affinity
    assert affinity.mode is AffinityMode.INSERT and affinity.cookie == "LB_AFFINITY"
    assert affinity.max_age == 3600.0 and affinity.secret_keys == (COOKIE_KEY,)
    assert affinity.same_site is SameSite.LAX and affinity.http_only is True
    assert affinity.secure is SecureMode.AUTO
    assert [(r.path_prefix, r.pool) for r in config.routes] == [("/", "gateways")]
    pool = config.pools["gateways"]
    assert pool.name == "gateways" and pool.balance is BalanceMethod.LEAST_CONN
    assert pool.health_check == HealthCheckConfig(HealthCheckType.HTTP, "/health", 1.0, 0.5, 2, 2)
    assert [(b.id, b.host, b.port, b.weight) for b in pool.backends] == [
        ("gw-1", "127.0.0.1", 9001, 1),
        ("gw-2", "127.0.0.1", 9002, 1),
    ]
    assert config.timeouts == TimeoutsConfig(10.0, 3.0, 10.0)
    assert config.limits == LimitsConfig(16384)


@pytest.mark.parametrize(
    ("limits", "burst"),
    [({}, 1), ({"handshake_rate_per_ip": 5}, 5), ({"handshake_rate_per_ip": 0.2}, 1),
     ({"handshake_rate_per_ip": 2.5}, 3), ({"handshake_rate_per_ip": 5, "handshake_burst_per_ip": 40}, 40)],
)
def test_the_per_ip_burst_is_one_second_of_the_rate_unless_set(limits: dict[str, float], burst: int) -> None:
    """A rate set alone admits one second's worth at once (at least 1), not a fixed 100."""
    assert LimitsConfig(**limits).burst_per_ip == burst  # type: ignore[arg-type]


def test_absent_optional_keys_take_the_dataclass_defaults(tmp_path: Path) -> None:
    """Only listeners, affinity.secret_keys, routes and pools are required; the rest defaults."""
    config = parse_config(MINIMAL_YAML, base_dir=tmp_path, environ={})
    assert config.admin == AdminConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.limits == LimitsConfig()
    assert config.logging == LoggingConfig()
    assert config.runtime == RuntimeConfig()
    assert config.pools["p"].health_check == implied_health_check()
    assert config.pools["p"].balance is BalanceMethod.LEAST_CONN
    assert config.pools["p"].backends[0].weight == 1
    assert config.affinity.cookie == "LB_AFFINITY" and config.affinity.max_age == 3600.0


def test_choices_are_case_insensitive(base_dir: Path) -> None:
    """same_site, logging level and other choices accept any case and store the canonical value."""
    tree = set_at(good_tree(), "affinity.same_site", "strict")
    tree["logging"] = {"level": "debug", "format": "JSON"}
    tree["runtime"] = {"event_loop": "AsyncIO"}
    config = parse(tree, base_dir)
    assert config.affinity.same_site is SameSite.STRICT
    assert config.logging == LoggingConfig(level="DEBUG", format=LogFormat.JSON)
    assert config.runtime.event_loop is EventLoop.ASYNCIO


@pytest.mark.parametrize(("value", "mode"), [(True, SecureMode.ALWAYS), (False, SecureMode.NEVER)])
def test_secure_accepts_yaml_booleans(base_dir: Path, value: bool, mode: SecureMode) -> None:
    """secure: true means always and secure: false means never."""
    assert parse(set_at(good_tree(), "affinity.secure", value), base_dir).affinity.secure is mode


def test_ipv6_bind_in_brackets(base_dir: Path) -> None:
    """An IPv6 listener is written [::1]:8080 and stored without brackets."""
    config = parse(set_at(good_tree(), "listeners[0].bind", "[::1]:8080"), base_dir)
    assert (config.listeners[0].host, config.listeners[0].port) == ("::1", 8080)
    assert config.listeners[0].bind == "[::1]:8080"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "[::1]"])
def test_loopback_admin_needs_no_token(base_dir: Path, host: str) -> None:
    """Admin on a loopback address may run without a token."""
    tree = good_tree()
    tree["admin"] = {"bind": f"{host}:9000"}
    assert parse(tree, base_dir).admin.token is None


def test_non_loopback_admin_with_token_is_fine(base_dir: Path) -> None:
    """A non-loopback admin address is accepted when a token protects it."""
    tree = set_at(good_tree(), "admin.bind", "0.0.0.0:9000")
    assert parse(tree, base_dir).admin.host == "0.0.0.0"


def test_port_zero_listeners_may_repeat(base_dir: Path) -> None:
    """Port 0 asks the OS for a free port, so two listeners may both say :0."""
    tree = set_at(good_tree(), "listeners[0].bind", "127.0.0.1:0")
    tree = set_at(tree, "listeners[1].bind", "127.0.0.1:0")
    assert [lis.port for lis in parse(tree, base_dir).listeners] == [0, 0]


def test_example_config_file_validates(tmp_path: Path) -> None:
    """config.example.yaml at the repo root is valid once its env vars are set and certs exist."""
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    (tmp_path / "config.yaml").write_text(example.read_text(encoding="utf-8"), encoding="utf-8")
    write_dev_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    config = load_config(tmp_path / "config.yaml", environ=ENV)
    assert [b.address for b in config.pools["gateways"].backends] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "127.0.0.1:9003",
    ]


# --------------------------------------------------------------------------- one bad value, one path

BAD_VALUES: list[tuple[str, object, str]] = [
    ("listeners", [], "expected at least one listener"),
    ("listeners", "127.0.0.1:8080", "expected a list of listeners, got str"),
    ("listeners[0]", "127.0.0.1:8080", "expected a mapping, got str"),
    ("listeners[0].bind", "127.0.0.1", "expected host:port, got '127.0.0.1'"),
    ("listeners[0].bind", 8080, "expected host:port, got int 8080"),
    ("listeners[0].bind", "::1:80", "expected host:port (write IPv6 addresses as [::1]:8080), got '::1:80'"),
    ("listeners[0].bind", "127.0.0.1:70000", "expected a port from 0 to 65535, got 70000"),
    ("listeners[0].bind", "300.1.1.1:80", "expected host:port, got '300.1.1.1:80'"),
    ("listeners[0].bind", "bad host:80", "expected host:port, got 'bad host:80'"),
    ("listeners[0].bind", None, "expected a value, got null"),
    ("listeners[1].tls", "on", "expected a mapping, got str"),
    ("listeners[1].tls.cert", "certs/missing.crt", "file not found: "),
    ("listeners[1].tls.key", 5, "expected a string, got int 5"),
    ("admin", ["127.0.0.1:9000"], "expected a mapping, got list"),
    ("admin.bind", "localhost", "expected host:port, got 'localhost'"),
    ("admin.token", 12345, "expected a string, got int"),
    ("admin.token", "", "expected a non-empty string"),
    ("affinity", "insert", "expected a mapping, got str"),
    ("affinity.mode", "sticky", "expected one of insert, rewrite, got 'sticky'"),
    ("affinity.cookie", "LB AFFINITY", "expected a cookie name"),
    ("affinity.cookie", "a;b", "expected a cookie name"),
    ("affinity.max_age", "0s", "expected a duration greater than 0, got '0s'"),
    ("affinity.max_age", "soon", "expected a duration like 500ms, 2s, 5m or 1h, got 'soon'"),
    ("affinity.max_age", "-1h", "a duration cannot be negative, got '-1h'"),
    ("affinity.max_age", [1], "expected a duration like 500ms, 2s, 5m or 1h, got list"),
    ("affinity.secret_keys", [], "expected at least one secret key"),
    ("affinity.secret_keys", "x" * 40, "expected a list of secret keys, got str"),
    (
        "affinity.secret_keys[0]",
        "",
        "expected a secret key, got an empty string; generate one with `lb keygen`",
    ),
    ("affinity.secret_keys[0]", 12345, "expected a string, got int"),
    ("affinity.same_site", "loose", "expected one of Strict, Lax, None, got 'loose'"),
    ("affinity.token_version", 4, "expected an integer from 2 to 3, got 4"),
    ("affinity.token_version", 1, "expected an integer from 2 to 3, got 1"),
    ("affinity.http_only", "sure", "expected true or false, got str 'sure'"),
    ("affinity.secure", "sometimes", "expected one of auto, always (or true), never (or false), got 'sometimes'"),
    ("routes", [], "expected at least one route"),
    ("routes", {"/": "gateways"}, "expected a list of routes, got mapping"),
    ("routes[0].path_prefix", "ws", "expected a path starting with '/', got 'ws'"),
    # Matched against a request's path as sent: a route none could reach is a mistake (a newline, `é`, a query).
    ("routes[0].path_prefix", "/\n2026 ERROR x", "expected a path of visible ASCII without '?' or '#'"),
    ("routes[0].path_prefix", "/caf\u00e9", "percent-encode spaces and anything else), got '/caf\u00e9'"),
    ("routes[0].path_prefix", "/ws?v=2", "without '?' or '#'"),
    ("routes[0].path_prefix", "/my game", "without '?' or '#'"),
    ("routes[0].pool", "nope", "unknown pool 'nope'; defined pools: gateways"),
    ("pools", {}, "expected at least one pool"),
    ("pools", ["gateways"], "expected a mapping of pool names to pools, got list"),
    ("pools.gateways", None, "expected a mapping, got null"),
    ("pools.gateways.balance", "random", "expected one of round_robin, least_conn, source, hash, got 'random'"),
    ("pools.gateways.health_check", "yes", "expected a mapping, got str"),
    ("pools.gateways.health_check.type", "udp", "expected one of http, tcp, got 'udp'"),
    ("pools.gateways.health_check.path", "health", "expected a path starting with '/', got 'health'"),
    ("pools.gateways.health_check.path", "/he alth", "percent-encode spaces and anything else), got '/he alth'"),
    ("pools.gateways.health_check.path", "/健康", "expected a request path of visible ASCII"),
    ("pools.gateways.health_check.path", "/h\r\nX-Injected: 1", "expected a request path of visible ASCII"),
    ("pools.gateways.health_check.path", "/health#top", "without '#'"),
    ("pools.gateways.health_check.interval", "0ms", "expected a duration greater than 0, got '0ms'"),
    ("pools.gateways.health_check.timeout", "fast", "got 'fast'"),
    ("pools.gateways.health_check.rise", 0, "expected an integer from 1 to 1000, got 0"),
    ("pools.gateways.health_check.fall", True, "expected an integer from 1 to 1000, got bool true"),
    ("pools.gateways.health_check.fall", 1.5, "expected an integer from 1 to 1000, got float 1.5"),
    ("pools.gateways.health_check.expect", "2xx", "expected one of success, any, got '2xx'"),
    ("pools.gateways.backends", [], "expected at least one backend"),
    ("pools.gateways.backends", None, "expected a value, got null"),
    ("pools.gateways.backends[1]", "127.0.0.1:9002", "expected a mapping, got str"),
    ("pools.gateways.backends[1].address", "127.0.0.1", "expected host:port, got '127.0.0.1'"),
    ("pools.gateways.backends[1].address", "127.0.0.1:0", "expected a port from 1 to 65535, got 0"),
    ("pools.gateways.backends[1].id", "", "expected a non-empty string"),
    ("pools.gateways.backends[1].id", "gw 2", "expected letters, digits and . _ : - only, got 'gw 2'"),
    ("pools.gateways.backends[1].id", "..", "expected an id other than '..', which a URL path reads as a directory"),
    ("pools.gateways.backends[1].id", ".", "expected an id other than '.', which a URL path reads as a directory"),
    ("pools.gateways.backends[1].weight", 0, "expected an integer from 1 to 256, got 0"),
    ("pools.gateways.backends[1].weight", 257, "expected an integer from 1 to 256, got 257"),
    ("pools.gateways.backends[1].weight", "heavy", "expected an integer from 1 to 256, got str 'heavy'"),
    ("limits.max_header_bytes", "lots", "expected an integer from 1 to 1048576, got str 'lots'"),
    ("timeouts", 10, "expected a mapping, got int 10"),
    ("timeouts.handshake", "0s", "expected a duration greater than 0, got '0s'"),
    ("timeouts.backend_connect", "3 parsecs", "got '3 parsecs'"),
    ("timeouts.shutdown_grace", "-1s", "a duration cannot be negative, got '-1s'"),
    ("limits.max_header_bytes", 0, "expected an integer from 1 to 1048576, got 0"),
    ("logging", {"level": "LOUD"}, "expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    ("logging", {"format": "xml"}, "expected one of plain, json, got 'xml'"),
    ("runtime", {"event_loop": "trio"}, "expected one of auto, asyncio, uvloop, got 'trio'"),
]


def _problem_path(path: str, value: object) -> str:
    # logging/runtime entries set a whole section; the problem is at its one key.
    if isinstance(value, dict) and path in ("logging", "runtime"):
        return f"{path}.{next(iter(value))}"
    return path


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES]
)
def test_bad_value_is_reported_at_its_path(base_dir: Path, path: str, value: object, message: str) -> None:
    """Each bad value gives exactly one problem, at its own key path, saying what was expected."""
    problems = problems_of(set_at(good_tree(), path, value), base_dir)
    assert list(problems) == [_problem_path(path, value)]
    assert message in problems[_problem_path(path, value)]


@pytest.mark.parametrize(
    ("health_check", "expected"),
    [
        (None, HealthCheckConfig(expect=HealthCheckExpect.ANY)),
        ({"type": "http"}, HealthCheckConfig(expect=HealthCheckExpect.SUCCESS)),
        ({"interval": "5s"}, HealthCheckConfig(interval=5.0, expect=HealthCheckExpect.SUCCESS)),
        ({"expect": "any", "interval": "5s"}, HealthCheckConfig(interval=5.0, expect=HealthCheckExpect.ANY)),
        ({"expect": "success"}, HealthCheckConfig(expect=HealthCheckExpect.SUCCESS)),
        ({"type": "tcp"}, HealthCheckConfig(type=HealthCheckType.TCP)),
    ],
)
def test_a_pool_without_health_check_is_checked_for_any_answer_a_written_one_wants_success(
    base_dir: Path, health_check: dict[str, object] | None, expected: HealthCheckConfig
) -> None:
    """No `health_check`: GET /health, any HTTP answer passes (HAProxy, Envoy, Traefik check nothing unasked);
    a written one, even `{type: http}` alone, wants a 2xx/3xx unless it says `expect: any`."""
    tree = good_tree()
    if health_check is None:
        del tree["pools"]["gateways"]["health_check"]
    else:
        tree["pools"]["gateways"]["health_check"] = health_check
    assert parse(tree, base_dir).pools["gateways"].health_check == expected


def test_expect_with_a_tcp_check_is_a_problem_at_its_path(base_dir: Path) -> None:
    """`expect` judges an HTTP answer: beside `type: tcp` it would be silently ignored, so it is refused."""
    tree = set_at(good_tree(), "pools.gateways.health_check", {"type": "tcp", "expect": "any"})
    assert problems_of(tree, base_dir) == {
        "pools.gateways.health_check.expect": "only used with type: http (a tcp check passes on a connect)"
    }


def test_zero_shutdown_grace_is_allowed(base_dir: Path) -> None:
    """shutdown_grace may be 0 (close tunnels at once); other timeouts may not."""
    assert parse(set_at(good_tree(), "timeouts.shutdown_grace", "0s"), base_dir).timeouts.shutdown_grace == 0


@pytest.mark.parametrize("form", [":{port}", "*:{port}", " :{port} "])
def test_port_only_bind_is_every_ipv4_address(base_dir: Path, form: str) -> None:
    """HAProxy's `bind :8080` / `bind *:8080` and Traefik's `address: ":8080"` bind 0.0.0.0, as there."""
    tree = set_at(good_tree(), "listeners[0].bind", form.format(port=18080))
    tree = set_at(tree, "admin.bind", form.format(port=19000))
    config = parse(tree, base_dir)
    assert (config.listeners[0].host, config.listeners[0].port) == ("0.0.0.0", 18080)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", 19000)


@pytest.mark.parametrize(("value", "message"), [
    (":", "expected host:port, got ':'"),
    ("*:http", "expected host:port, got '*:http'"),
    ("*:70000", "expected a port from 0 to 65535, got 70000"),
    ("::8080", "write IPv6 addresses as [::1]:8080"),
])
def test_port_only_bind_still_checks_the_port(base_dir: Path, value: str, message: str) -> None:
    problems = problems_of(set_at(good_tree(), "listeners[0].bind", value), base_dir)
    assert list(problems) == ["listeners[0].bind"]
    assert message in problems["listeners[0].bind"]


@pytest.mark.parametrize(
    "path",
    [
        "listeners[0].bind",
        "affinity",
        "affinity.secret_keys",
        "routes[0].pool",
        "pools.gateways.backends",
        "pools.gateways.backends[0].id",
    ],
)
def test_missing_required_key(base_dir: Path, path: str) -> None:
    """A required key that is absent is named by its full path (a pool's backends: and what may stand for them)."""
    expected = "missing required key"
    if path == "pools.gateways.backends":
        expected += " (a pool needs backends, a discovery, or both)"
    assert problems_of(delete_at(good_tree(), path), base_dir) == {path: expected}


def test_secret_values_never_appear_in_messages(base_dir: Path) -> None:
    """A wrong-typed token or a short key is reported without echoing it."""
    tree = set_at(good_tree(), "admin.token", 987654321)
    tree = set_at(tree, "affinity.secret_keys", ["short-but-secret"])
    tree = set_at(tree, "limits.max_header_bytes", "${MISPLACED}")  # a string written in the file is shown
    problems = problems_of(tree, base_dir, {**ENV, "MISPLACED": "a-secret-in-the-wrong-place"})
    text = "\n".join(f"{path}: {message}" for path, message in problems.items())
    assert "987654321" not in text and "short-but-secret" not in text and "wrong-place" not in text
    assert problems["limits.max_header_bytes"].endswith("got str"), problems


# --------------------------------------------------------------------------- every problem in one pass


def test_several_problems_are_reported_together(base_dir: Path) -> None:
    """One validation pass reports every problem, in the SPEC's key order."""
    tree = set_at(good_tree(), "listeners[0].bind", "nowhere")
    tree = set_at(tree, "affinity.max_age", "forever")
    tree = set_at(tree, "routes[0].path_prefix", "ws")
    tree = set_at(tree, "pools.gateways.backends[1].address", "127.0.0.1")
    tree = set_at(tree, "limits.max_header_bytes", 0)
    assert list(problems_of(tree, base_dir)) == [
        "listeners[0].bind",
        "affinity.max_age",
        "routes[0].path_prefix",
        "pools.gateways.backends[1].address",
        "limits.max_header_bytes",
    ]


def test_config_error_str_is_one_line_per_problem(base_dir: Path) -> None:
    """str(ConfigError) prints `path: message` lines, as `lb validate` shows them."""
    tree = set_at(good_tree(), "pools.gateways.backends[1].address", "127.0.0.1")
    tree = set_at(tree, "affinity.mode", "sticky")
    with pytest.raises(ConfigError) as info:
        parse(tree, base_dir)
    assert str(info.value).splitlines() == [
        "affinity.mode: expected one of insert, rewrite, got 'sticky'",
        "pools.gateways.backends[1].address: expected host:port, got '127.0.0.1'",
    ]


def test_unknown_keys_are_problems_at_every_level(base_dir: Path) -> None:
    """Misspelled keys are reported wherever they are, with a suggestion when one is close."""
    tree = good_tree()
    tree["listner"] = []
    tree["pools"]["gateways"]["health_check"]["intervall"] = "2s"
    tree["pools"]["gateways"]["backends"][0]["wieght"] = 2
    tree["listeners"][1]["tls"]["ca"] = "x"
    tree["affinity"]["secret_key"] = "y"
    assert problems_of(tree, base_dir) == {
        "listner": "unknown key 'listner' (did you mean 'listeners'?)",
        "pools.gateways.health_check.intervall": "unknown key 'intervall' (did you mean 'interval'?)",
        "pools.gateways.backends[0].wieght": "unknown key 'wieght' (did you mean 'weight'?)",
        "listeners[1].tls.ca": "unknown key 'ca'",
        "affinity.secret_key": "unknown key 'secret_key' (did you mean 'secret_keys'?)",
    }


def test_duplicates_are_problems(base_dir: Path) -> None:
    """Backend ids and addresses are unique in a pool, route prefixes and listener binds overall."""
    tree = set_at(good_tree(), "pools.gateways.backends[1]", {"id": "gw-1", "address": "127.0.0.1:9001"})
    tree["routes"].append({"path_prefix": "/", "pool": "gateways"})
    tree["listeners"].append({"bind": "127.0.0.1:8080"})
    assert problems_of(tree, base_dir) == {
        "listeners[2].bind": "duplicate bind 127.0.0.1:8080 (first at listeners[0])",
        "routes[1].path_prefix": "duplicate path_prefix '/' (first at routes[0])",
        "pools.gateways.backends[1].id": "duplicate backend id 'gw-1' (first at pools.gateways.backends[0])",
        "pools.gateways.backends[1].address": (
            "duplicate backend address 127.0.0.1:9001 (first at pools.gateways.backends[0])"
        ),
    }


def test_a_wrong_field_does_not_hide_the_entrys_other_problems(base_dir: Path) -> None:
    """Every problem at once: a route with a bad prefix still names its unknown pool, a backend with a bad
    address still names its repeated id."""
    tree = set_at(good_tree(), "routes[0]", {"path_prefix": "w", "pool": "missing"})
    tree = set_at(tree, "pools.gateways.backends[1]", {"id": "gw-1", "address": "127.0.0.1"})
    problems = problems_of(tree, base_dir)
    assert set(problems) == {
        "routes[0].path_prefix", "routes[0].pool", "pools.gateways.backends[1].address", "pools.gateways.backends[1].id"
    }, problems
    assert problems["routes[0].pool"].startswith("unknown pool 'missing'")
    assert problems["pools.gateways.backends[1].id"].startswith("duplicate backend id 'gw-1'")


def test_a_wrong_discovery_does_not_hide_the_pools_other_problems(base_dir: Path) -> None:
    """type a without a port beside a bad nameserver; hash_key on a source pool beside a bad discovery type."""
    tree = good_tree()
    pool = tree["pools"]["gateways"]
    pool["discovery"] = {"dns": "gw.example", "type": "a", "nameservers": ["not-an-ip:53"]}
    problems = problems_of(tree, base_dir)
    assert set(problems) == {"pools.gateways.discovery.port", "pools.gateways.discovery.nameservers[0]"}, problems
    pool["discovery"] = {"dns": "gw.example", "type": "txt"}
    pool.update(balance="source", hash_key="header:X-User")
    problems = problems_of(tree, base_dir)
    assert set(problems) == {"pools.gateways.discovery.type", "pools.gateways.hash_key"}, problems


@pytest.mark.parametrize(("given", "read"), [
    ("localhost:5353", ("127.0.0.1", 5353)), ("LOCALHOST.:53", ("127.0.0.1", 53)),
    ("127.0.0.2:53", ("127.0.0.2", 53)), ("[::1]:5353", ("::1", 5353)),
])
def test_a_nameserver_is_an_address_or_localhost(base_dir: Path, given: str, read: tuple[str, int]) -> None:
    """`localhost` is the loopback address (RFC 6761 §6.3); any other name is refused: dnspython asks
    nameservers by address, and a name would need a resolver first."""
    tree = good_tree()
    tree["pools"]["gateways"]["discovery"] = {"dns": "gw.example", "type": "srv", "nameservers": [given]}
    discovery = parse(tree, base_dir).pools["gateways"].discovery
    assert discovery is not None and discovery.nameservers == (read,)
    tree["pools"]["gateways"]["discovery"]["nameservers"] = ["dns.example:53"]
    problems = problems_of(tree, base_dir)
    assert problems == {
        "pools.gateways.discovery.nameservers[0]": "expected an IP address (or localhost), got 'dns.example'"}


@pytest.mark.parametrize("admin_bind", ["127.0.0.1:8080", "0.0.0.0:8080", "LOCALHOST:8443", "[::1]:8444"])
def test_admin_on_a_listeners_address_is_a_problem(base_dir: Path, admin_bind: str) -> None:
    """It would fail to bind at start; `lb validate` says so first."""
    tree = good_tree()
    tree["listeners"][1]["bind"] = "localhost:8443"
    tree["listeners"].append({"bind": "[::]:8444"})
    tree["admin"] = {"bind": admin_bind, "token": "t"}
    problems = problems_of(tree, base_dir)
    assert list(problems) == ["admin.bind"]
    assert "overlaps listeners[" in problems["admin.bind"]


@pytest.mark.parametrize(("listener", "admin_bind"), [("[::]:8444", "127.0.0.1:8444"), ("[::1]:8444", "0.0.0.0:8444")])
def test_admin_beside_a_listener_of_the_other_family_is_fine(base_dir: Path, listener: str, admin_bind: str) -> None:
    """Every socket is IPV6_V6ONLY: `::` and an IPv4 address on one port both bind."""
    tree = good_tree()
    tree["listeners"].append({"bind": listener})
    tree["admin"] = {"bind": admin_bind, "token": "t"}
    parse(tree, base_dir)


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1:8090", "0.0.0.0:8090"), ("0.0.0.0:8090", "127.0.0.2:8090"), ("[::]:8090", "[::1]:8090"),
])
def test_a_listener_beside_its_familys_wildcard_on_one_port_is_a_problem(
    base_dir: Path, first: str, second: str
) -> None:
    """`lb run` could not bind both; `lb validate` says so first, naming the second and the first."""
    tree = good_tree()
    tree["listeners"] += [{"bind": first}, {"bind": second}]
    assert problems_of(tree, base_dir) == {
        "listeners[3].bind": f"{second} overlaps listeners[2] ({first}): both cannot listen",
    }


@pytest.mark.parametrize(("first", "second"), [("[::]:8090", "127.0.0.1:8090"), ("0.0.0.0:8090", "[::1]:8090")])
def test_listeners_of_two_families_on_one_port_are_fine(base_dir: Path, first: str, second: str) -> None:
    """Every socket is IPV6_V6ONLY: `::` and an IPv4 address on one port both bind."""
    tree = good_tree()
    tree["listeners"] += [{"bind": first}, {"bind": second}]
    parse(tree, base_dir)


def test_a_problem_prints_on_one_line_whatever_the_key_holds(base_dir: Path) -> None:
    """A key is the file's text: a newline or an escape in it must not print a made-up second problem."""
    tree = good_tree()
    tree["evil\nlisteners[0].bind: fake problem\x1b[2J"] = 1
    with pytest.raises(ConfigError) as info:
        parse(tree, base_dir)
    (line,) = [str(problem) for problem in info.value.problems]
    assert line.startswith("evil\\nlisteners[0].bind: fake problem\\x1b[2J: unknown key"), line
    assert line.isprintable()


def test_non_loopback_admin_needs_a_token(base_dir: Path) -> None:
    """Admin reachable off-host without a token is refused."""
    tree = good_tree()
    tree["admin"] = {"bind": "0.0.0.0:9000"}
    assert problems_of(tree, base_dir) == {
        "admin.token": "a token is required when admin listens on a non-loopback address"
    }


def test_same_site_none_needs_secure(base_dir: Path) -> None:
    """SameSite=None with secure: never is refused, since browsers drop such cookies."""
    tree = set_at(good_tree(), "affinity.same_site", "none")
    assert parse(tree, base_dir).affinity.same_site is SameSite.NONE
    problems = problems_of(set_at(tree, "affinity.secure", "never"), base_dir)
    assert list(problems) == ["affinity.same_site"]
    # YAML's `false` is `never`: the message names both, for an operator who wrote the one it does not say.
    problems = problems_of(set_at(tree, "affinity.secure", False), base_dir)
    assert problems == {"affinity.same_site": "same_site None needs the Secure attribute, but secure is never (false)"}


@pytest.mark.parametrize("name", ["__Host-LB", "__Secure-LB", "__host-lb"])
def test_a_secure_prefixed_cookie_name_needs_secure(base_dir: Path, name: str) -> None:
    """Browsers drop a `__Host-`/`__Secure-` cookie without Secure (RFC 6265bis §4.1.3): with
    secure: never such a name is refused; with auto or always it is taken (auto is advice)."""
    tree = set_at(good_tree(), "affinity.cookie", name)
    assert parse(tree, base_dir).affinity.cookie == name
    problems = problems_of(set_at(tree, "affinity.secure", "never"), base_dir)
    assert list(problems) == ["affinity.cookie"] and "Secure" in problems["affinity.cookie"]


@pytest.mark.parametrize("header", [
    "Host", "host", "Cookie", "Set-Cookie", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Accept",
    "Sec-WebSocket-Protocol", "Content-Length", "Transfer-Encoding", "X-Forwarded-For", "Forwarded", "X-Request-Id",
    # dropped from every request as aliases of protected names once `_` reads as `-` (lb.http.head)
    "X_Forwarded_For", "X_Forwarded_Session", "Content_Length", "X_LB_Affinity",
])
def test_affinity_header_may_not_be_one_the_balancer_reads_or_writes(base_dir: Path, header: str) -> None:
    """The token's header is taken off every forwarded request and added to answers: `header: Host` left
    backends without a Host, `Cookie` took every cookie off, `Upgrade` gave the 101 a second Upgrade."""
    problems = problems_of(set_at(good_tree(), "affinity.header", header), base_dir)
    said = "'_' reads as '-'" if "_" in header else "X-LB-Affinity"
    assert list(problems) == ["affinity.header"] and said in problems["affinity.header"]


@pytest.mark.parametrize(("written", "sealed"), [(None, 3), (3, 3), (2, 2)])
def test_the_token_version_sealed_is_the_configured_one(base_dir: Path, written: int | None, sealed: int) -> None:
    """`affinity.token_version: 2` for a rollout beside earlier builds: the running codec seals version 2."""
    from base64 import urlsafe_b64decode

    from lb.affinity.codec import Claim
    from lb.state.context import ProxyContext

    tree = good_tree() if written is None else set_at(good_tree(), "affinity.token_version", written)
    config = parse(tree, base_dir)
    assert config.affinity.token_version == sealed
    codec = ProxyContext.build(config, lambda *args: None, wall_offset=0.0).codec
    token = codec.seal(Claim("gw-1", 1_700_000_000.5, bytes(8), pool="gateways"), bytes(12))
    assert urlsafe_b64decode(token + "=" * (-len(token) % 4))[0] == sealed


@pytest.mark.parametrize("header", ["X-Game-Session", "X_Game_Session", "X-LB-Affinity"])
def test_affinity_header_of_ones_own_is_taken(base_dir: Path, header: str) -> None:
    assert parse(set_at(good_tree(), "affinity.header", header), base_dir).affinity.header == header


@pytest.mark.parametrize(("key", "trusted", "why"), [
    ("header:X-Forwarded-For", False, "balance: source"), ("header:X-Forwarded-For", True, "balance: source"),
    ("header:x-real-ip", False, "balance: source"), ("header:Forwarded", False, "balance: source"),
    ("header:Connection", False, "replaced or dropped"), ("header:X_Forwarded_For", False, "'_' reads as '-'"),
    ("header:X_Request_Id", False, "'_' reads as '-'"), ("header:X-LB-Affinity", False, None),  # not named: off
    ("cookie:LB_AFFINITY", False, "affinity token"), ("query:lb_affinity", False, "affinity token"),
    ("header:Cookie", False, "affinity cookie"), ("header:cookie", True, "affinity cookie"),
    # what the backend gets as sent: a trusted proxy's claims pass (who the user is, as an authenticating
    # proxy in front says, only from it), and so do other X-Forwarded-* names
    ("header:X-Real-IP", True, None), ("header:X-Forwarded-User", True, None),
    ("header:X-Forwarded-User", False, "once trusted_proxies names it"), ("header:X-Forwarded-Tenant", False, None),
    ("header:X-User-Id", False, None),
    ("header:Host", False, None), ("cookie:session", False, None), ("cookie:lb_affinity", False, None),
    ("query:uid", False, None),
])
def test_a_hash_key_must_be_what_the_backend_gets(base_dir: Path, key: str, trusted: bool, why: str | None) -> None:
    """An untrusted client's X-Forwarded-For chose its backend (which saw the balancer's); the token's own
    header, cookie and query parameter are taken off the request; an alias of ours is left out of it."""
    tree = good_tree()
    tree["pools"]["gateways"].update(balance="hash", hash_key=key)
    if trusted:
        tree["trusted_proxies"] = ["10.0.0.0/8"]
    if why is not None:
        problems = problems_of(tree, base_dir)
        assert list(problems) == ["pools.gateways.hash_key"] and why in problems["pools.gateways.hash_key"]
    else:
        assert str(parse(tree, base_dir).pools["gateways"].hash_key) == key


@pytest.mark.parametrize(("key", "read"), [
    ("Header:X-User-Id", "header:X-User-Id"), ("QUERY:uid", "query:uid"), ("Cookie:Session", "cookie:Session"),
])
def test_a_hash_key_s_source_takes_any_case_and_its_name_keeps_its_own(base_dir: Path, key: str, read: str) -> None:
    """As every other choice in the file (`balance: SOURCE`, `type: SRV`); a query parameter's or a cookie's
    name is matched as written, so it stays as written."""
    tree = good_tree()
    tree["pools"]["gateways"].update(balance="hash", hash_key=key)
    assert str(parse(tree, base_dir).pools["gateways"].hash_key) == read


def test_a_hash_key_may_not_be_the_affinity_header_once_named(base_dir: Path) -> None:
    tree = set_at(good_tree(), "affinity.header", "X-Route")
    tree["pools"]["gateways"].update(balance="hash", hash_key="header:x-route")
    problems = problems_of(tree, base_dir)
    assert list(problems) == ["pools.gateways.hash_key"] and "affinity token" in problems["pools.gateways.hash_key"]


def test_the_affinity_header_is_off_unless_named(base_dir: Path) -> None:
    assert parse(good_tree(), base_dir).affinity.header is None


def test_an_affinity_header_the_parse_leaves_out_as_an_alias_is_refused(base_dir: Path) -> None:
    """`affinity.header: X_User_Id` beside `hash_key: header:X-User-Id`: every request's parse drops the
    token's header as an alias of the routing one."""
    tree = set_at(good_tree(), "affinity.header", "X_User_Id")
    tree["pools"]["gateways"].update(balance="hash", hash_key="header:X-User-Id")
    assert list(problems_of(tree, base_dir)) == ["affinity.header"]


def test_every_affinity_problem_is_said_at_once(base_dir: Path) -> None:
    """`lb validate` lists every problem in one pass: the header's and the cookie's together."""
    tree = set_at(good_tree(), "affinity.header", "Host")
    tree = set_at(set_at(tree, "affinity.cookie", "__Host-LB"), "affinity.secure", "never")
    assert set(problems_of(tree, base_dir)) == {"affinity.header", "affinity.cookie"}


def test_invalid_pool_name(base_dir: Path) -> None:
    """Pool names appear in admin URLs, so they follow the id character set."""
    tree = good_tree()
    tree["pools"]["bad name"] = tree["pools"]["gateways"]
    problems = problems_of(tree, base_dir)
    assert list(problems) == ["pools.bad name"]
    assert problems["pools.bad name"].startswith("invalid pool name: expected letters, digits")


def test_a_pool_named_dot_dot_is_refused(base_dir: Path) -> None:
    """`/pools/../backends/gw-1/disable` is `/backends/gw-1/disable` to a browser: the dashboard's buttons
    (and curl) could never name that pool."""
    tree = good_tree()
    tree["pools"][".."] = tree["pools"]["gateways"]
    assert problems_of(tree, base_dir) == {"pools...": "invalid pool name: expected an id other than '..', "
                                            "which a URL path reads as a directory"}


def test_tls_key_must_match_certificate(base_dir: Path, tmp_path: Path) -> None:
    """A key that does not belong to the certificate is caught by validation, not at bind time."""
    other = write_dev_certs(tmp_path, ["localhost"])
    tree = set_at(good_tree(), "listeners[1].tls.key", str(other.server_key))
    problems = problems_of(tree, base_dir)
    assert list(problems) == ["listeners[1].tls"]
    assert problems["listeners[1].tls"].startswith("cannot load the certificate and key:")
    assert "key values mismatch" in problems["listeners[1].tls"]  # OpenSSL's word, not a guess at a file


def test_both_tls_files_at_fault_are_both_named(base_dir: Path, tmp_path: Path) -> None:
    """Two bad files are two problems, so the operator does not fix one only to meet the other."""
    (tmp_path / "bad.crt").write_bytes(b"junk\n")
    (tmp_path / "bad.key").write_bytes(b"junk\n")
    tree = set_at(good_tree(), "listeners[1].tls.cert", str(tmp_path / "bad.crt"))
    problems = problems_of(set_at(tree, "listeners[1].tls.key", str(tmp_path / "bad.key")), base_dir)
    assert sorted(problems) == ["listeners[1].tls.cert", "listeners[1].tls.key"], problems


def _encrypted_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"passphrase")))
    return path


@pytest.mark.parametrize(
    ("which", "content", "said"),
    [
        ("cert", b"not a certificate\n", "holds no PEM certificate"),
        ("cert", "key", "holds no PEM certificate"),  # the key given as both
        ("key", b"", "holds no PEM private key"),
        ("key", "cert", "holds no PEM private key"),  # the certificate given as both
        ("key", "encrypted", "is encrypted"),
        ("cert", "directory", "not a regular file"),
    ],
)
def test_a_tls_file_that_will_not_load_is_named(
    base_dir: Path, tmp_path: Path, which: str, content: bytes | str, said: str
) -> None:
    """OpenSSL's `[SSL] PEM lib` names neither file: the problem is put on the one at fault, saying why."""
    certs = base_dir / "certs"
    target = tmp_path / f"bad.{which}"
    if content == "directory":
        target.mkdir()
    elif content == "encrypted":
        _encrypted_key(target)
    elif isinstance(content, str):
        target.write_bytes((certs / ("server.key" if content == "key" else "server.crt")).read_bytes())
    else:
        target.write_bytes(content)
    problems = problems_of(set_at(good_tree(), f"listeners[1].tls.{which}", str(target)), base_dir)
    assert list(problems) == [f"listeners[1].tls.{which}"], problems
    assert said in problems[f"listeners[1].tls.{which}"], problems


# --------------------------------------------------------------------------- ${ENV}


def test_unset_variable_is_named_at_its_path(base_dir: Path) -> None:
    """An unset ${VAR} is a problem at the key that uses it, naming the variable."""
    problems = problems_of(good_tree(), base_dir, environ={})
    assert problems == {
        "admin.token": "environment variable LB_ADMIN_TOKEN is not set",
        "affinity.secret_keys[0]": "environment variable LB_COOKIE_KEY is not set",
    }


def test_default_applies_when_unset_or_empty(base_dir: Path) -> None:
    """${NAME:-default} uses the default when NAME is unset or empty, like the shell."""
    tree = set_at(good_tree(), "admin.token", "${TOKEN:-fallback}")
    assert parse(tree, base_dir).admin.token == "fallback"
    assert parse(tree, base_dir, {**ENV, "TOKEN": ""}).admin.token == "fallback"
    assert parse(tree, base_dir, {**ENV, "TOKEN": "set"}).admin.token == "set"


def test_expansion_inside_text_and_escape(base_dir: Path) -> None:
    """References expand inside longer strings, and $${ stays a literal ${."""
    tree = set_at(good_tree(), "admin.token", "pre-${LB_ADMIN_TOKEN}-$${NOT}")
    assert parse(tree, base_dir).admin.token == "pre-admin-secret-${NOT}"


def test_expanded_numbers_and_booleans(base_dir: Path) -> None:
    """Integer and boolean keys accept text that came from the environment."""
    tree = set_at(good_tree(), "pools.gateways.backends[0].weight", "${WEIGHT}")
    tree = set_at(tree, "affinity.http_only", "${HTTP_ONLY}")
    tree = set_at(tree, "listeners[0].bind", "127.0.0.1:${PORT}")
    config = parse(tree, base_dir, {**ENV, "WEIGHT": "7", "HTTP_ONLY": "false", "PORT": "8181"})
    assert config.pools["gateways"].backends[0].weight == 7
    assert config.affinity.http_only is False
    assert config.listeners[0].port == 8181


@pytest.mark.parametrize(
    ("word", "meaning"), [("yes", True), ("On", True), ("NO", False), ("off", False), ("TRUE", True)]
)
def test_an_expanded_boolean_means_what_the_same_word_means_in_the_file(
    base_dir: Path, word: str, meaning: bool
) -> None:
    """YAML 1.1 reads yes/no/on/off as booleans in the file; a ${VAR} giving the same word agrees."""
    in_file = parse_config(GOOD_YAML.replace("http_only: true", f"http_only: {word}"), base_dir=base_dir, environ=ENV)
    expanded = parse(set_at(good_tree(), "affinity.http_only", "${HTTP_ONLY}"), base_dir, {**ENV, "HTTP_ONLY": word})
    assert in_file.affinity.http_only is expanded.affinity.http_only is meaning


def test_an_expanded_boolean_that_is_no_such_word_is_a_problem(base_dir: Path) -> None:
    tree = set_at(good_tree(), "affinity.http_only", "${HTTP_ONLY}")
    problems = problems_of(tree, base_dir, {**ENV, "HTTP_ONLY": "y"})
    assert "expected true or false" in problems["affinity.http_only"]


def test_literal_strings_are_not_coerced(base_dir: Path) -> None:
    """A quoted "7" written in the file is still a string where an integer is expected."""
    problems = problems_of(set_at(good_tree(), "pools.gateways.backends[0].weight", "7"), base_dir)
    assert problems == {"pools.gateways.backends[0].weight": "expected an integer from 1 to 256, got str '7'"}


def test_a_quoted_boolean_word_is_named_a_string_not_echoed_as_if_it_were_the_boolean(base_dir: Path) -> None:
    """`http_only: "false"` (Helm quoting everything) was refused as "expected true or false, got 'false'",
    which reads as if false itself were wrong; the message says it is a string and how to write it."""
    text = GOOD_YAML.replace("http_only: true", 'http_only: "false"')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, base_dir=base_dir, environ=ENV)
    expected = "affinity.http_only: expected true or false, got str 'false'"
    expected += " (a quoted string: write false without quotes)"
    assert expected in str(caught.value)


def test_malformed_reference(base_dir: Path) -> None:
    """A ${ that is not ${NAME} or ${NAME:-default} is a problem, not left as text."""
    problems = problems_of(set_at(good_tree(), "admin.token", "${1BAD}"), base_dir)
    assert problems == {"admin.token": "expected ${NAME} or ${NAME:-default}, got '${1BAD}'"}


@pytest.mark.parametrize("value", ["${TOKEN:-${FALLBACK_TOKEN}}", "${TOKEN:-x${FALLBACK_TOKEN}}", "${TOKEN:-$${B}}"])
@pytest.mark.parametrize("fallback", [None, "b" * 40])
def test_a_reference_inside_a_default_is_a_problem_not_a_literal(
    base_dir: Path, value: str, fallback: str | None
) -> None:
    """`${A:-${B}}` (a shell's nested fallback) ended at the first `}`: the value was the literal
    text `${B` plus `}`, long enough to pass as an admin token or a cookie key printed in the file."""
    environ = {**ENV, **({"FALLBACK_TOKEN": fallback} if fallback else {})}
    problems = problems_of(set_at(good_tree(), "admin.token", value), base_dir, environ)
    assert list(problems) == ["admin.token"] and "nesting is not supported" in problems["admin.token"]


def test_keys_are_not_expanded(base_dir: Path) -> None:
    """Only values expand; a ${...} key is just an unknown key."""
    tree = good_tree()
    tree["${LB_ADMIN_TOKEN}"] = 1
    assert list(problems_of(tree, base_dir)) == ["${LB_ADMIN_TOKEN}"]


# --------------------------------------------------------------------------- YAML and files


def test_yaml_syntax_error_is_one_problem_with_line_and_column(tmp_path: Path) -> None:
    """Broken YAML is one problem at the root path naming line and column."""
    with pytest.raises(ConfigError) as info:
        parse_config("listeners:\n  - bind: [oops\nroutes: []\n", base_dir=tmp_path, environ={})
    (problem,) = info.value.problems
    assert problem.path == ""
    assert re.match(r"invalid YAML at line \d+, column \d+: ", problem.message)


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("limits:\n\tmax_header_bytes: 1\n", "invalid YAML at line 2, column 1: found character '\\t' that cannot"),
        ("limits: {max_header_bytes: 1\n", "invalid YAML at line 2, column 1: expected ',' or '}', but got"),
        ('admin: {token: "\\q"}\n', "invalid YAML at line 1, column 18: found unknown escape character 'q'"),
    ],
)
def test_a_file_libyaml_refuses_gets_pyyaml_s_own_error(tmp_path: Path, broken: str, message: str) -> None:
    """libyaml reads the file (five times faster), but its errors name less ("found character that cannot
    start any token"; "did not find expected ',' or '}'", not what came instead): the error is the one
    PyYAML's own parser gives."""
    with pytest.raises(ConfigError) as info:
        parse_config(broken, base_dir=tmp_path, environ={})
    (problem,) = info.value.problems
    assert problem.message.startswith(message), problem.message


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
def test_libyaml_and_pyyaml_read_the_example_configurations_alike(base_dir: Path) -> None:
    """The tree parse_config checks is the same whichever parser read it (the constructor and the resolver
    that turn scalars into values are PyYAML's in both)."""
    root = Path(__file__).resolve().parents[2]
    texts = [GOOD_YAML, DUPLICATED, (root / "config.example.yaml").read_text(encoding="utf-8"),
             (root / "deploy/kubernetes/base/lb.yaml").read_text(encoding="utf-8")]
    for text in texts:
        assert yaml.load(text, Loader=yaml.CSafeLoader) == yaml.load(text, Loader=yaml.SafeLoader)


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
@pytest.mark.parametrize(
    "text",
    [
        "logging: {access_log: false}\t\n",  # a tab libyaml takes for a separator, PyYAML for an error
        "logging:\t{}\n",
        "admin: {token: x}\t# c\n",
        "logging: !\n",  # an empty tag: '' to libyaml, null to PyYAML
        "runtime: {event_loop: |#\n}\n",  # a block scalar's header running into a comment
        "pools:\n a: {}\n\ufeffroutes: []\n",  # a BOM past the start: libyaml drops it
        "\ufeff\ufeffrouting: 1\n",
    ],
)
def test_what_the_two_readers_read_differently_is_read_as_pyyaml_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """A file is read the same whether or not PyYAML has libyaml: the problems are the same either way."""

    def problems() -> list[tuple[str, str]]:
        try:
            parse_config(GOOD_YAML + text, base_dir=tmp_path, environ=ENV)
        except ConfigError as exc:
            return [(problem.path, problem.message) for problem in exc.problems]
        return []

    with_libyaml = problems()
    monkeypatch.setattr(document, "_FAST_LOADER", None)
    assert with_libyaml == problems()


def test_a_repeated_key_in_a_file_that_fails_later_is_said_once(tmp_path: Path) -> None:
    """libyaml got as far as the repeated keys, then a date that does not exist stopped it: PyYAML's reading
    says the repeated key, once."""
    with pytest.raises(ConfigError) as info:
        parse_config("a: 1\na: 2\nb: 2024-13-01\n", base_dir=tmp_path, environ={})
    assert [problem.path for problem in info.value.problems].count("a") == 1, info.value.problems


# SPEC's own example, as SPEC writes it: `[${LB_COOKIE_KEY}]` unquoted inside a flow list.
SPEC_EXAMPLE = GOOD_YAML.replace('secret_keys: ["${LB_COOKIE_KEY}"]', "secret_keys: [${LB_COOKIE_KEY}]")
SPEC_KEYS_LINE = SPEC_EXAMPLE.splitlines().index("  secret_keys: [${LB_COOKIE_KEY}]") + 1


KEY_WITH_YAML_SYNTAX = "k#1, [x]: {y} " + "z" * 32
LONG_A, LONG_B = "a" * 32, "b" * 32


def test_unquoted_references_inside_flow_collections_expand_as_spec_writes_them(base_dir: Path) -> None:
    """`[${KEY}]` alone is not YAML (a brace ends a plain value inside [ ] and { }); SPEC writes it, so it reads."""
    environ = {"LB_ADMIN_TOKEN": "t0ken", "LB_COOKIE_KEY": KEY_WITH_YAML_SYNTAX, "RISE": "3"}
    text = SPEC_EXAMPLE.replace("rise: 2,", "rise: ${RISE},")  # in a flow mapping too
    config = parse_config(text, base_dir=base_dir, environ=environ)
    assert config.affinity.secret_keys == (KEY_WITH_YAML_SYNTAX,), "the variable's text, verbatim, as in block style"
    assert config.admin.token == "t0ken"
    assert config.pools["gateways"].health_check.rise == 3


def test_spec_s_unquoted_reference_leaves_anchors_and_many_backends_alone(base_dir: Path) -> None:
    """With `[${KEY}]` read, a mapping's stood-in copy once left the original in the walk's set of parents
    for good: an alias used twice read as one of its own parents, and 57 mappings read as 64 deep."""
    backends = "".join(f"      - {{id: b{i}, address: 127.0.0.1:{10000 + i}}}\n" for i in range(80))
    text = SPEC_EXAMPLE.replace("\npools:\n", f"""\npools:
  second:
    health_check: &check {{type: tcp}}
    backends:
{backends}  third:
    health_check: *check
    backends: [{{id: c, address: 127.0.0.1:9}}]
""")
    config = parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t0ken", "LB_COOKIE_KEY": LONG_A})
    assert len(config.pools["second"].backends) == 80
    assert config.pools["third"].health_check == config.pools["second"].health_check


def test_an_unset_reference_inside_a_flow_list_is_named_by_its_path(base_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SPEC_EXAMPLE, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t"})
    (problem,) = info.value.problems
    assert problem.path == "affinity.secret_keys[0]"
    assert problem.message == "environment variable LB_COOKIE_KEY is not set"


@pytest.mark.parametrize(
    "reference", ["${LB_COOKIE_KEY:-" + LONG_A + "}", "${file:key.txt}", "${LB_COOKIE_KEY", "$${LB_COOKIE_KEY}"]
)
def test_only_plain_references_are_read_inside_flow_collections(base_dir: Path, reference: str) -> None:
    """A default, a file or a broken reference unquoted inside [ ] keeps YAML's own error and the hint to quote:
    their characters (quotes, escapes, `: `, line ends) could mean something else to YAML."""
    text = SPEC_EXAMPLE.replace("[${LB_COOKIE_KEY}]", f"[{reference}]")
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t", "LB_COOKIE_KEY": LONG_A})
    (problem,) = info.value.problems
    assert problem.message.startswith(f"invalid YAML at line {SPEC_KEYS_LINE},"), problem.message


def test_a_reference_left_open_never_swallows_the_lines_after_it(base_dir: Path) -> None:
    """`${C:-SID` with no `}`: the settings below it must not vanish into a default running to the next brace."""
    text = SPEC_EXAMPLE.replace("  http_only: true\n", "").replace(
        "  cookie: LB_AFFINITY\n", "  cookie: ${C:-SID\n  http_only: false  # {see runbook}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t", "LB_COOKIE_KEY": LONG_A})
    assert [problem.path for problem in info.value.problems] == ["affinity.cookie"], info.value.problems


def test_quoted_scalars_keep_their_escapes_when_references_are_read_again(base_dir: Path) -> None:
    """Reading `[${KEY}]` again changes nothing else: YAML escapes in other quoted values still apply."""
    text = SPEC_EXAMPLE.replace("  cookie: LB_AFFINITY\n", '  cookie: "SID\\u0041"\n')
    config = parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t", "LB_COOKIE_KEY": LONG_A})
    assert config.affinity.cookie == "SIDA"


def test_a_file_holding_stand_in_characters_is_not_read_again(base_dir: Path) -> None:
    """Plane-15 private-use characters of the file's own would be taken for stand-ins: YAML's error stands."""
    text = SPEC_EXAMPLE.replace("  cookie: LB_AFFINITY\n", "  cookie: \U000f0041BC\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t", "LB_COOKIE_KEY": LONG_A})
    (problem,) = info.value.problems
    assert problem.message.startswith("invalid YAML"), problem.message


def test_yaml_still_broken_with_references_names_the_real_fault_not_the_reference(base_dir: Path) -> None:
    """A file that stays broken once references are set aside: the fault past them is named, at the file's own
    line and column, without the hint to quote them (they were not what broke it)."""
    text = "affinity:\n  secret_keys: [${K}, {oops]\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"K": "v"})
    (problem,) = info.value.problems
    assert problem.message.startswith("invalid YAML at line 2, column 28: "), problem.message
    assert "quote ${...}" not in problem.message
    assert not re.search("[\U000f0000-\U000ffffd]", problem.message), "no stand-in character reaches a message"


@pytest.mark.parametrize(
    ("broken", "line"),
    [
        ("limits: {max_header_bytes: 16384\n", "end"),  # a flow mapping never closed
        ("limits:\n  max_header_bytes: 'open\n", "end"),  # a quote never closed
        ("limits:\n\tmax_header_bytes: 1\n", "last"),  # a tab where indentation goes
        ("pools:\n  gateways:\n    balance: least_conn\n   backends: []\n", "last"),  # indentation off
    ],
)
def test_a_fault_after_spec_s_unquoted_reference_is_named_where_it_is(base_dir: Path, broken: str, line: str) -> None:
    """SPEC's `[${LB_COOKIE_KEY}]` above an unrelated fault: the fault's own line, never the reference's."""
    text = SPEC_EXAMPLE + broken
    lines = text.count("\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"LB_ADMIN_TOKEN": "t", "LB_COOKIE_KEY": LONG_A})
    (problem,) = info.value.problems
    found = re.match(r"invalid YAML at line (\d+), column \d+: ", problem.message)
    assert found is not None, problem.message
    assert int(found[1]) > SPEC_KEYS_LINE and int(found[1]) >= lines - (1 if line == "end" else 2), problem.message
    assert "quote ${...}" not in problem.message


def test_an_escaped_reference_stays_literal_in_flow_and_block_style(base_dir: Path) -> None:
    text = SPEC_EXAMPLE.replace("token: ${LB_ADMIN_TOKEN}", "token: \"$${NOT_A_VAR}\"")
    config = parse_config(text, base_dir=base_dir, environ={"LB_COOKIE_KEY": LONG_A})
    assert config.admin.token == "${NOT_A_VAR}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the configuration is empty"),
        ("- a\n- b\n", "expected a mapping, got list"),
        ("just text", "expected a mapping, got str"),
        ("a: 2024-13-01\n", "invalid YAML"),
        ("a: !!python/object:os.system x\n", "invalid YAML at line 1"),
        ("a: &x [*x]\n", "unknown key 'a'"),
    ],
)
def test_document_level_problems(tmp_path: Path, text: str, message: str) -> None:
    """Empty, non-mapping, unsafe or odd documents are problems, never crashes."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    assert any(message in p.message for p in info.value.problems)


def test_self_referencing_alias_is_reported(tmp_path: Path) -> None:
    """A YAML alias that contains itself is a problem, not an endless loop."""
    with pytest.raises(ConfigError) as info:
        parse_config("listeners: &x [*x]\n", base_dir=tmp_path, environ={})
    assert "listeners[0]" in {p.path for p in info.value.problems}


@pytest.mark.parametrize(
    "text",
    [
        "pools: " + "[" * 600 + "]" * 600 + "\n",  # libyaml reads it; walking it recursed past Python's limit
        "admin: " + "[" * 600 + "]" * 600 + "\n",  # as `lb ctl` reads the admin section alone
        "x0: &a0 [1]\n" + "".join(f"x{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 700)),  # aliases, each one deeper
    ],
)
def test_a_value_nested_past_the_depth_limit_is_one_problem(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    deep = [problem for problem in info.value.problems if "nested more than 64 deep" in problem.message]
    assert len(deep) == 1, info.value.problems


@pytest.mark.parametrize(("lists", "too_deep"), [(63, False), (64, True)])
def test_the_depth_limit_counts_every_mapping_and_list(tmp_path: Path, lists: int, too_deep: bool) -> None:
    """The file's own mapping and 63 lists inside it are 64 levels, the most there may be."""
    text = "pools: " + "[" * lists + "]" * lists + "\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    assert any("nested more than 64 deep" in problem.message for problem in info.value.problems) is too_deep


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    """A config file that cannot be read is reported as a problem, not a traceback."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", environ={})
    (problem,) = info.value.problems
    assert problem.path == "" and problem.message.startswith(f"cannot read {tmp_path / 'nope.yaml'}")


def test_tls_paths_resolve_against_the_config_file(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative cert paths are relative to the config file, not the working directory."""
    (base_dir / "lb.yaml").write_text(GOOD_YAML, encoding="utf-8")
    monkeypatch.chdir("/")
    config = load_config(base_dir / "lb.yaml", environ=ENV)
    assert config.listeners[1].tls is not None
    assert config.listeners[1].tls.cert == str(base_dir / "certs" / "server.crt")


# --------------------------------------------------------------------------- fuzzing

KEYS = [
    "listeners", "bind", "tls", "cert", "key", "admin", "token", "affinity", "mode", "cookie",
    "max_age", "secret_keys", "same_site", "http_only", "secure", "routes", "path_prefix", "pool",
    "pools", "gateways", "balance", "health_check", "type", "path", "interval", "timeout", "rise",
    "fall", "expect", "backends", "id", "address", "weight", "timeouts", "handshake", "limits", "logging",
    "level", "format", "runtime", "event_loop",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(["127.0.0.1:80", "[::1]:0", "1s", "${X}", "${X:-1}", "${", "/", "insert", "k" * 40]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers())
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=30,
)


def _node_paths(node: object, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The path of every node under `node`, inner ones too."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [path, *(p for k, v in children for p in _node_paths(v, (*path, k)))]


def _at(tree: Any, path: Iterable[str | int]) -> Any:
    for step in path:
        tree = tree[step]
    return tree


# Settings of GOOD_YAML that need no file and no variable, any of which MINIMAL_YAML may take.
_OPTIONAL = [
    ("affinity", "mode", "insert"), ("affinity", "cookie", "LB_AFFINITY"), ("affinity", "max_age", "1h"),
    ("affinity", "same_site", "Lax"), ("affinity", "http_only", True), ("affinity", "secure", "auto"),
    ("timeouts", "handshake", "10s"), ("timeouts", "backend_connect", "3s"), ("timeouts", "shutdown_grace", "10s"),
    ("limits", "max_header_bytes", 16384), ("admin", "bind", "127.0.0.1:0"), ("admin", "token", "t" * 32),
]


@st.composite
def _near_minimal_trees(draw: st.DrawFn) -> tuple[object, bool]:
    """MINIMAL_YAML's tree (which needs no file and no variable), with any of _OPTIONAL, and, four times
    in five, one change:
    a node (a whole section, a list, a value) deleted or replaced by an arbitrary tree, or a key added
    to a mapping.  With it whether it is unchanged (then it must parse)."""
    tree = yaml.safe_load(MINIMAL_YAML)
    for section, key, value in _OPTIONAL:
        if draw(st.booleans()):
            tree.setdefault(section, {})[key] = value
    edit = draw(st.sampled_from(["none", "delete", "replace", "add"]))
    if edit == "none":
        return tree, True
    paths = _node_paths(tree)
    if edit == "add":
        node = _at(tree, draw(st.sampled_from([path for path in paths if isinstance(_at(tree, path), dict)])))
        node[draw(keys)] = draw(trees)
        return tree, False
    *parents, last = draw(st.sampled_from(paths[1:]))
    node = _at(tree, parents)
    if edit == "delete":
        del node[last]
    else:
        node[last] = draw(trees)
    return tree, False


@settings(max_examples=300, deadline=None)
@given(trees.map(lambda tree: (tree, False)) | _near_minimal_trees())
def test_arbitrary_trees_only_raise_config_error(drawn: tuple[object, bool]) -> None:
    """Whatever YAML holds, parse_config returns a Config or raises ConfigError, nothing else; a
    valid tree unchanged parses."""
    tree, unchanged = drawn
    try:
        parse_config(yaml.safe_dump(tree), base_dir=Path("/nonexistent"), environ={"X": "1"})
    except ConfigError as exc:
        assert exc.problems and not unchanged


def _leaf_paths(node: object, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, f"{path}[{i}]")]
    return [path]


_ports = st.integers(10_000, 65_535)
_durations = st.builds("{}{}".format, st.integers(1, 9999), st.sampled_from(["ms", "s", "m", "h"])) | st.sampled_from(
    ["1h30m", "2m5s", "1.5s"]
)
_names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20)
_secrets = st.text(string.ascii_lowercase + string.digits, min_size=32, max_size=64)
_paths = st.text(string.ascii_lowercase[:6] + string.digits + "-._~/%", max_size=20).map(lambda path: "/" + path)

# What each leaf of GOOD_YAML may hold, the rest unchanged, and the config still be valid.
_VALID_VALUES: dict[str, st.SearchStrategy[object]] = {
    "listeners[0].bind": st.builds("127.0.0.1:{}".format, _ports) | st.builds("[::1]:{}".format, _ports)
    | _ports.map(str),
    "listeners[1].bind": st.builds("127.0.0.2:{}".format, _ports),
    "listeners[1].tls.cert": st.just("certs/server.crt"),
    "listeners[1].tls.key": st.just("certs/server.key"),
    "admin.bind": st.builds("127.0.0.1:{}".format, _ports) | st.builds("[::1]:{}".format, _ports),
    "admin.token": _secrets,
    "affinity.mode": st.sampled_from(["insert", "rewrite", "INSERT"]),
    "affinity.cookie": _names,
    "affinity.max_age": _durations,
    "affinity.secret_keys[0]": _secrets,
    "affinity.same_site": st.sampled_from(["Strict", "Lax", "lax", "None"]),
    "affinity.http_only": st.booleans(),
    "affinity.secure": st.sampled_from(["auto", "always", "never", True, False]),
    "routes[0].path_prefix": _paths,
    "routes[0].pool": st.just("gateways"),
    "pools.gateways.balance": st.sampled_from(["round_robin", "least_conn", "source"]),
    "pools.gateways.health_check.type": st.sampled_from(["http", "tcp"]),
    "pools.gateways.health_check.path": _paths,
    "pools.gateways.health_check.interval": _durations,
    "pools.gateways.health_check.timeout": _durations,
    "pools.gateways.health_check.rise": st.integers(1, 1000),
    "pools.gateways.health_check.fall": st.integers(1, 1000),
    "pools.gateways.backends[0].id": _names,
    "pools.gateways.backends[0].address": st.builds(
        "{}:{}".format, st.sampled_from(["127.0.0.1", "[::1]", "localhost"]), st.integers(1, 65535).filter(
            lambda port: port not in (8080, 8443)  # a listener's: the balancer itself
        )
    ),
    "pools.gateways.backends[0].weight": st.integers(1, 256),
    "pools.gateways.backends[1].id": _names,
    "pools.gateways.backends[1].address": st.builds("10.0.0.1:{}".format, st.integers(1, 65535)),
    "pools.gateways.backends[1].weight": st.integers(1, 256),
    "timeouts.handshake": _durations,
    "timeouts.backend_connect": _durations,
    "timeouts.shutdown_grace": _durations | st.just("0s"),
    "limits.max_header_bytes": st.integers(1, 1048576),
}
# Values fine alone that another setting makes wrong; `_ALSO_AT` says where else the problem may be told.
_CLASHES = [
    ("listeners[0].bind", "127.0.0.1:9000"), ("listeners[0].bind", "0.0.0.0:8443"),
    ("listeners[1].bind", "127.0.0.1:8080"), ("admin.bind", "0.0.0.0:8080"), ("admin.bind", "127.0.0.1:8443"),
    ("pools.gateways.backends[1].id", "gw-1"), ("pools.gateways.backends[1].address", "127.0.0.1:9001"),
    ("pools.gateways.backends[0].address", "127.0.0.1:8080"), ("pools.gateways.balance", "hash"),
    ("routes[0].pool", "p"), ("listeners[1].tls.cert", "certs/server.key"),
]  # fmt: skip
_ALSO_AT = {
    "listeners[0].bind": ("admin.bind", "listeners[1].bind"),
    "listeners[1].bind": ("admin.bind", "listeners[0].bind"),
    "pools.gateways.balance": ("pools.gateways.hash_key",),
}


@st.composite
def _one_value_changed(draw: st.DrawFn) -> tuple[str, object, bool | None]:
    """A leaf of GOOD_YAML and a value for it, with whether the config must then parse (None: either).

    A third each: a valid value; a valid value one character off (or a value that clashes with another
    setting, which must not parse); an arbitrary tree."""
    path = draw(st.sampled_from(sorted(_VALID_VALUES)))
    kind = draw(st.sampled_from(["valid", "near", "tree"]))
    if kind == "tree":
        return path, draw(trees), None
    value = draw(_VALID_VALUES[path])
    if kind == "valid":
        return path, value, True
    if draw(st.integers(0, 3)) == 0:
        clash_path, clash = draw(st.sampled_from(_CLASHES))
        return clash_path, clash, False
    text = yaml.safe_dump(value).removesuffix("\n...\n").strip() if not isinstance(value, str) else value
    at = draw(st.integers(0, len(text)))
    char = draw(st.sampled_from(" :-/.%[]{}#0\n") | st.characters())
    edit = draw(st.sampled_from(["replace", "drop", "insert"]))
    return path, text[:at] + ("" if edit == "drop" else char) + text[at + (edit != "insert") :], None


def test_every_leaf_of_the_good_config_has_its_valid_values() -> None:
    assert sorted(_VALID_VALUES) == sorted(_leaf_paths(good_tree()))


def _at_or_under(problem: str, path: str) -> bool:
    return problem == path or problem.startswith((f"{path}.", f"{path}["))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_one_value_changed())
def test_one_mutated_value_only_raises_config_error(base_dir: Path, change: tuple[str, object, bool | None]) -> None:
    """Replacing any value of a good config yields a Config or ConfigError problems at or under that path
    (or at the other side of a rule it broke): a valid value always parses, a clash never does."""
    path, value, parses = change
    try:
        parse(set_at(good_tree(), path, value), base_dir)
    except ConfigError as exc:
        assert exc.problems and parses is not True
        also = _ALSO_AT.get(path, ())
        assert all(_at_or_under(p.path, path) or p.path in also for p in exc.problems), exc.problems
    else:
        assert parses is not False


@st.composite
def _near_minimal_text(draw: st.DrawFn) -> tuple[str, bool]:
    """MINIMAL_YAML with, four times in five, one change: a character YAML turns on (or any) replaced,
    dropped or inserted, or a line dropped or repeated.  With it whether it is unchanged."""
    text = MINIMAL_YAML
    edit = draw(st.sampled_from(["none", "replace", "drop", "insert", "line"]))
    if edit == "none":
        return text, True
    if edit == "line":
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[:at] + [lines[at]] * draw(st.sampled_from([0, 2])) + lines[at + 1 :]), False
    at = draw(st.integers(0, len(text) - 1))
    char = draw(st.sampled_from(":-{}[], \n\t#&*!\"'$|>%@`") | st.characters())
    return text[:at] + ("" if edit == "drop" else char) + text[at + (edit != "insert") :], False


@given(st.text(max_size=200).map(lambda text: (text, False)) | _near_minimal_text() | _near_minimal_text())  # 1:2
@settings(max_examples=200, deadline=None)
def test_arbitrary_text_only_raises_config_error(drawn: tuple[str, bool]) -> None:
    """Arbitrary text (usually broken YAML), and a valid file one character or line off, never escapes
    as anything but ConfigError; the valid file unchanged parses."""
    text, unchanged = drawn
    if unchanged:
        parse_config(text, base_dir=Path("/nonexistent"), environ={})
    with contextlib.suppress(ConfigError):
        parse_config(text, base_dir=Path("/nonexistent"), environ={})


# --------------------------------------------------------------------------- names the token must carry


@pytest.mark.parametrize(
    "path",
    ["pools.gateways.backends[0].id", "affinity.cookie", "affinity.header", "affinity.query_param"],
)
def test_a_300_character_name_is_refused_at_its_path(base_dir: Path, path: str) -> None:
    """Ids and names longer than a token, cookie or label can carry are a problem at their key path."""
    problems = problems_of(set_at(good_tree(), path, "a" * 300), base_dir)
    assert "at most 64 characters" in problems[path]


def test_a_300_character_pool_name_is_refused(base_dir: Path) -> None:
    """A pool name too long for a label is refused under its own path."""
    tree = good_tree()
    tree["pools"] = {"p" * 300: tree["pools"]["gateways"]}
    tree["routes"][0]["pool"] = "p" * 300
    problems = problems_of(tree, base_dir)
    assert any("at most 64 characters" in message for message in problems.values())


def test_a_64_character_id_is_fine(base_dir: Path) -> None:
    """The limit is inclusive."""
    config = parse(set_at(good_tree(), "pools.gateways.backends[0].id", "g" * 64), base_dir)
    assert config.pools["gateways"].backends[0].id == "g" * 64


def test_shutdown_delay_defaults_to_zero_and_parses(base_dir: Path) -> None:
    """`timeouts.shutdown_delay` (SPEC part 2): 0s by default, a duration otherwise."""
    assert parse(good_tree(), base_dir).timeouts.shutdown_delay == 0.0
    config = parse(set_at(good_tree(), "timeouts.shutdown_delay", "1500ms"), base_dir)
    assert config.timeouts.shutdown_delay == 1.5


DUPLICATED = """\
listeners:
  - bind: 127.0.0.1:8080
admin:
  token: first-token-first-token
  token: second-token-second-token
base: &gw {id: gw-x, address: 127.0.0.1:9001}
affinity: {secret_keys: [LONG_A]}
routes: [{path_prefix: /, pool: gateways}]
pools:
  gateways:
    backends:
      - {id: gw-1, address: 127.0.0.1:9001, id: gw-3}
      - {<<: *gw, id: gw-2}
  gateways:
    backends: [{id: gw-9, address: 127.0.0.1:9009}]
""".replace("LONG_A", LONG_A)


def test_a_key_given_twice_is_a_problem_at_its_path(base_dir: Path) -> None:
    """YAML keeps the last of two equal keys without a word: a second `token:` or a second pool of the
    same name would silently replace the first.  Each is a problem at its path, with both lines; a
    key merged in with `<<` and overridden is not one; the rest of the file is still checked."""
    with pytest.raises(ConfigError) as info:
        parse_config(DUPLICATED, base_dir=base_dir, environ={})
    assert [(problem.path, problem.message) for problem in info.value.problems] == [
        ("admin.token", "duplicate key: first on line 4, again on line 5"),
        ("pools.gateways.backends[0].id", "duplicate key: twice on line 12"),
        ("pools.gateways", "duplicate key: first on line 10, again on line 14"),
        ("base", "unknown key 'base'"),
    ]



def test_a_key_given_twice_is_said_once_when_the_file_is_read_again(base_dir: Path) -> None:
    """A file read a second time (references standing in, after a YAML error) says its repeated key once."""
    text = DUPLICATED.replace("listeners:\n", "odd: !!python/object {}\nref: ${NAME}\nlisteners:\n", 1)
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"NAME": "x"})
    paths = [problem.path for problem in info.value.problems]
    assert paths.count("admin.token") <= 1, info.value.problems


# Host names spelled like the family keys the look-ups use, too: a name never collides with a family.
_BIND_HOSTS = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "[::]", "[::1]", "localhost", "LocalHost", "ip4", "any6"]


def _pairwise_overlap(one: str, other: str) -> bool:
    """The rule, pair by pair, as the oracle: the same host, or a wildcard and an address of its family."""
    one, other = one.lower().strip("[]"), other.lower().strip("[]")
    if one == other:
        return True
    for wildcard, version in (("0.0.0.0", 4), ("::", 6)):
        family = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for a, b in ((one, other), (other, one)):
            if a == wildcard:
                try:
                    family(b)
                    return True
                except ValueError:
                    pass
    return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_BIND_HOSTS), st.sampled_from([8090, 8091])), min_size=1, max_size=8))
def test_listener_collisions_match_the_pairwise_rule(base_dir: Path, binds: list[tuple[str, int]]) -> None:
    """Each listener is checked by look-ups (not a walk over the earlier ones): it must name the same
    first collision as comparing it with every earlier one pair by pair would."""
    tree = good_tree()
    offset = len(tree["listeners"])
    tree["listeners"] += [{"bind": f"{host}:{port}"} for host, port in binds]
    expected: dict[str, str] = {}
    for i, (host, port) in enumerate(binds):
        first = next((j for j, (h, p) in enumerate(binds[:i]) if p == port and _pairwise_overlap(h, host)), None)
        if first is None:
            continue
        same = binds[first][0].lower().strip("[]") == host.lower().strip("[]")
        bind, earlier = f"{host}:{port}", f"{binds[first][0]}:{port}"
        expected[f"listeners[{offset + i}].bind"] = (
            f"duplicate bind {bind} (first at listeners[{offset + first}])" if same
            else f"{bind} overlaps listeners[{offset + first}] ({earlier}): both cannot listen"
        )
    try:
        parse(tree, base_dir)
        found: dict[str, str] = {}
    except ConfigError as exc:
        found = {p.path: p.message for p in exc.problems if p.path.startswith("listeners")}
    assert found == expected


def test_a_file_no_reading_of_which_succeeds_says_only_why(base_dir: Path) -> None:
    """`[${X}]` needs the second reading (references standing in for themselves); when that one fails too
    (a date that is no date), only the YAML error is said, not the repeated keys it had seen on the way."""
    text = "x: [${X}]\nx: [${X}]\ny: 2024-13-01\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ={"X": "1"})
    assert [p.path for p in info.value.problems] == [""], info.value.problems


def test_the_problems_kept_are_the_ones_said(base_dir: Path) -> None:
    """`Checker.said` answers from a set beside `problems` (a scan of them per bad entry was quadratic):
    dropping problems through `keep` drops their paths from it too."""
    from lb.config.checker import Checker

    check = Checker(base_dir=base_dir)
    check.add("admin.token", "bad")
    check.add("pools.p.backends[0].id", "bad")
    assert check.said("pools.p.backends[0].id") and not check.said("pools.p")
    check.keep(lambda problem: problem.path.startswith("admin."))
    assert [p.path for p in check.problems] == ["admin.token"]
    assert check.said("admin.token") and not check.said("pools.p.backends[0].id")


@pytest.mark.parametrize(
    "name",
    [
        "_websocket._tcp.player-gateway-headless.multiplayer-production.svc.cluster.local",  # 80 characters
        ".".join(["a" * 63] * 3 + ["b" * 61]),  # 253: the longest a DNS name can be
        ".".join(["a" * 63] * 3 + ["b" * 61]) + ".",  # and its trailing dot
    ],
)
def test_a_discovery_name_may_be_as_long_as_dns_allows(base_dir: Path, name: str) -> None:
    """A Kubernetes SRV name (`_port._proto.service.namespace.svc.cluster.local`) is often longer than an id's 64
    characters; DNS allows 253."""
    tree = good_tree()
    tree["pools"]["gateways"]["discovery"] = {"dns": name}
    assert parse(tree, base_dir).pools["gateways"].discovery.dns == name  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "chars"),
    [(".".join(["a" * 63] * 3 + ["b" * 62]), 254), (".".join(["a" * 63] * 4 + ["b" * 40]), 296),
     (".".join(["a" * 63] * 4 + ["b" * 40]) + ".", 296)],
)
def test_a_discovery_name_longer_than_dns_allows_is_a_problem(base_dir: Path, name: str, chars: int) -> None:
    """Said with DNS's bound, however long the name (the pattern's own bound, one more for a dot, said 254)."""
    tree = good_tree()
    tree["pools"]["gateways"]["discovery"] = {"dns": name}
    assert problems_of(tree, base_dir) == {
        "pools.gateways.discovery.dns": f"expected at most 253 characters, got {chars}"
    }


@pytest.mark.parametrize(("address", "message"), [
    ("0.0.0.0:9001", "0.0.0.0 is no host's address (connecting to it reaches this host)"),
    ("[::]:9001", ":: is no host's address (connecting to it reaches this host)"),
    ("224.0.0.1:9001", "224.0.0.1 is a multicast address"),
    ("[ff02::1]:9001", "ff02::1 is a multicast address"),
    ("255.255.255.255:9001", "255.255.255.255 is the broadcast address"),
    ("[::ffff:10.0.0.5]:9001", "an IPv4-mapped address is an IPv4 one: write 10.0.0.5:9001"),
])
def test_a_backend_address_no_gateway_can_listen_at_is_refused(base_dir: Path, address: str, message: str) -> None:
    """Linux connects 0.0.0.0 to this host itself; a TCP connect to multicast or broadcast only fails."""
    tree = set_at(good_tree(), "pools.gateways.backends[1].address", address)
    assert problems_of(tree, base_dir) == {"pools.gateways.backends[1].address": message}


@pytest.mark.parametrize(("listener", "backend", "reached"), [
    ("127.0.0.1:9100", "127.0.0.1:9100", "127.0.0.1:9100"),
    ("0.0.0.0:9100", "127.0.0.9:9100", "0.0.0.0:9100"),  # a wildcard takes every loopback address
    ("127.0.0.1:9100", "LOCALHOST:9100", "127.0.0.1:9100"),
    ("localhost:9100", "[::1]:9100", "localhost:9100"),
    ("[::]:9100", "[::1]:9100", "[::]:9100"),
])
def test_a_backend_at_the_balancers_own_listener_is_refused(
    base_dir: Path, listener: str, backend: str, reached: str
) -> None:
    """Each request sent there would come back as a new one, until limits.max_connections is spent."""
    tree = good_tree()
    tree["listeners"].append({"bind": listener})
    tree = set_at(tree, "pools.gateways.backends[1].address", backend)
    assert problems_of(tree, base_dir) == {
        "pools.gateways.backends[1].address": f"{backend} reaches this balancer's own listener {reached}: "
                                              "each request sent there would come back as a new one",
    }


@pytest.mark.parametrize(("listener", "backend"), [
    ("127.0.0.1:9100", "127.0.0.2:9100"),  # another address: the listener does not take it
    ("[::]:9100", "127.0.0.1:9100"),  # every socket is IPV6_V6ONLY
    ("0.0.0.0:9100", "127.0.0.1:9101"),
    ("0.0.0.0:9100", "gateway.internal:9100"),  # a name is the start's business, not validate's
])
def test_a_backend_beside_the_balancers_listener_is_fine(base_dir: Path, listener: str, backend: str) -> None:
    tree = good_tree()
    tree["listeners"].append({"bind": listener})
    parse(set_at(tree, "pools.gateways.backends[1].address", backend), base_dir)
