"""DNS answers → backends (`lb.control.dns_backends`), and the config keys of part 2 this engineer owns:
`pools.X.discovery`, `${file:PATH}` and `workers: auto`.  No socket, no event loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lb.cli import main
from lb.config import sections
from lb.config.backend_address import OwnListeners
from lb.config.document import MAX_FILE_REFERENCE_BYTES
from lb.config.load import load_config, parse_config
from lb.config.model import BackendConfig, DiscoveryType
from lb.config.sections import _cgroup_cpu_quota, _cgroup_v1_cpu_quota, _usable_cpus
from lb.control.dns_backends import (
    MAX_UNUSABLE_KEPT,
    SrvRecord,
    claimants,
    cut_srv,
    diff,
    from_addresses,
    from_srv,
    next_lookup_in,
    pick_address,
    retry_lookup_in,
    srv_id,
)
from lb.control.metrics import config_hash
from lb.errors import ConfigError

KEY = "k" * 40
SERVICE = "gateway.game.svc.cluster.local"


# ----------------------------------------------------------------------------- SRV


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("gw-0.gateway.game.svc.cluster.local.", "gw-0"),
        ("gw-0.gateway.game.svc.cluster.local", "gw-0"),
        ("single", "single"),
        ("bad*label.example.", None),
        ("x" * 64 + ".example.", None),
        (".example.", None),
        ("-dash.example.", None),
        ("dash-.example.", None),
        ("a:b.example.", None),
        ("127.0.0.1.", None),
        ("::1", None),
        ("127", "127"),
    ],
)
def test_srv_id_is_the_first_label(target: str, expected: str | None) -> None:
    """The id is the target's first label, or None when that is not a valid backend id."""
    assert srv_id(target) == expected


def test_from_srv_ids_addresses_ports() -> None:
    """One backend per record: id from the target, address from its A record, port from the record."""
    records = [SrvRecord(f"gw-1.{SERVICE}.", 9001), SrvRecord(f"gw-0.{SERVICE}.", 9000)]
    addresses = {f"gw-0.{SERVICE}": ["10.0.0.5"], f"gw-1.{SERVICE}": ["10.0.0.6"]}
    found = from_srv(records, addresses, max_backends=10)
    assert found.backends == (
        BackendConfig("gw-0", "10.0.0.5", 9000),
        BackendConfig("gw-1", "10.0.0.6", 9001),
    )
    assert found.skipped == () and found.truncated == 0


def test_from_srv_does_not_depend_on_answer_order() -> None:
    """Every instance, whatever order DNS gives, builds the same set (unlike slot-named templates)."""
    records = [SrvRecord(f"gw-{i}.{SERVICE}.", 9000 + i) for i in range(5)]
    addresses = {f"gw-{i}.{SERVICE}": [f"10.0.0.{i + 1}"] for i in range(5)}
    forward = from_srv(records, addresses, max_backends=10)
    backward = from_srv(list(reversed(records)), addresses, max_backends=10)
    assert forward == backward


def test_from_srv_skips_invalid_duplicate_unresolved_and_reserved() -> None:
    """Bad ids, duplicate ids, targets without address and ids of static backends are skipped, with reasons."""
    records = [
        SrvRecord("bad*name.example.", 1),
        SrvRecord("gw-0.a.example.", 2),
        SrvRecord("gw-0.b.example.", 3),  # the same first label: the id is taken
        SrvRecord("gw-9.a.example.", 4),  # no address
        SrvRecord("static.a.example.", 5),
    ]
    addresses = {"bad*name.example": ["10.0.0.1"], "gw-0.a.example": ["10.0.0.2"], "gw-0.b.example": ["10.0.0.3"],
                 "static.a.example": ["10.0.0.4"]}
    found = from_srv(records, addresses, max_backends=10, reserved_ids={"static"})
    assert [b.id for b in found.backends] == ["gw-0"]
    assert found.backends[0].host == "10.0.0.2"
    assert len(found.skipped) == 4
    assert any("not a valid backend id" in reason for reason in found.skipped)
    assert any("no A/AAAA address" in reason for reason in found.skipped)
    assert any("already taken" in reason for reason in found.skipped)


def test_from_srv_caps_a_huge_answer() -> None:
    """A huge answer is cut to max_backends (the same ones on every instance); the rest are counted."""
    records = [SrvRecord(f"gw-{i:05d}.{SERVICE}", 9000) for i in range(5000)]
    addresses = {f"gw-{i:05d}.{SERVICE}": ["10.1.0.1"] for i in range(5000)}
    found = from_srv(records, addresses, max_backends=100)
    assert len(found.backends) == 100 and found.truncated == 4900
    assert found.backends[0].id == "gw-00000"


JUNK = [SrvRecord(".", 9000), SrvRecord("127.0.0.1.", 9000), SrvRecord(f"-x.{SERVICE}.", 9000),
        SrvRecord(f"a-port-0.{SERVICE}.", 0)]  # sort before gw-*: never a backend, whatever they resolve to


