"""lb.state.pool.RemovedCounters: a backend that leaves and comes back under the same id counts on."""

from __future__ import annotations

from lb.config.model import BackendConfig
from lb.state.pool import BackendStatus, RemovedCounters


def backend(backend_id: str, handshakes: int = 0) -> BackendStatus:
    status = BackendStatus(config=BackendConfig(id=backend_id, host="127.0.0.1", port=1))
    status.handshakes, status.affinity_hits, status.redispatches = handshakes, handshakes // 2, handshakes // 3
    return status


def test_a_returning_backend_gets_the_counts_it_left_with_once() -> None:
    kept = RemovedCounters()
    kept.keep("p", backend("gw-1", 30))
    back = backend("gw-1")
    kept.restore("p", back)
    assert (back.handshakes, back.affinity_hits, back.redispatches) == (30, 15, 10)
    again = backend("gw-1")
    kept.restore("p", again)
    assert again.handshakes == 0, "restored once: the returned backend now counts for itself"


def test_counts_are_per_pool_and_id() -> None:
    kept = RemovedCounters()
    kept.keep("p", backend("gw-1", 30))
    for pool, backend_id in (("q", "gw-1"), ("p", "gw-2")):
        other = backend(backend_id)
        kept.restore(pool, other)
        assert other.handshakes == 0


def test_a_backend_that_came_back_as_itself_is_forgotten() -> None:
    """A retired backend (its tunnels still running) returns as the same object, with its own current counts."""
    kept = RemovedCounters()
    kept.keep("p", backend("gw-1", 30))
    kept.forget("p", "gw-1")
    fresh = backend("gw-1")
    kept.restore("p", fresh)
    assert fresh.handshakes == 0


def test_only_the_most_recently_removed_are_kept() -> None:
    """Ids that churn (A records of pods that move) cost a bounded amount."""
    kept = RemovedCounters(limit=3)
    for index in range(10):
        kept.keep("p", backend(f"gw-{index}", index + 1))
    kept.keep("p", backend("gw-7", 70))  # removed again: the newest, with its latest counts
    restored = {}
    for index in range(10):
        status = backend(f"gw-{index}")
        kept.restore("p", status)
        restored[index] = status.handshakes
    assert restored == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 70, 8: 9, 9: 10}
