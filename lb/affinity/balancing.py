"""Balancing policies: which of the candidate backends takes a new client.  [pure]

The pool's policies (`RoundRobin`, `LeastConn`) choose among the pool's
`BackendStatus`es (id, weight, live connections) and keep only their own small
state (round-robin position, last picks).  The class itself, not a protocol:
compiled, reading a candidate's fields is then a load each, where through a
protocol it was an attribute lookup each (13 a handshake: 2 % of its work).
`lb.state.pool` imports this module, so the name is only imported for the type.

`balance: source` and `balance: hash` keep no state at all: a key (the client
address, or the `hash_key` value) picks a backend by weighted rendezvous
hashing (`rendezvous_choose`), so every balancer instance with the same
config and health view answers the same, and a backend leaving moves only
the keys that were on it.  A request without a key falls back to least_conn
(`make_policy` returns it as the pool's fallback).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from lb.config.model import BalanceMethod
from lb.http.client_address import unmapped

if TYPE_CHECKING:
    from lb.state.pool import BackendStatus


class Candidate(Protocol):
    """What `hash_choose` and `rendezvous_choose` read of a candidate (they run on a failure or a
    keyed request, with candidates of any kind: a pool's backends, a test's or `/route`'s)."""

    @property
    def id(self) -> str: ...
    @property
    def weight(self) -> float: ...


C = TypeVar("C", bound=Candidate)


class RoundRobin:
    """Smooth weighted round robin (nginx's): weights 5,1,1 give a a b a c a a, not a a a a a b c."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, candidates: list[BackendStatus]) -> BackendStatus | None:
        if not candidates:
            return None
        total = 0.0
        best: BackendStatus | None = None
        best_score = 0.0
        for candidate in candidates:
            score = self._current.get(candidate.id, 0) + candidate.weight
            self._current[candidate.id] = score
            total += candidate.weight
            if best is None or score > best_score:
                best, best_score = candidate, score
        assert best is not None
        self._current[best.id] = best_score - total
        return best


class LeastConn:
    """Fewest live connections per unit of weight; among the tied, the one picked least recently.

    Least recently picked, as HAProxy's leastconn requeues a picked server behind its equals.  Not
    "the next in turn among the tied": the set of tied backends changes with every pick, and a turn
    counter lined up with it.  Connections that overlap by one (a client opens its new WebSocket
    before it closes the old) always left the same two tied, and three backends took 75 / 1 / 74.
    """

    __slots__ = ("_picked", "_picks")

    def __init__(self) -> None:
        self._picks = 0
        self._picked: dict[str, int] = {}  # backend id -> number of the pick that last chose it

    def choose(self, candidates: list[BackendStatus]) -> BackendStatus | None:
        # One pass (this runs per handshake): the lowest load so far, the least recently picked on a tie.
        # The first candidate is read in it too, not once before it as well: some 400 instructions.
        # A list, not any Sequence: compiled, a list is indexed, where a Sequence is iterated through
        # the iterator protocol (an iterator made and a call per candidate).
        picked = self._picked
        best: BackendStatus | None = None
        best_load, best_pick = 0.0, 0
        for candidate in candidates:
            load = candidate.connections / candidate.weight
            if best is None or load < best_load:
                best, best_load, best_pick = candidate, load, picked.get(candidate.id, 0)
            elif load == best_load:
                pick = picked.get(candidate.id, 0)
                if pick < best_pick:
                    best, best_pick = candidate, pick
        if best is None:
            return None
        self._picks += 1
        picked[best.id] = self._picks
        if len(picked) > 2 * len(candidates) + 64:
            # Ids of backends gone by reload or discovery: keep only those still candidates.
            self._picked = {c.id: picked[c.id] for c in candidates if c.id in picked}
        return best


def make_policy(method: BalanceMethod) -> RoundRobin | LeastConn:
    """The pool's stateful policy; for source and hash pools, the fallback when a request has no key."""
    return RoundRobin() if method is BalanceMethod.ROUND_ROBIN else LeastConn()


def source_key(address: str) -> str | None:
    """The canonical spelling of a client address, so `::ffff:10.0.0.1` and `10.0.0.1` hash alike.

    Returns None for something that is not an IP address (the caller falls back).
    """
    # A link-local address's zone (`fe80::1%eth0`, as `ss` shows it) names our interface, not the
    # client: the data plane's client address has none (lb.http.client_address.peer_address), so a
    # `/route` key written with one must hash as that client does.  Only there: no other address
    # reaches the data plane with a zone (a zoned X-Forwarded-For hop is no address to it), so
    # `203.0.113.1%eth0` is no key, where hashing 203.0.113.1 named a backend its client never reaches.
    text, zoned, _ = address.strip().strip("[]").partition("%")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if zoned and not (ip.version == 6 and ip.is_link_local):
        return None
    return str(unmapped(ip))


def hash_key_text(value: str) -> str | None:
    """A `hash_key` value as both its readers hash it (a request's, `/route`'s `key`); None: no key.

    The spaces and tabs around it go: HTTP takes them off a header's value already, so a key
    given with them (`%20u1` to /route, `uid=%20u1` in a query) must hash as the header would.
    """
    return value.strip(" \t") or None


class BadKey(ValueError):
    """A key the admin API was given that its pool cannot hash; the text is a fixed reason (for a 400)."""


def admin_key(method: BalanceMethod, text: str) -> str:
    """A key given to the admin API (`/pools/{pool}/route`, `/lookup`), read as the data plane reads a
    request's: a client address for `balance: source`, a `hash_key` value for `balance: hash`.

    Raises:
        BadKey: not an address, or only spaces (as empty as no key).
    """
    if method is BalanceMethod.SOURCE:
        address = source_key(text)
        if address is None:
            raise BadKey("key must be an IP address for balance: source")
        return address
    value = hash_key_text(text)
    if value is None:
        raise BadKey("key: empty (only spaces)")
    return value


def hash_choose(key: str, candidates: Sequence[C]) -> C | None:
    """`balance: source`/`hash`: the backend for `key` (a client address or a hash_key value).

    A distinct prefix keeps these choices independent of session redispatch.
    """
    return rendezvous_choose(b"key\x00" + key.encode("utf-8", "surrogateescape"), candidates)


def rendezvous_choose(key: bytes, candidates: Sequence[C]) -> C | None:
    """Highest-random-weight choice: the same `key` and candidates give the same answer everywhere.

    Used to redispatch the clients of a failed backend: each client's session
    key picks a survivor, so they spread in proportion to weight, a player's
    tabs (one session) land together, and every balancer instance that shares
    the keys agrees without talking to the others.  Removing a candidate only
    moves the clients that had picked it.
    """
    best: C | None = None
    best_score = -1.0
    for candidate in candidates:
        digest = hashlib.blake2b(key + candidate.id.encode(), digest_size=8).digest()
        # Uniform in (0, 1]; -weight / ln(u) is weighted rendezvous (Schindelhauer & Schomaker).
        uniform = (int.from_bytes(digest, "big") + 1) / 2**64
        score = candidate.weight / -math.log(uniform) if uniform < 1.0 else math.inf
        if score > best_score:
            best, best_score = candidate, score
    return best