def test_records_that_can_never_be_backends_take_no_place_under_max_backends() -> None:
    """Cut first, junk records (target ".", an IP address, a bad label, port 0) that sort before the valid ones
    left a pool with no backend although the answer named as many valid targets as max_backends allows."""
    valid = [SrvRecord(f"gw-{i}.{SERVICE}.", 9000) for i in range(3)]
    addresses = {r.target.rstrip("."): ["10.0.0.1"] for r in JUNK + valid}
    found = from_srv(JUNK + valid, addresses, max_backends=3)
    assert [b.id for b in found.backends] == ["gw-0", "gw-1", "gw-2"]
    assert len(found.skipped) == 4 and found.truncated == 0
    assert any("port 0 out of range" in reason for reason in found.skipped)
    # Said as it is, not "no A/AAAA address": a record on port 0 is never looked up.
    assert from_srv(JUNK[3:], {}, max_backends=3).skipped == (f"target 'a-port-0.{SERVICE}': port 0 out of range",)
    # A zone's "no service here" (target `.`) is named as the record has it: it read "target ''".
    assert from_srv(JUNK[:1], {}, max_backends=3).skipped == ("target '.': the service is not offered here (RFC 2782)",)


def test_cut_srv_counts_only_records_that_could_be_backends() -> None:
    valid = [SrvRecord(f"gw-{i}.{SERVICE}.", 9000) for i in range(5)]
    kept, cut = cut_srv(list(reversed(valid)) + JUNK, 2)
    assert [r.target for r in kept] == [r.target for r in sorted(JUNK + valid[:2], key=lambda r: (r.target, r.port))]
    assert cut == 3


def test_srv_id_of_addresses_and_names_alike_digits() -> None:
    """Only an IPv4 address is refused among first labels of digits."""
    assert srv_id("127.0.0.1") is None and srv_id("10.1.2.3.") is None
    assert srv_id("123.gw.example") == "123" and srv_id("1.2.3") == "1"


FAILED_GW1 = {f"gw-1.{SERVICE}": "no answer within 2s"}
LAST_KNOWN = (BackendConfig("gw-0", "10.0.0.5", 9000), BackendConfig("gw-1", "10.0.0.6", 9001, weight=3))


def test_from_srv_keeps_a_target_whose_lookup_failed_as_last_known() -> None:
    """A target whose address lookup failed keeps its last known address (same id): the diff shows no
    removal, so its cookie holders stay; the failure is reported.  Its port and weight are this answer's
    record's (an SRV record that moved the port is obeyed; only the address was not learnt)."""
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000), SrvRecord(f"gw-1.{SERVICE}.", 9001)]
    found = from_srv(records, {f"gw-0.{SERVICE}": ["10.0.0.5"]}, max_backends=10, failed=FAILED_GW1,
                     known=LAST_KNOWN)
    assert [(b.id, b.address) for b in found.backends] == [("gw-0", "10.0.0.5:9000"), ("gw-1", "10.0.0.6:9001")]
    assert not diff(LAST_KNOWN, found.backends).removed
    assert found.skipped == ()
    assert found.failed == (
        f"target 'gw-1.{SERVICE}': address lookup failed (no answer within 2s); kept gw-1 at 10.0.0.6:9001",
    )
    moved = [records[0], SrvRecord(f"gw-1.{SERVICE}.", 9002)]
    found = from_srv(moved, {f"gw-0.{SERVICE}": ["10.0.0.5"]}, max_backends=10, failed=FAILED_GW1,
                     known=LAST_KNOWN)
    assert found.backends[1].address == "10.0.0.6:9002"
    reweighed = [SrvRecord(f"gw-0.{SERVICE}.", 9000, weight=1), SrvRecord(f"gw-1.{SERVICE}.", 9001, weight=7)]
    found = from_srv(reweighed, {f"gw-0.{SERVICE}": ["10.0.0.5"]}, max_backends=10, failed=FAILED_GW1,
                     known=LAST_KNOWN)
    assert (found.backends[1].address, found.backends[1].weight) == ("10.0.0.6:9001", 7)


def test_from_srv_adds_a_never_seen_target_only_once_it_resolves() -> None:
    """A new target whose lookup failed is not added this round (nothing to keep), and that is reported."""
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000), SrvRecord(f"gw-1.{SERVICE}.", 9001)]
    found = from_srv(records, {f"gw-0.{SERVICE}": ["10.0.0.5"]}, max_backends=10, failed=FAILED_GW1,
                     known=LAST_KNOWN[:1])
    assert found.backends == LAST_KNOWN[:1]
    assert found.skipped == ()
    assert found.failed == (
        f"target 'gw-1.{SERVICE}': address lookup failed (no answer within 2s); not added until it resolves",
    )


