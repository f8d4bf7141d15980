"""Config keys for the real client address: `listeners[].proxy_protocol` (and `proxy_protocol_from`) and
`trusted_proxies` (SPEC part 2)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from lb.config.load import parse_config
from lb.config.model import Config
from lb.errors import ConfigError
from lb.http.client_address import TrustedProxies, client_address

KEY = "k" * 43


def tree(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "listeners": [{"bind": "127.0.0.1:8080"}, {"bind": "127.0.0.1:8081"}],
        "affinity": {"secret_keys": [KEY]},
        "routes": [{"path_prefix": "/", "pool": "p"}],
        "pools": {"p": {"backends": [{"id": "a", "address": "127.0.0.1:1"}]}},
    }
    base.update(extra)
    return base


def parse(value: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    return parse_config(yaml.safe_dump(value), base_dir=Path("."), environ=environ or {})


def problems(value: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse(value, environ)
    return {p.path: p.message for p in info.value.problems}


def test_defaults_are_off_and_empty() -> None:
    """Without the keys: no PROXY protocol on any listener, and nobody's X-Forwarded-For is believed."""
    config = parse(tree())
    assert [listener.proxy_protocol for listener in config.listeners] == [False, False]
    assert config.trusted_proxies == ()


def test_proxy_protocol_per_listener() -> None:
    """`proxy_protocol: true` applies to its own listener only."""
    value = tree()
    value["listeners"][1]["proxy_protocol"] = True
    config = parse(value)
    assert [listener.proxy_protocol for listener in config.listeners] == [False, True]


def test_proxy_protocol_from_environment() -> None:
    """An expanded "${PP}" of "true" is a boolean, like every other boolean key."""
    value = tree()
    value["listeners"][0]["proxy_protocol"] = "${PP}"
    assert parse(value, {"PP": "true"}).listeners[0].proxy_protocol is True


@pytest.mark.parametrize("bad", ["yes-please", 1, "on", [True]])
def test_proxy_protocol_must_be_a_boolean(bad: object) -> None:
    """A non-boolean is a problem at its own key path."""
    value = tree()
    value["listeners"][1]["proxy_protocol"] = bad
    found = problems(value)
    assert list(found) == ["listeners[1].proxy_protocol"]
    assert "expected true or false" in found["listeners[1].proxy_protocol"]


def test_proxy_protocol_from_is_a_list_of_networks_per_listener() -> None:
    """`proxy_protocol_from`: the peers whose header is believed; absent, empty or null is any peer."""
    value = tree()
    value["listeners"][0].update(proxy_protocol=True, proxy_protocol_from=["10.0.0.0/8", "::ffff:192.0.2.9"])
    value["listeners"][1].update(proxy_protocol=True, proxy_protocol_from=None)
    config = parse(value)
    # An IPv4-mapped address is its IPv4 one, as a peer's address is compared.
    assert config.listeners[0].proxy_protocol_from == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.9/32")
    )
    assert config.listeners[1].proxy_protocol_from == ()
    value["listeners"][1]["proxy_protocol_from"] = []
    assert parse(value).listeners[1].proxy_protocol_from == ()


def test_proxy_protocol_from_without_proxy_protocol_is_a_problem() -> None:
    """Set on a listener that reads no header, it would do nothing: the operator meant something else."""
    value = tree()
    value["listeners"][1]["proxy_protocol_from"] = ["10.0.0.0/8"]
    found = problems(value)
    assert list(found) == ["listeners[1].proxy_protocol_from"]
    assert "proxy_protocol: true" in found["listeners[1].proxy_protocol_from"]


@pytest.mark.parametrize(
    ("bad", "path", "says"),
    [
        ("10.0.0.0/8", "listeners[0].proxy_protocol_from", "expected a list of CIDRs"),
        (["10.0.0.1/8"], "listeners[0].proxy_protocol_from[0]", "host bits"),
        ([7], "listeners[0].proxy_protocol_from[0]", "expected a CIDR"),
    ],
)
def test_a_bad_proxy_protocol_from_is_reported_at_its_path(bad: object, path: str, says: str) -> None:
    """Reported with the listener's other problems, each at its own path."""
    value = tree()
    value["listeners"][0].update(proxy_protocol=True, proxy_protocol_from=bad, backlog=0)
    found = problems(value)
    assert set(found) == {path, "listeners[0].backlog"}
    assert says in found[path]


def test_trusted_proxies_are_networks() -> None:
    """CIDRs and single addresses become networks the client-address logic uses directly."""
    config = parse(tree(trusted_proxies=["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"]))
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.1/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    trusted = TrustedProxies(config.trusted_proxies)
    assert client_address("10.1.1.1", ["198.51.100.7"], trusted) == "198.51.100.7"


def test_empty_and_null_trusted_proxies() -> None:
    """`trusted_proxies: []` or null is the default: trust nobody."""
    assert parse(tree(trusted_proxies=[])).trusted_proxies == ()
    assert parse(tree(trusted_proxies=None)).trusted_proxies == ()


def test_every_bad_cidr_is_reported_at_its_index() -> None:
    """Each bad entry is its own problem, keyed by its index, saying what is expected."""
    found = problems(tree(trusted_proxies=["10.0.0.0/8", "10.0.0.1/8", "example.com", 7, "10.0.0.0/40"]))
    assert set(found) == {"trusted_proxies[1]", "trusted_proxies[2]", "trusted_proxies[3]", "trusted_proxies[4]"}
    assert all("expected a CIDR" in message for message in found.values())
    # Host bits set: the two things it may have meant (nginx and HAProxy take the network, unsaid).
    assert found["trusted_proxies[1]"].endswith(
        "'10.0.0.1/8', which has host bits set: write 10.0.0.0/8 for the network, or 10.0.0.1/32 for the one address"
    )


@pytest.mark.parametrize("bad", ["10.0.0.0/8", {"cidr": "10.0.0.0/8"}, 8])
def test_trusted_proxies_must_be_a_list(bad: object) -> None:
    """A single string (a common slip) or a mapping is refused with the expected form."""
    found = problems(tree(trusted_proxies=bad))
    assert list(found) == ["trusted_proxies"]
    assert "expected a list of CIDRs" in found["trusted_proxies"]


def test_problems_are_collected_with_others() -> None:
    """Bad CIDRs are reported together with other problems in the same pass."""
    value = tree(trusted_proxies=["nope"])
    value["listeners"][0]["proxy_protocol"] = "maybe"
    assert set(problems(value)) == {"trusted_proxies[0]", "listeners[0].proxy_protocol"}


def test_unknown_listener_key_suggests_proxy_protocol() -> None:
    """A misspelt key is an unknown key with a suggestion, as elsewhere."""
    value = tree()
    value["listeners"][0]["proxy_protocl"] = True
    assert "did you mean 'proxy_protocol'" in problems(value)["listeners[0].proxy_protocl"]
