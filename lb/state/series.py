"""Which backends' metric series a process keeps: those its pools hold, and the last ones to leave.  [pure]

Counters are kept per (pool, backend id) for the process's life (`context.Stats`, `observations`), so
that a backend that leaves (DNS, a reload) and comes back counts on from where it left (SPEC: counters
never go backwards).  Kept for every id ever seen, a DNS answer that names new ids at every lookup (a
Deployment's pods renamed at each rollout, or a hostile server) grew /metrics and the heap without
bound: 17 KB to 1.1 MB of exposition in 25 s, and scrapes that stalled the event loop for 250 ms.

`SeriesRetention` keeps the series of the backends a pool holds now, and of the `departed_kept` that
left it last; the oldest departed beyond that are forgotten, and their series leave /metrics.  A
forgotten series is a stale series to Prometheus, not a counter going backwards; one that comes back
later starts again as a new series.  Per pool that is at most (static + `max_backends`) present and
as many departed: O(max_backends), whatever DNS says.  Everything that holds series filters by
`holds` (`Stats.forget`, `Observations.forget`, and the owner's sum of its workers' reports,
`lb.control.ipc.StatsAggregate`), so they all forget the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lb.config.model import PoolConfig

# Departed backends a pool keeps the series of, at least: a static pool of one or two backends
# replaced one reload at a time still keeps a few generations.
MIN_DEPARTED_KEPT = 16
# Pools a reload removed whose series (per pool, and of their departed backends) are kept: the last
# this many to leave.  Kept for good, pools renamed at every reload (`gateways-v41`, `-v42`: release
# names) grew /metrics by 3.7 KB and 50 series per reload, for the process's life.
REMOVED_POOLS_KEPT = 16


def departed_kept(pool: PoolConfig) -> int:
    """How many departed backends of `pool` keep their series: one whole set of backends (its static
    ones and a full DNS answer), so a rollout that replaces every pod, or a backend missing from one
    answer, still counts on; `MIN_DEPARTED_KEPT` at least."""
    most = len(pool.backends) + (pool.discovery.max_backends if pool.discovery is not None else 0)
    return max(MIN_DEPARTED_KEPT, most)


class SeriesRetention:
    """Per pool: the backend ids present now, and those departed, oldest first (bounded)."""

    __slots__ = ("_bounds", "_departed", "_present", "_removed")

    def __init__(self) -> None:
        self._present: dict[str, frozenset[str]] = {}
        self._removed: dict[str, None] = {}  # pools gone, oldest first (kept: the last REMOVED_POOLS_KEPT)
        # Insertion order is departure order: a dict is an ordered set with O(1) removal.
        self._departed: dict[str, dict[str, None]] = {}
        self._bounds: dict[str, int] = {}

    def update(self, present: Mapping[str, Iterable[str]], bounds: Mapping[str, int]) -> list[tuple[str, str]]:
        """The pools now hold these backend ids; forget the oldest departed beyond each pool's bound.

        Args:
            present: pool → ids whose series must stay (in the pool, or removed with tunnels still live).
                A pool missing here was removed: all its ids depart.
            bounds: pool → departed ids to keep (`departed_kept`); a removed pool keeps its last bound.

        Returns:
            The (pool, id) pairs forgotten by this update, oldest first.
        """
        forgotten: list[tuple[str, str]] = []
        for pool, before in self._present.items():
            departed = self._departed.setdefault(pool, {})
            for backend in sorted(before.difference(present.get(pool, ()))):  # sorted: a stable order
                departed[backend] = None
        for pool, ids in present.items():
            now = frozenset(ids)
            self._present[pool] = now
            self._removed.pop(pool, None)  # back: its series go on
            departed = self._departed.setdefault(pool, {})
            for backend in [backend for backend in now if backend in departed]:
                del departed[backend]  # back: present again, its counts go on
        for pool in [name for name in self._present if name not in present]:
            del self._present[pool]
            self._removed[pool] = None
        while len(self._removed) > REMOVED_POOLS_KEPT:
            oldest = next(iter(self._removed))
            del self._removed[oldest]
            forgotten.extend((oldest, backend) for backend in self._departed.pop(oldest, {}))
            self._bounds.pop(oldest, None)
        for pool, bound in bounds.items():
            self._bounds[pool] = bound
        for pool, departed in list(self._departed.items()):
            bound = self._bounds.get(pool, MIN_DEPARTED_KEPT)
            while len(departed) > bound:
                oldest = next(iter(departed))
                del departed[oldest]
                forgotten.append((pool, oldest))
            if not departed and pool not in self._present:
                del self._departed[pool]
                self._bounds.pop(pool, None)
        return forgotten

    def holds(self, pool: str, backend: str) -> bool:
        """Whether the series of `backend` in `pool` are kept (present or recently departed)."""
        present = self._present.get(pool)
        if present is not None and backend in present:
            return True
        departed = self._departed.get(pool)
        return departed is not None and backend in departed

    def holds_pool(self, pool: str) -> bool:
        """Whether the per-pool series of `pool` are kept (it is configured, or one of the last removed)."""
        return pool in self._present or pool in self._removed

    def departed_everywhere(self) -> list[tuple[str, str]]:
        """Every departed (pool, id) whose series are kept, each pool's oldest first (/metrics exports
        their last counts; the present ones it knows from the pools)."""
        return [(pool, backend) for pool, departed in self._departed.items() for backend in departed]

    def departed(self, pool: str) -> list[str]:
        """The departed ids of `pool` whose series are kept, oldest first."""
        return list(self._departed.get(pool, ()))