def test_from_srv_drops_a_known_target_dns_says_has_no_address() -> None:
    """A definite answer (NXDOMAIN, no records: nothing in `failed`) drops the target even if it was known."""
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000), SrvRecord(f"gw-1.{SERVICE}.", 9001)]
    found = from_srv(records, {f"gw-0.{SERVICE}": ["10.0.0.5"]}, max_backends=10, known=LAST_KNOWN)
    assert found.backends == LAST_KNOWN[:1]
    assert found.skipped == (f"target 'gw-1.{SERVICE}': no A/AAAA address",)
    assert found.failed == ()
    assert [b.id for b in diff(LAST_KNOWN, found.backends).removed] == ["gw-1"]


def test_from_srv_a_failed_lookup_does_not_keep_a_target_gone_from_srv_or_a_taken_id() -> None:
    """Only targets still in the SRV answer are kept; a failed target whose id is taken is still skipped."""
    records = [SrvRecord(f"gw-1.{SERVICE}.", 9001)]
    found = from_srv(records, {}, max_backends=10, reserved_ids={"gw-1"}, failed=FAILED_GW1, known=LAST_KNOWN)
    assert found.backends == ()
    assert found.skipped == (f"target 'gw-1.{SERVICE}': id gw-1 is already taken",)
    assert found.failed == ()


def test_repeated_record_counts_once() -> None:
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000)] * 3
    found = from_srv(records, {f"gw-0.{SERVICE}": ["10.0.0.1"]}, max_backends=10)
    assert len(found.backends) == 1 and found.skipped == ()


@pytest.mark.parametrize(
    ("weights", "expected"),
    [((50, 50, 50), [1, 1, 1]), ((10, 20, 0), [10, 20, 1]), ((1000, 1), [256, 1]), ((256, 100), [256, 100]),
     ((1000, 3000), [85, 256]), ((300, 600, 0), [128, 256, 1]), ((65535, 1, 32768), [256, 1, 128]),
     ((2000, 3000), [171, 256])],
)
def test_srv_weights(weights: tuple[int, ...], expected: list[int]) -> None:
    """Equal SRV weights (Kubernetes) mean weight 1; different ones are kept as proportions (RFC 2782), those
    past 256 scaled so that the largest is 256: clamped, 1000 and 3000 were both 256, an even spread."""
    records = [SrvRecord(f"gw-{i}.x", 80, weight=w) for i, w in enumerate(weights)]
    found = from_srv(records, {f"gw-{i}.x": ["10.0.0.1"] for i in range(len(weights))}, max_backends=10)
    assert [b.weight for b in found.backends] == expected


def test_pick_address_prefers_ipv4_and_is_deterministic() -> None:
    assert pick_address(["fd00::1", "10.0.0.9", "10.0.0.2"]) == "10.0.0.2"
    assert pick_address(["fd00::2", "fd00::1"]) == "fd00::1"
    assert pick_address(["junk"]) is None


# ----------------------------------------------------------------------------- A/AAAA


def test_from_addresses_ids_are_ip_port() -> None:
    found = from_addresses(["10.0.0.2", "10.0.0.1", "10.0.0.1", "fd00::1", "nonsense"], port=8080, max_backends=10)
    assert [b.id for b in found.backends] == ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    assert found.backends[2].address == "[fd00::1]:8080"
    assert len(found.skipped) == 1


def test_from_addresses_caps() -> None:
    found = from_addresses([f"10.0.{i // 256}.{i % 256}" for i in range(1000)], port=1, max_backends=3)
    assert len(found.backends) == 3 and found.truncated == 997
    assert from_addresses(["10.0.0.1"], port=1, max_backends=3).truncated == 0, "fewer than the cap: none cut"


def test_from_addresses_leaves_a_static_backend_s_id_to_it() -> None:
    """An address whose `ip:port` id a static backend has is skipped, with why; the others are kept."""
    found = from_addresses(["10.0.0.1", "10.0.0.2"], port=8080, max_backends=10, reserved_ids=["10.0.0.1:8080"])
    assert [b.id for b in found.backends] == ["10.0.0.2:8080"]
    assert found.skipped == ("address 10.0.0.1: id 10.0.0.1:8080 is already taken",)


def test_from_srv_edges_of_a_record() -> None:
    """Port 65535 is a port; a target spelt in capitals or with the trailing dot is one target (its highest
    weight read); addresses are found under the name with or without its dot; backends come sorted by id
    (not by target); an IP address as a target is said to be one."""
    records = [
        SrvRecord("a.zz.", 65535, weight=1), SrvRecord("a-b.yy.", 9000, weight=1),
        SrvRecord("GW-1.example.", 9000, weight=10), SrvRecord("gw-1.example", 9000, weight=1),
        SrvRecord("10.0.0.9.", 9000),
    ]
    addresses = {"a.zz.": ["10.0.0.1"], "a-b.yy": ["10.0.0.2"], "gw-1.example": ["10.0.0.3"]}
    found = from_srv(records, addresses, max_backends=10)
    assert [(b.id, b.port, b.weight) for b in found.backends] == [("a", 65535, 1), ("a-b", 9000, 1), ("gw-1", 9000, 10)]
    assert found.skipped == ("target '10.0.0.9': an IP address, not a host name",)


