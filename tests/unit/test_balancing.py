"""Balancing policies: smooth weighted round robin and least connections per unit of weight."""

from __future__ import annotations

from collections import Counter

import pytest

from lb.affinity.balancing import LeastConn, RoundRobin, make_policy
from lb.config.model import BackendConfig, BalanceMethod
from lb.state.pool import BackendStatus


def backend(backend_id: str, weight: int = 1, connections: int = 0) -> BackendStatus:
    """A pool's view of a backend, as the policies get it (compiled, they take nothing else)."""
    status = BackendStatus(BackendConfig(id=backend_id, host="127.0.0.1", port=9000, weight=weight))
    status.connections = connections
    return status


def picks(policy: RoundRobin | LeastConn, candidates: list[BackendStatus], count: int) -> str:
    chosen = []
    for _ in range(count):
        backend = policy.choose(candidates)
        assert backend is not None
        chosen.append(backend.id)
    return "".join(chosen)


def test_round_robin_smooth_weighted_sequence() -> None:
    """Weights 5,1,1 give nginx's smooth order a a b a c a a, repeating, not a a a a a b c."""
    assert picks(RoundRobin(), [backend("a", 5), backend("b"), backend("c")], 14) == "aabacaa" * 2


def test_round_robin_even_weights_cycle() -> None:
    """Equal weights take turns in order."""
    assert picks(RoundRobin(), [backend("a"), backend("b"), backend("c")], 9) == "abc" * 3


@pytest.mark.parametrize("weights", [(1, 1, 1), (5, 1, 1), (3, 2), (1, 10), (4, 4, 1, 7)])
def test_round_robin_shares_follow_weights(weights: tuple[int, ...]) -> None:
    """Over one full cycle (sum of weights) each backend is picked exactly `weight` times."""
    backends = [backend(chr(ord("a") + i), w) for i, w in enumerate(weights)]
    counts = Counter(picks(RoundRobin(), backends, 10 * sum(weights)))
    assert counts == {b.id: 10 * b.weight for b in backends}


def test_round_robin_ignores_connections() -> None:
    """Round robin does not look at live connection counts."""
    backends = [backend("a", connections=100), backend("b")]
    assert picks(RoundRobin(), backends, 4) == "abab"


def test_least_conn_picks_least_loaded() -> None:
    """The backend with the fewest live connections takes the new client."""
    backends = [backend("a", connections=5), backend("b", connections=2), backend("c", connections=9)]
    policy = LeastConn()
    assert {picks(policy, backends, 1) for _ in range(6)} == {"b"}


def test_least_conn_divides_by_weight() -> None:
    """Load is connections per unit of weight: 6 on weight 3 is lighter than 3 on weight 1."""
    backends = [backend("a", weight=1, connections=3), backend("b", weight=3, connections=6)]
    policy = LeastConn()
    assert picks(policy, backends, 4) == "bbbb"


def test_least_conn_follows_changing_load() -> None:
    """As connections are counted, new clients fill the least loaded backend first."""
    backends = [backend("a", weight=2), backend("b", weight=1)]
    policy = LeastConn()
    for _ in range(30):
        chosen = policy.choose(backends)
        assert chosen is not None
        chosen.connections += 1
    assert (backends[0].connections, backends[1].connections) == (20, 10)


def test_least_conn_ties_rotate() -> None:
    """With 3 idle backends, 300 picks spread evenly (100 each)."""
    backends = [backend("a"), backend("b"), backend("c")]
    counts = Counter(picks(LeastConn(), backends, 300))
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_least_conn_never_picks_a_busier_backend() -> None:
    """While others are less loaded, a busier backend is never picked."""
    backends = [backend("a"), backend("b", connections=1), backend("c"), backend("d")]
    assert "b" not in picks(LeastConn(), backends, 300)


def test_least_conn_ties_spread_evenly_around_a_busier_backend() -> None:
    """Ties spread evenly among the equally least loaded even when a busier backend sits among them."""
    backends = [backend("a"), backend("b", connections=1), backend("c"), backend("d")]
    counts = Counter(picks(LeastConn(), backends, 300))
    assert counts == {"a": 100, "c": 100, "d": 100}


@pytest.mark.parametrize("backends", [2, 3, 4, 5])
def test_least_conn_spreads_connections_that_overlap_by_one(backends: int) -> None:
    """150 connections one after another, each opened just before the one before it closes: every backend
    takes its share.  Ties took turns by position among the tied, which lined up with the changing set of
    tied backends: three backends took 75 / 1 / 74."""
    pool = [backend(chr(ord("a") + i)) for i in range(backends)]
    policy = LeastConn()
    taken: Counter[str] = Counter()
    previous: BackendStatus | None = None
    for _ in range(150):
        chosen = policy.choose(pool)
        assert chosen is not None
        chosen.connections += 1
        taken[chosen.id] += 1
        if previous is not None:
            previous.connections -= 1
        previous = chosen
    share = 150 // backends
    assert all(share <= taken[b.id] <= share + 1 for b in pool), taken


@pytest.mark.parametrize("backends", [3, 4, 5])
def test_least_conn_keeps_clients_even_when_each_reconnects_before_closing(backends: int) -> None:
    """150 held clients each reconnect five times, opening the new WebSocket before closing the old: they
    stay spread evenly."""
    pool = [backend(chr(ord("a") + i)) for i in range(backends)]
    policy = LeastConn()
    holding: list[BackendStatus] = []
    for _ in range(150):
        chosen = policy.choose(pool)
        assert chosen is not None
        chosen.connections += 1
        holding.append(chosen)
    for _ in range(5):
        for client, old in enumerate(holding):
            new = policy.choose(pool)
            assert new is not None
            new.connections += 1
            old.connections -= 1
            holding[client] = new
    counts = [backend.connections for backend in pool]
    assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("policy", [RoundRobin(), LeastConn()], ids=["round_robin", "least_conn"])
def test_no_candidates_gives_none(policy: RoundRobin | LeastConn) -> None:
    """With no candidates, choose returns None (the caller answers 503)."""
    assert policy.choose([]) is None


@pytest.mark.parametrize("policy", [RoundRobin(), LeastConn()], ids=["round_robin", "least_conn"])
def test_single_candidate_always_chosen(policy: RoundRobin | LeastConn) -> None:
    """A lone candidate is always the choice."""
    assert picks(policy, [backend("only", weight=3, connections=7)], 5) == "only" * 5


@pytest.mark.parametrize("policy", [RoundRobin(), LeastConn()], ids=["round_robin", "least_conn"])
def test_choice_is_always_a_candidate(policy: RoundRobin | LeastConn) -> None:
    """When candidates change between calls (a backend goes down), only current candidates are chosen."""
    a, b, c = backend("a", 5), backend("b"), backend("c")
    for round_ in range(40):
        current = [a, b, c] if round_ % 3 else [b, c]
        assert policy.choose(current) in current


def test_make_policy() -> None:
    """The configured method picks its policy."""
    assert isinstance(make_policy(BalanceMethod.ROUND_ROBIN), RoundRobin)
    assert isinstance(make_policy(BalanceMethod.LEAST_CONN), LeastConn)


@pytest.mark.parametrize("effective", [0.0, 0.25, 3.5])
def test_a_backends_weight_is_a_float_its_ramp_or_its_configured_weight(effective: float) -> None:
    """What the policies divide and add: the slow start's weight while it ramps, else the configured one,
    a float either way (compiled and not alike: /status shows it as `effective_weight`)."""
    status = backend("a", weight=3)
    status.effective_weight = effective
    assert status.weight == (effective or 3) and type(status.weight) is float
