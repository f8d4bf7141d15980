"""Rendezvous (highest-random-weight) redispatch: a pinned client whose backend is gone picks a survivor by its
token's session, so every balancer instance agrees, the spread follows weights, and removing a backend only
moves the clients that had picked it.  Pure: keys are fixed bytes, no randomness."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import pytest

from lb.affinity.balancing import rendezvous_choose

N_KEYS = 30_000


@dataclass(frozen=True)
class Node:
    id: str
    weight: float = 1.0
    connections: int = 0


def keys(n: int = N_KEYS, salt: bytes = b"") -> list[bytes]:
    """Deterministic 8-byte session keys (the token's session is 8 random bytes)."""
    return [hashlib.sha256(salt + i.to_bytes(4, "big")).digest()[:8] for i in range(n)]


KEYS = keys()


def spread(candidates: list[Node], ks: list[bytes] = KEYS) -> Counter[str]:
    counts: Counter[str] = Counter()
    for key in ks:
        chosen = rendezvous_choose(key, candidates)
        assert chosen is not None
        counts[chosen.id] += 1
    return counts


def test_no_candidates_gives_none() -> None:
    assert rendezvous_choose(b"12345678", []) is None


def test_single_candidate_is_chosen() -> None:
    only = Node("gw-1")
    assert all(rendezvous_choose(k, [only]) is only for k in KEYS[:100])


def test_deterministic_and_independent_of_candidate_order() -> None:
    """Same key, same set → same backend, whatever order the config (or another instance) lists them in."""
    nodes = [Node(f"gw-{i}") for i in range(1, 6)]
    reordered = [nodes[3], nodes[0], nodes[4], nodes[2], nodes[1]]
    copies = [Node(n.id, n.weight, connections=99) for n in nodes]  # another instance's view: other loads
    for key in KEYS[:2000]:
        first = rendezvous_choose(key, nodes)
        assert first is not None
        assert rendezvous_choose(key, nodes) is first
        again = rendezvous_choose(key, reordered)
        assert again is not None and again.id == first.id
        elsewhere = rendezvous_choose(key, copies)
        assert elsewhere is not None and elsewhere.id == first.id, "live connection counts must not matter"


def test_different_keys_choose_different_backends() -> None:
    """The choice depends on the key: a handful of keys already reach every survivor."""
    nodes = [Node("gw-1"), Node("gw-2"), Node("gw-3")]
    assert len(spread(nodes, KEYS[:60])) == 3


def test_even_spread_over_three_survivors() -> None:
    """Equal weights: each survivor gets a third of 30k sessions, within ±1.5 points."""
    counts = spread([Node("gw-1"), Node("gw-2"), Node("gw-3")])
    for node_id, count in counts.items():
        assert abs(count / N_KEYS - 1 / 3) < 0.015, f"{node_id}: {count} of {N_KEYS} ({dict(counts)})"


@pytest.mark.parametrize("weights", [(1, 2, 3), (1, 1, 4), (5, 1), (3, 3, 1, 1)])
def test_weighted_spread_follows_weights(weights: tuple[int, ...]) -> None:
    """Share of sessions ≈ weight / total weight (within ±1.5 points over 30k keys)."""
    nodes = [Node(f"gw-{i}", weight=w) for i, w in enumerate(weights, start=1)]
    counts = spread(nodes)
    total = sum(weights)
    for node in nodes:
        share = counts[node.id] / N_KEYS
        assert abs(share - node.weight / total) < 0.015, f"{node.id} w={node.weight}: {share:.3f} ({dict(counts)})"


def test_fractional_weights_work() -> None:
    """Slow start gives fractional effective weights; the spread still follows them."""
    nodes = [Node("gw-1", weight=0.25), Node("gw-2", weight=1.0)]
    share = spread(nodes)["gw-1"] / N_KEYS
    assert abs(share - 0.2) < 0.015


@pytest.mark.parametrize("removed", ["gw-1", "gw-3", "gw-4"])
def test_removing_one_candidate_moves_only_its_keys(removed: str) -> None:
    """Clients of the remaining backends stay where they are; the removed one's clients spread over the rest."""
    nodes = [Node(f"gw-{i}", weight=w) for i, w in enumerate((1, 2, 1, 1), start=1)]
    survivors = [n for n in nodes if n.id != removed]
    moved: Counter[str] = Counter()
    for key in KEYS:
        before = rendezvous_choose(key, nodes)
        after = rendezvous_choose(key, survivors)
        assert before is not None and after is not None
        if before.id == removed:
            moved[after.id] += 1
        else:
            assert after.id == before.id, f"key {key.hex()} moved from {before.id} to {after.id}"
    # The displaced keys follow the survivors' weights too.
    total = sum(n.weight for n in survivors)
    displaced = sum(moved.values())
    assert displaced > 1000
    for node in survivors:
        assert abs(moved[node.id] / displaced - node.weight / total) < 0.05, dict(moved)


def test_adding_a_candidate_takes_only_its_share() -> None:
    """A new backend takes about its share of sessions, all of them from others; nobody else moves."""
    nodes = [Node("gw-1"), Node("gw-2"), Node("gw-3")]
    grown = [*nodes, Node("gw-4")]
    taken = 0
    for key in KEYS:
        before = rendezvous_choose(key, nodes)
        after = rendezvous_choose(key, grown)
        assert before is not None and after is not None
        if after.id == "gw-4":
            taken += 1
        else:
            assert after.id == before.id
    assert abs(taken / N_KEYS - 0.25) < 0.015