def test_from_srv_weighs_only_the_records_that_name_their_backend() -> None:
    """A record whose id a static backend has takes no weight from those after it."""
    records = [SrvRecord("gw-1.a.", 9000, weight=5), SrvRecord("gw-2.a.", 9000, weight=10),
               SrvRecord("gw-3.a.", 9000, weight=20)]
    addresses = {f"gw-{i}.a": [f"10.0.0.{i}"] for i in (1, 2, 3)}
    found = from_srv(records, addresses, max_backends=10, reserved_ids=["gw-1"])
    assert [(b.id, b.weight) for b in found.backends] == [("gw-2", 10), ("gw-3", 20)]


NO_HOSTS = ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"]


def test_from_addresses_reads_a_mapped_address_as_ipv4_and_skips_those_no_gateway_listens_at() -> None:
    """A pod's A and IPv4-mapped AAAA records are one backend; 0.0.0.0 (this host), multicast and broadcast
    are none, each said once however often the answer repeats it."""
    found = from_addresses(["10.0.0.1", "::ffff:10.0.0.1", *NO_HOSTS, *NO_HOSTS], port=8080, max_backends=10)
    assert [b.id for b in found.backends] == ["10.0.0.1:8080"]
    assert found.skipped == (
        "address 0.0.0.0 is no host's address (connecting to it reaches this host)",
        "address :: is no host's address (connecting to it reaches this host)",
        "address 224.0.0.1 is a multicast address",
        "address ff02::1 is a multicast address",
        "address 255.255.255.255 is the broadcast address",
    )


OWN = OwnListeners((("0.0.0.0", 8080), ("::1", 8443)), is_local=lambda ip: ip.is_loopback or str(ip) == "10.0.0.7")


def test_from_addresses_skips_the_balancers_own_listener() -> None:
    """A name that resolves to the balancer itself (its own Service) would loop every request."""
    found = from_addresses(["10.0.0.7", "10.0.0.8", "::ffff:10.0.0.7"], port=8080, max_backends=10, own=OWN)
    assert [b.id for b in found.backends] == ["10.0.0.8:8080"]
    assert found.skipped == ("address 10.0.0.7:8080 reaches this balancer's own listener 0.0.0.0:8080: each "
                             "request sent there would come back as a new one",)
    assert len(from_addresses(["10.0.0.7"], port=8081, max_backends=10, own=OWN).backends) == 1


def test_from_srv_takes_a_mapped_address_as_ipv4_and_passes_over_unusable_ones() -> None:
    records = [SrvRecord(f"gw-{i}.{SERVICE}.", 8080) for i in range(3)]
    addresses = {f"gw-0.{SERVICE}": ["::ffff:10.0.0.5"], f"gw-1.{SERVICE}": NO_HOSTS,
                 f"gw-2.{SERVICE}": ["0.0.0.0", "10.0.0.6"]}
    found = from_srv(records, addresses, max_backends=10)
    assert [(b.id, b.address) for b in found.backends] == [("gw-0", "10.0.0.5:8080"), ("gw-2", "10.0.0.6:8080")]
    assert found.skipped == (f"target 'gw-1.{SERVICE}': no usable A/AAAA address",)


def test_from_srv_skips_a_target_at_the_balancers_own_listener() -> None:
    records = [SrvRecord(f"gw-0.{SERVICE}.", 8080), SrvRecord(f"lb-0.{SERVICE}.", 8080),
               SrvRecord(f"lb-1.{SERVICE}.", 8443)]
    addresses = {f"gw-0.{SERVICE}": ["10.0.0.5"], f"lb-0.{SERVICE}": ["10.0.0.7"], f"lb-1.{SERVICE}": ["::1"]}
    found = from_srv(records, addresses, max_backends=10, own=OWN)
    assert [b.id for b in found.backends] == ["gw-0"]
    assert found.skipped == (
        f"target 'lb-0.{SERVICE}': 10.0.0.7:8080 reaches this balancer's own listener 0.0.0.0:8080: each request "
        "sent there would come back as a new one",
        f"target 'lb-1.{SERVICE}': [::1]:8443 reaches this balancer's own listener [::1]:8443: each request "
        "sent there would come back as a new one",
    )


# ----------------------------------------------------------------------------- diff and timing


def test_diff_added_removed_changed() -> None:
    """The diff is by id: a moved pod (new address) is `changed`, not removed and added."""
    old = [BackendConfig("gw-0", "10.0.0.1", 80), BackendConfig("gw-1", "10.0.0.2", 80)]
    new = [BackendConfig("gw-0", "10.0.0.9", 80), BackendConfig("gw-2", "10.0.0.3", 80)]
    changes = diff(old, new)
    assert [b.id for b in changes.added] == ["gw-2"]
    assert [b.id for b in changes.removed] == ["gw-1"]
    assert [(b.id, b.host) for b in changes.changed] == [("gw-0", "10.0.0.9")]
    assert not diff(old, list(reversed(old)))
    reweighed = diff(old, [BackendConfig("gw-0", "10.0.0.1", 80, weight=3), old[1]])
    assert [(b.id, b.weight) for b in reweighed.changed] == [("gw-0", 3)], "a new weight is a change too"


