"""Backends gone from their pool (a reload, a DNS answer) whose tunnels may still run.  [pure, in memory]

A removed backend takes no new client, but its live tunnels stay; until they end it is still
counted (`/status` lists it `removed`, `lb_active_connections` counts it, and a reload or DNS
answer that brings it back gets the same object, with its count).  Which process knows the count
decides how long one is kept:

- one process (and each worker) counts its own tunnels: a backend removed at 0 is forgotten at once,
  and one with tunnels when they have ended;
- the owner of `workers: N` learns its workers' counts from their reports, once a second or when
  asked.  Its count at the removal may be 0 while a worker's tunnels, opened since that worker's last
  report, run on; forgotten then, the backend never appeared as `removed` and its tunnels counted
  nowhere.  So the owner retires every removed backend *provisionally*: it is kept whatever its count
  until a *fence* has settled, i.e. until every worker has sent a report made after the removal
  (`lb.control.workers`: the workers' report sequence), and from then on like any other, while its
  count is above 0.  A fence settles within a report round; a worker that answers nothing is killed
  and restarted within seconds, so what is kept stays bounded by the removals of those few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lb.state.pool import BackendStatus, PoolState

# A provisional entry whose fence is not set yet: the owner sets it once the change has reached its
# workers (after a reload's message to them), and until then no report can settle it.
UNFENCED = math.inf


@dataclass(slots=True)
class RetiredBackend:
    pool: str
    backend: BackendStatus
    # Kept whatever its count until reports up to this sequence number are summed (0: never, its count
    # is known at once; UNFENCED: not yet known which).
    fence: float = 0.0


class RetiredBackends:
    """The removed backends one process still counts, in the order they left."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[RetiredBackend] = []

    def __iter__(self) -> Iterator[tuple[str, BackendStatus]]:
        return iter([(entry.pool, entry.backend) for entry in self._entries])

    def __len__(self) -> int:
        return len(self._entries)

    def retire(self, pool: str, backend: BackendStatus, *, provisional: bool) -> None:
        """`backend` left `pool`.

        Args:
            provisional: its count is not known yet (the owner of workers): kept whatever it is until
                `fence` has been given and has settled.  Otherwise kept only while it has connections.
        """
        if provisional:
            self._entries.append(RetiredBackend(pool, backend, UNFENCED))
        elif backend.connections > 0:
            self._entries.append(RetiredBackend(pool, backend))

    def fence(self, seq: int) -> None:
        """The removals made so far have reached every worker: a report carrying `seq` or later was made
        after them."""
        for entry in self._entries:
            if entry.fence == UNFENCED:
                entry.fence = float(seq)

    def prune(self, settled: float) -> None:
        """Forget those whose tunnels have ended.

        Args:
            settled: the counts were summed from reports up to this sequence number from every worker
                (`math.inf` for a process that counts its own tunnels): a provisional entry whose fence
                is past it is kept, whatever its count.
        """
        self._entries = [e for e in self._entries if e.backend.connections > 0 or e.fence > settled]

    def drop_back(self, pools: Mapping[str, PoolState]) -> None:
        """Forget those `pools` hold again (`Balancer._merge_pool` reused the object): itself again, not also
        removed."""
        self._entries = [e for e in self._entries
                         if (pool := pools.get(e.pool)) is None or pool.backends.get(e.backend.id) is not e.backend]

    def of_pool(self, pool: str) -> dict[str, BackendStatus]:
        """The pool's removed backends by id (the first listed, should an id be there twice)."""
        found: dict[str, BackendStatus] = {}
        for entry in self._entries:
            if entry.pool == pool:
                found.setdefault(entry.backend.id, entry.backend)
        return found

    def find(self, pool: str, backend_id: str) -> BackendStatus | None:
        """The most recently removed backend `backend_id` of `pool`, if one is kept."""
        for entry in reversed(self._entries):
            if entry.pool == pool and entry.backend.id == backend_id:
                return entry.backend
        return None
