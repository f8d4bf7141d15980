"""Who gets an admin API connection (lb.control.admin_connections): counted by address, in all and per
address; at the cap, a flood's idle connection gives way to an address holding fewer.  No socket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lb.control.admin_connections import AdminConnections, address_key


def _idle(_connection: object) -> bool:
    return True


def test_an_address_past_its_share_is_refused_and_under_the_cap_everyone_gets_in() -> None:
    admitted = AdminConnections(limit=4, per_address=2)
    assert admitted.admit("a1", "10.0.0.1", _idle) == (None, None)
    assert admitted.admit("a2", "10.0.0.1", _idle) == (None, None)
    assert admitted.admit("a3", "10.0.0.1", _idle) == ("2 admin connections open from that address", None)
    assert admitted.admit("b1", "10.0.0.2", _idle) == (None, None)
    assert len(admitted) == 3


def test_at_the_cap_a_new_address_takes_the_place_of_the_oldest_idle_one_of_the_address_holding_most() -> None:
    admitted = AdminConnections(limit=4, per_address=3)
    for connection, address in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]:
        admitted.admit(connection, address, _idle)
    busy = {"a1"}  # a request in progress (an operator's drain): passed over while another is idle
    assert admitted.admit("probe", "kubelet", lambda c: c not in busy) == (None, "a2")
    assert len(admitted) == 4
    assert admitted.admit("c1", "c", _idle) == (None, "a1")  # a still holds 2 > 1: its oldest idle goes
    # Every address now holds as many as the new one's would with it: refused, nobody cut.
    assert admitted.admit("d1", "d", _idle) == ("4 admin connections open", None)


def test_a_flood_kept_busy_on_purpose_still_gives_way() -> None:
    """Pipelined requests whose answers are never read keep a connection "in progress" for good: the
    oldest of the address holding the most goes all the same, or such a flood held its places forever
    and refused every probe (a reviewer's case)."""
    admitted = AdminConnections(limit=2, per_address=2)
    admitted.admit("a1", "a", _idle)
    admitted.admit("a2", "a", _idle)
    assert admitted.admit("probe", "kubelet", lambda _c: False) == (None, "a1")


def test_a_closed_connection_leaves_the_counts_once() -> None:
    admitted = AdminConnections(limit=2, per_address=2)
    admitted.admit("a1", "a", _idle)
    admitted.remove("a1")
    admitted.remove("a1")  # closed after it was cut here: aiohttp's connection_lost comes later
    admitted.remove("never")
    assert len(admitted) == 0
    assert admitted.admit("a2", "a", _idle) == (None, None)


@given(st.lists(st.tuples(st.sampled_from([True, True, True, False]), st.integers(0, 5), st.integers(0, 40)),
                min_size=8, max_size=60))
def test_a_burst_stays_within_both_limits_and_only_the_fullest_address_gives_way(
    steps: list[tuple[bool, int, int]],
) -> None:
    """Connections accepted in one turn, closes late or never: what is counted stays within both limits,
    a cut one is no longer counted (a burst saw the same victim, still listed, and all got in), a new one
    is refused only when no address holds more than its own would, and the one cut is the oldest idle
    (else the oldest) of an address holding the most."""
    admitted = AdminConnections(limit=8, per_address=3)
    counted: dict[int, int] = {}  # connection → address, in the order admitted
    for index, (opens, address, which) in enumerate(steps):
        if opens:
            held = {a: [c for c, at in counted.items() if at == a] for a in set(counted.values())}
            mine = len(held.get(address, []))
            refused, evicted = admitted.admit(index, str(address), lambda c: c % 2 == 0)
            if refused is not None:
                full = mine >= 3 or (len(counted) >= 8 and max(map(len, held.values())) <= mine + 1)
                assert full and evicted is None, (refused, held, address)
                continue
            if evicted is not None:
                victims = held[counted[evicted]]  # type: ignore[index]
                assert len(victims) == max(map(len, held.values())) > mine + 1
                assert evicted == next((c for c in victims if c % 2 == 0), victims[0])
                del counted[evicted]  # type: ignore[arg-type]
            else:
                assert len(counted) < 8
            counted[index] = address
        elif counted:
            gone = sorted(counted)[which % len(counted)]
            admitted.remove(gone)
            del counted[gone]
        assert len(admitted) == len(counted) <= 8
        assert all(list(counted.values()).count(a) <= 3 for a in set(counted.values()))


def test_an_ipv6_peer_counts_by_its_64_and_an_ipv4_mapped_one_as_ipv4() -> None:
    assert address_key("2001:db8:1:2::7") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::7") != address_key("2001:db8:1:2::7")
    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1") == "10.0.0.1"
    assert address_key(None) == "-" and address_key("/run/lb.sock") == "/run/lb.sock"