@pytest.mark.parametrize(
    ("interval", "ttl", "expected"),
    [(5.0, None, 5.0), (5.0, 30.0, 5.0), (5.0, 2.0, 2.0), (5.0, 0.0, 1.0), (0.2, 0.0, 0.2)],
)
def test_next_lookup_honours_short_ttls_only(interval: float, ttl: float | None, expected: float) -> None:
    assert next_lookup_in(interval, ttl) == expected


@pytest.mark.parametrize(
    ("interval", "failing", "expected"),
    [(30.0, 1, 1.0), (30.0, 2, 2.0), (30.0, 3, 4.0), (30.0, 5, 16.0), (30.0, 6, 30.0), (30.0, 10_000, 30.0),
     (5.0, 1, 1.0), (5.0, 4, 5.0), (0.2, 1, 0.2)],
)
def test_a_failed_lookup_is_tried_again_sooner_backing_off_to_the_interval(
    interval: float, failing: int, expected: float
) -> None:
    assert retry_lookup_in(interval, failing) == expected


# ----------------------------------------------------------------------------- config


def base_tree(pool: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [{"bind": "127.0.0.1:8080"}],
        "affinity": {"secret_keys": [KEY]},
        "routes": [{"path_prefix": "/", "pool": "gateways"}],
        "pools": {"gateways": pool},
    }


def problems(tree: dict[str, Any], tmp_path: Path, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}, **kwargs)
    return {p.path: p.message for p in info.value.problems}


def test_discovery_alone_is_a_pool(tmp_path: Path) -> None:
    """A pool with only `discovery` is valid; defaults: srv, 5s, system resolver."""
    config = parse_config(yaml.safe_dump(base_tree({"discovery": {"dns": SERVICE}})), base_dir=tmp_path, environ={})
    pool = config.pools["gateways"]
    assert pool.backends == ()
    assert pool.discovery is not None
    assert (pool.discovery.type, pool.discovery.interval, pool.discovery.nameservers) == (DiscoveryType.SRV, 5.0, ())


@pytest.mark.parametrize("backends", [[], None], ids=["empty list", "null"])
def test_discovery_beside_an_empty_backends_list_is_a_pool(tmp_path: Path, backends: list[Any] | None) -> None:
    """SPEC: discovery "instead of (or besides)" a static list; a template emits `backends: []` for none, which
    was refused ("expected at least one backend") where the key left out passed."""
    tree = base_tree({"backends": backends, "discovery": {"dns": SERVICE}})
    pool = parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}).pools["gateways"]
    assert pool.backends == () and pool.discovery is not None


def test_an_empty_backends_list_without_discovery_is_still_refused(tmp_path: Path) -> None:
    assert problems(base_tree({"backends": []}), tmp_path) == {
        "pools.gateways.backends": "expected at least one backend"
    }


def test_discovery_full(tmp_path: Path) -> None:
    tree = base_tree({
        "backends": [{"id": "gw-static", "address": "127.0.0.1:9000"}],
        "discovery": {"dns": SERVICE, "type": "a", "port": 8080, "interval": "2s",
                      "nameservers": ["127.0.0.1:5353", "[::1]:53"]},
    })
    pool = parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}).pools["gateways"]
    assert pool.discovery is not None
    assert pool.discovery.nameservers == (("127.0.0.1", 5353), ("::1", 53))
    assert pool.discovery.port == 8080 and pool.discovery.interval == 2.0
    assert [b.id for b in pool.backends] == ["gw-static"]


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({}, {"pools.gateways.backends": "missing required key (a pool needs backends, a discovery, or both)"}),
        ({"discovery": {"type": "a", "dns": SERVICE}}, {"pools.gateways.discovery.port": "type a needs a port"}),
        # One bad key hides no other problem of the section: both are said at once.
        ({"discovery": {"type": "a", "dns": SERVICE, "interval": "fast"}},
         {"pools.gateways.discovery.port": "type a needs a port",
          "pools.gateways.discovery.interval": "expected a duration"}),
        ({"discovery": {"type": "a", "dns": SERVICE, "port": 0}},
         {"pools.gateways.discovery.port": "expected an integer from 1"}),
        ({"discovery": {"dns": "bad name!"}}, {"pools.gateways.discovery.dns": "expected a DNS name"}),
        ({"discovery": {"dns": SERVICE, "type": "mx"}}, {"pools.gateways.discovery.type": "expected one of"}),
        ({"discovery": {"dns": SERVICE, "nameservers": ["dns.example:53"]}},
         {"pools.gateways.discovery.nameservers[0]": "expected an IP address"}),
        ({"discovery": {"dns": SERVICE, "nameservers": "127.0.0.1:53"}},
         {"pools.gateways.discovery.nameservers": "expected a list"}),
        ({"discovery": {"dns": SERVICE, "intervall": "1s"}},
         {"pools.gateways.discovery.intervall": "did you mean 'interval'"}),
        ({"discovery": {}}, {"pools.gateways.discovery.dns": "missing required key"}),
    ],
)
def test_discovery_problems_name_the_key(tmp_path: Path, pool: dict[str, Any], expected: dict[str, str]) -> None:
    found = problems(base_tree(pool), tmp_path)
    assert set(found) == set(expected), found
    for path, fragment in expected.items():
        assert fragment in found[path], found


