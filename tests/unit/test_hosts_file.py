"""`discovery.nameservers: []` is the system resolver (SPEC part 2), which answers a name /etc/hosts lists
from the file before DNS (NSS `hosts: files dns`): `lb.control.hosts_file`, and discovery through it."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import dns.resolver
from hypothesis import given
from hypothesis import strategies as st

from lb.config.model import DiscoveryConfig, DiscoveryType
from lb.control import discovery
from lb.control.hosts_file import MAX_ADDRESSES_PER_NAME, MAX_HOSTS_BYTES, RECHECK_EVERY, HostsFile, parse_hosts

HOSTS = """\
# comment line
127.0.0.1   localhost
::1         localhost ip6-localhost   # trailing comment
10.0.0.5    GW.Example.  gw-alias
10.0.0.5    gw.example
not-an-ip   broken.example
fe80::1%eth0 scoped.example
192.0.2.1
"""


def test_names_map_to_their_addresses_as_the_c_library_reads_them() -> None:
    table = parse_hosts(HOSTS)
    assert table["localhost"] == ("127.0.0.1", "::1")
    assert table["ip6-localhost"] == ("::1",)
    assert table["gw.example"] == ("10.0.0.5",), "case and a trailing dot do not matter; an address is listed once"
    assert table["gw-alias"] == ("10.0.0.5",)
    assert "broken.example" not in table and "scoped.example" not in table
    assert set(table) == {"localhost", "ip6-localhost", "gw.example", "gw-alias"}


_ADDRESS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),  # scoped: skipped
    st.text(st.characters(blacklist_categories=("Zs", "Cc")), min_size=1, max_size=12),  # mostly not an address
)
_NAME = st.from_regex(r"[A-Za-z0-9_.-]{1,16}", fullmatch=True)
_LINE = st.one_of(
    st.tuples(_ADDRESS, st.lists(_NAME, max_size=4), st.sampled_from(["", " # a comment", "#x"])),
    st.text(max_size=60).map(lambda text: (text, [], "")),  # anything at all, as one line
)


def _listed(address: str) -> bool:
    """An address line glibc would read: it parses, and carries no zone."""
    try:
        return not getattr(ipaddress.ip_address(address), "scope_id", None)
    except ValueError:
        return False


@given(st.lists(_LINE, max_size=12), st.sampled_from([" ", "\t", "  \t "]))
def test_any_text_gives_only_addresses_that_parse(lines: list[tuple[str, list[str], str]], gap: str) -> None:
    """Whatever the file holds: names lower-case without a trailing dot, each with its unscoped addresses
    that parse, listed once; and every name on a line whose address parses is found."""
    text = "\n".join(gap.join([address, *names]) + comment for address, names, comment in lines)
    table = parse_hosts(text)
    for name, addresses in table.items():
        assert name == name.lower() and not name.endswith(".") and addresses
        assert len(set(addresses)) == len(addresses) <= MAX_ADDRESSES_PER_NAME
        for address in addresses:
            assert _listed(address) and str(ipaddress.ip_address(address)) == address
    for address, names, _ in lines:
        if names and "\n" not in address and "\r" not in address and _listed(address):
            for name in names:
                assert name.lower().rstrip(".") in table, (name, text)


def test_the_file_is_reread_when_it_changes_and_missing_lists_nothing(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    now = [0.0]
    hosts = HostsFile(path, clock=lambda: now[0])
    assert hosts.addresses("localhost") == ()
    path.write_text("127.0.0.1 localhost\n")
    assert hosts.addresses("localhost") == (), "looked at once a second at most"
    now[0] += RECHECK_EVERY
    assert hosts.addresses("LOCALHOST.") == ("127.0.0.1",)
    path.write_text("127.0.0.2 localhost other\n")
    now[0] += RECHECK_EVERY
    assert hosts.addresses("localhost") == ("127.0.0.2",) and hosts.addresses("other") == ("127.0.0.2",)
    path.unlink()
    now[0] += RECHECK_EVERY
    assert hosts.addresses("localhost") == ()


def test_a_huge_file_is_read_no_further_than_its_cap_nor_the_line_it_cuts(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    line = "10.1.2.3 filler\n"
    path.write_text("10.9.9.9 first\n" + "1" * 7 + line * (2 * MAX_HOSTS_BYTES // len(line)) + "10.9.9.8 last\n")
    hosts = HostsFile(path)
    assert hosts.addresses("first") == ("10.9.9.9",) and hosts.addresses("last") == ()
    assert hosts.addresses("filler") == ("10.1.2.3",)
    assert {name for name in ("f", "fi", "fil", "fill", "fille") if hosts.addresses(name)} == set(), "a cut name"


def test_a_name_keeps_its_first_addresses_up_to_the_cap() -> None:
    """60,000 lines of one name (a list searched per line took 16 s on the event loop; an ordered set per
    name and a cap make it linear and bounded)."""
    text = "".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} many\n" for i in range(60_000))
    table = parse_hosts(text + "10.0.0.0 many\n")
    assert len(table["many"]) == MAX_ADDRESSES_PER_NAME
    assert table["many"][:2] == ("10.0.0.0", "10.0.0.1") and len(set(table["many"])) == MAX_ADDRESSES_PER_NAME


def test_a_fifo_in_its_place_is_not_read(tmp_path: Path) -> None:
    """A read of a FIFO with no writer would block the event loop for good."""
    import os

    path = tmp_path / "hosts"
    os.mkfifo(path)
    assert HostsFile(path).addresses("localhost") == ()


def _system_resolver(hosts: HostsFile) -> discovery.ThreadedResolver:
    """The system resolver's shape with no nameserver to ask: a query that reached DNS would fail."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.lifetime = 0.5
    return discovery.ThreadedResolver(resolver, hosts)


def test_type_a_discovers_a_name_the_hosts_file_lists_without_asking_dns(tmp_path: Path) -> None:
    """`dns: localhost` found nothing (NXDOMAIN from resolv.conf's nameserver) where every program on the host
    finds 127.0.0.1."""
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n::1 localhost\n")
    config = DiscoveryConfig("localhost", type=DiscoveryType.A, port=9000, timeout=0.5)
    found, ttl = asyncio.run(discovery.lookup(config, _system_resolver(HostsFile(path))))
    assert sorted(b.id for b in found.backends) == ["127.0.0.1:9000", "[::1]:9000"]
    assert ttl is None and not found.failed


def test_an_srv_target_the_hosts_file_lists_takes_its_ipv4_address(tmp_path: Path) -> None:
    """As for a target's DNS answers, IPv4 first (`a_decides`)."""
    path = tmp_path / "hosts"
    path.write_text("::1 gw-0.gateway.test\n127.0.0.9 gw-0.gateway.test\n")
    resolver = _system_resolver(HostsFile(path))
    found, ttl, failed = asyncio.run(discovery._addresses(resolver, "gw-0.gateway.test.", a_decides=True))
    assert (found, ttl, failed) == (["127.0.0.9"], None, None)


def test_configured_nameservers_are_asked_and_the_hosts_file_is_not() -> None:
    config = DiscoveryConfig("localhost", type=DiscoveryType.A, port=9000, timeout=0.5,
                             nameservers=(("127.0.0.1", 9),))
    assert discovery.make_resolver(config).hosts is None
    assert discovery.make_resolver(DiscoveryConfig("localhost", type=DiscoveryType.A, port=9000)).hosts is not None