# ----------------------------------------------------------------------------- ${file:PATH} and workers: auto


def test_file_reference_reads_the_file_without_trailing_newline(tmp_path: Path) -> None:
    """`${file:PATH}`, relative to the config file, is the file's text minus its trailing newline."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cookie_key").write_text(KEY + "\n")
    (tmp_path / "token").write_text("tok-1")
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["affinity"]["secret_keys"] = ["${file:secrets/cookie_key}"]
    tree["admin"] = {"token": f"${{file:{tmp_path / 'token'}}}"}
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(tree))
    config = load_config(path, environ={})
    assert config.affinity.secret_keys == (KEY,)
    assert config.admin.token == "tok-1"
    # A rotated Secret: the next load (SIGHUP) sees the new content.
    (tmp_path / "token").write_text("tok-2\n")
    assert load_config(path, environ={}).admin.token == "tok-2"


def test_file_reference_errors_name_the_path_never_the_content(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"s" * (MAX_FILE_REFERENCE_BYTES + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe secret")
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["affinity"]["secret_keys"] = ["${file:missing/key}", f"${{file:{big}}}", f"${{file:{binary}}}"]
    found = problems(tree, tmp_path)
    assert found["affinity.secret_keys[0]"].startswith(f"cannot read file {tmp_path / 'missing' / 'key'}")
    assert found["affinity.secret_keys[1]"] == f"file {big} is larger than {MAX_FILE_REFERENCE_BYTES} bytes"
    assert found["affinity.secret_keys[2]"] == f"file {binary} is not UTF-8 text"
    assert "secret" not in " ".join(found.values()).replace("secret_keys", "")


def test_file_reference_mixes_with_text_and_env(tmp_path: Path) -> None:
    (tmp_path / "host").write_text("127.0.0.1")
    tree = base_tree({"backends": [{"id": "a", "address": "${file:host}:${PORT}"}]})
    config = parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={"PORT": "9001"})
    assert config.pools["gateways"].backends[0].address == "127.0.0.1:9001"


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (4, 4), (500, 64)])
def test_workers_auto_is_one_per_cpu(tmp_path: Path, cpus: int, expected: int) -> None:
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["workers"] = "auto"
    config = parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}, cpu_count=cpus)
    assert config.workers == expected


def test_workers_auto_hashes_as_written_not_as_this_machines_count(tmp_path: Path) -> None:
    """lb_build_info{config_hash}: replicas on nodes of different sizes run the same `workers: auto`
    (LbConfigDrift fired for ever between a 1- and a 2-CPU replica)."""
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["workers"] = "auto"

    def hashed(cpus: int) -> str:
        return config_hash(parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}, cpu_count=cpus))

    hashes = {hashed(cpus) for cpus in (1, 2, 16)}
    assert len(hashes) == 1
    tree["workers"] = 2
    written = {hashed(cpus) for cpus in (1, 2)}
    assert len(written) == 1 and written != hashes  # `auto` and a number are different configs


def test_default_backlog_hashes_as_written_not_as_this_hosts_somaxconn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lb_build_info{config_hash}: replicas on hosts whose net.core.somaxconn differ run the same file (the
    default backlog, max(somaxconn, 4096), was hashed as this host's number: LbConfigDrift for ever)."""
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})

    def hashed(somaxconn: int) -> tuple[str, int]:
        monkeypatch.setattr(sections, "default_backlog", lambda: somaxconn)
        config = parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={})
        return config_hash(config), config.listeners[0].backlog

    (one, backlog_one), (other, backlog_other) = hashed(4096), hashed(65535)
    assert (backlog_one, backlog_other) == (4096, 65535)  # each host still listens with its own default
    assert one == other
    # As any key written at its default: `backlog: 4096` hashes like none (it is the default where somaxconn is
    # 4096, Linux's own since 5.4); hashed as 0, it made the two files replicas with the same setting apart.
    tree["listeners"][0]["backlog"] = 4096
    assert {hashed(somaxconn)[0] for somaxconn in (4096, 65535)} == {one}
    tree["listeners"][0]["backlog"] = 8192
    written = {hashed(somaxconn)[0] for somaxconn in (4096, 65535)}
    assert len(written) == 1 and written != {one}  # another backlog in the file is another configuration


def test_workers_auto_without_override_uses_this_machine(tmp_path: Path) -> None:
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["workers"] = "auto"
    assert 1 <= parse_config(yaml.safe_dump(tree), base_dir=tmp_path, environ={}).workers <= 64


@pytest.mark.parametrize("value", ["many", 0, 65, True])
def test_workers_bad_values(tmp_path: Path, value: object) -> None:
    tree = base_tree({"backends": [{"id": "a", "address": "127.0.0.1:1"}]})
    tree["workers"] = value
    said = problems(tree, tmp_path)["workers"]
    assert "expected auto or an integer from 1 to 64" in said
    if value == "many":
        assert said.endswith("got str 'many'"), said  # written in the file: shown, as a number is


# ----------------------------------------------------------------------------- fuzz


# Any ASCII, or a host name's label (a few of them, so that targets repeat, and their edges: 63 and 64
# characters, a hyphen at an end, all digits).  Of random ASCII alone, 45% of answers made a backend and
# 10% more than `cap` of them.
_labels = st.one_of(
    st.text(alphabet=st.characters(codec="ascii"), min_size=0, max_size=70),
    st.sampled_from(["gw-0", "gw-1", "GW-1", "gw-2", "a" * 63, "a" * 64, "-gw", "gw-", "127", "x_y"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
)
_records = st.lists(
    st.builds(SrvRecord, target=st.builds(lambda a, b: f"{a}.{b}", _labels, _labels),
              port=st.integers(0, 70000), weight=st.integers(0, 65535), priority=st.integers(0, 65535)),
    max_size=40,
)


@given(_records, st.integers(1, 50) | st.integers(1, 4), st.lists(st.text(max_size=50), max_size=5))
def test_from_srv_never_crashes_and_keeps_its_promises(
    records: list[SrvRecord], cap: int, junk_addresses: list[str]
) -> None:
    """Whatever DNS sends: at most `cap` backends, valid unique ids, ports 1..65535, weights 1..256."""
    addresses = {r.target.lower().rstrip("."): ["10.0.0.1", *junk_addresses] for r in records}
    found = from_srv(records, addresses, max_backends=cap)
    assert len(found.backends) <= cap
    backend_ids = [b.id for b in found.backends]
    assert len(set(backend_ids)) == len(backend_ids)
    for backend in found.backends:
        assert srv_id(backend.id) == backend.id
        assert 1 <= backend.port <= 65535 and 1 <= backend.weight <= 256


@pytest.mark.parametrize(
    ("content", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("junk", None)],
)
def test_cgroup_cpu_quota(tmp_path: Path, content: str, expected: int | None) -> None:
    """workers: auto honours a container's CPU quota (cgroup v2 cpu.max), rounded up."""
    path = tmp_path / "cpu.max"
    path.write_text(content)
    assert _cgroup_cpu_quota(path) == expected
    assert _cgroup_cpu_quota(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1\n", "100000\n", None), ("200000\n", "100000\n", 2), ("150000", "100000", 2), ("50000", "100000", 1),
     ("junk", "100000", None), ("100000", "0", None)],
)
def test_cgroup_v1_cpu_quota(tmp_path: Path, quota: str, period: str, expected: int | None) -> None:
    """workers: auto honours a cgroup v1 CPU quota too (cpu.cfs_quota_us / cpu.cfs_period_us), rounded up."""
    (tmp_path / "cpu.cfs_quota_us").write_text(quota)
    (tmp_path / "cpu.cfs_period_us").write_text(period)
    assert _cgroup_v1_cpu_quota(tmp_path) == expected
    assert _cgroup_v1_cpu_quota(tmp_path / "absent") is None


@pytest.mark.parametrize("layout", ["v2", "v1", "v1-cpu-only", "none"])
def test_usable_cpus_capped_by_the_containers_quota(tmp_path: Path, layout: str) -> None:
    """A 1-CPU quota gives one worker under cgroup v2 and under v1 (a Kubernetes node still on v1 gave
    one worker per CPU of the node); without a quota, every CPU of the affinity mask."""
    if layout == "v2":
        (tmp_path / "cpu.max").write_text("100000 100000\n")
    elif layout.startswith("v1"):
        controller = tmp_path / ("cpu" if layout == "v1-cpu-only" else "cpu,cpuacct")
        controller.mkdir()
        (controller / "cpu.cfs_quota_us").write_text("100000\n")
        (controller / "cpu.cfs_period_us").write_text("100000\n")
        if layout == "v1":
            (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    expected = len(os.sched_getaffinity(0)) if layout == "none" else 1
    assert _usable_cpus(tmp_path) == expected


def test_lb_validate_names_the_unreadable_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lb validate` exits 2 and names the key path and the file of a missing ${file:} secret."""
    tree = base_tree({"discovery": {"dns": SERVICE}})
    tree["affinity"]["secret_keys"] = ["${file:keys/current}"]
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["validate", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"affinity.secret_keys[0]: cannot read file {tmp_path / 'keys' / 'current'}" in out + err
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "current").write_text(KEY)
    assert main(["validate", "--config", str(path)]) == 0


def test_records_that_can_never_be_backends_are_cut_past_max_backends_too() -> None:
    """Junk records take no place of a valid one, but are not kept without bound either: each is a reason in
    `skipped` at every lookup (a 64 KiB answer holds thousands of records with target `.`)."""
    junk = [SrvRecord(".", port) for port in range(1, 1001)]
    valid = [SrvRecord(f"gw-{i}.{SERVICE}.", 9000) for i in range(3)]
    kept, cut = cut_srv(junk + valid, 3)
    assert len(kept) == MAX_UNUSABLE_KEPT + 3 and cut == 1000 - MAX_UNUSABLE_KEPT
    found = from_srv(junk + valid, {r.target.rstrip("."): ["10.0.0.1"] for r in valid}, max_backends=3)
    assert [b.id for b in found.backends] == ["gw-0", "gw-1", "gw-2"]
    assert len(found.skipped) == MAX_UNUSABLE_KEPT and found.truncated == 1000 - MAX_UNUSABLE_KEPT


def test_a_repeated_record_takes_one_place_under_max_backends() -> None:
    """Made unique only after the cut, five copies of one record took the places of the targets after it."""
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000)] * 5 + [SrvRecord(f"gw-1.{SERVICE}.", 9000)]
    kept, cut = cut_srv(records, 2)
    assert [r.target for r in kept] == [f"gw-0.{SERVICE}.", f"gw-1.{SERVICE}."] and cut == 0


def test_a_target_whose_id_is_taken_takes_no_place_under_max_backends() -> None:
    """A target named as a static backend, or `gw-1` under two domains, is skipped as "already taken";
    counted against max_backends before that, it left the pool one backend short of what DNS named and
    counted a valid target as cut."""
    records = [SrvRecord(f"gw-{i}.{SERVICE}.", 9000) for i in range(4)] + [SrvRecord(f"gw-1.other.{SERVICE}.", 9000)]
    addresses = {r.target.rstrip("."): ["10.0.0.1"] for r in records}
    found = from_srv(records, addresses, max_backends=3, reserved_ids={"gw-0"})
    assert [b.id for b in found.backends] == ["gw-1", "gw-2", "gw-3"] and found.truncated == 0
    assert sorted(found.skipped) == [f"target 'gw-0.{SERVICE}': id gw-0 is already taken",
                                     f"target 'gw-1.other.{SERVICE}': id gw-1 is already taken"]
    _, cut = cut_srv([*records, SrvRecord(f"gw-4.{SERVICE}.", 9000)], 3, {"gw-0"})
    assert cut == 1  # gw-4: the one past max_backends


def test_a_record_that_names_no_backend_weighs_nothing() -> None:
    """Weights come from the records that name their backends: a static backend's record with another
    weight made every discovered backend's 10 where the answer gave them all the same (1 each)."""
    records = [SrvRecord(f"gw-0.{SERVICE}.", 9000, weight=5), SrvRecord(f"gw-1.{SERVICE}.", 9000, weight=50),
               SrvRecord(f"gw-2.{SERVICE}.", 9000, weight=50)]
    addresses = {r.target.rstrip("."): ["10.0.0.1"] for r in records}
    found = from_srv(records, addresses, max_backends=3, reserved_ids={"gw-0"})
    assert [(b.id, b.weight) for b in found.backends] == [("gw-1", 1), ("gw-2", 1)]


_LABELS = st.sampled_from(["gw-0", "gw-1", "gw-2", "gw-3", "static", "127", "bad_label", ""])
_RECORDS = st.lists(
    st.builds(SrvRecord, target=st.tuples(_LABELS, st.sampled_from(["a.svc.", "b.svc.", "."])).map("".join),
              port=st.sampled_from([0, 9000, 9001]), weight=st.integers(0, 300)),
    max_size=30,
)


@given(_RECORDS, st.integers(1, 4), st.randoms(use_true_random=False))
def test_every_instance_keeps_and_names_the_same_backends_whatever_the_answers_order(
    records: list[SrvRecord], max_backends: int, order: Any
) -> None:
    """The cut and the claims (an id is its first record's) depend on the answer, not on its order: two
    instances given it in different orders keep the same records, with the same weights, and the records
    that name a backend are at most max_backends, each id once, never a static backend's."""
    shuffled = list(records)
    order.shuffle(shuffled)
    kept, cut = cut_srv(records, max_backends, {"static"})
    assert (kept, cut) == cut_srv(shuffled, max_backends, {"static"})
    claims = claimants(kept, {"static"})
    named = [srv_id(r.target.lower().rstrip(".")) for r, claims_id in zip(kept, claims, strict=True) if claims_id]
    assert len(named) <= max_backends and len(set(named)) == len(named) and "static" not in named
    addresses = {r.target.lower().rstrip("."): ["10.0.0.1"] for r in records}
    forward = from_srv(records, addresses, max_backends=max_backends, reserved_ids={"static"})
    assert forward == from_srv(shuffled, addresses, max_backends=max_backends, reserved_ids={"static"})
