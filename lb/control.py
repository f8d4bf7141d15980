"""Messages between the owner process and its workers (`workers: N`), as JSON lines.  [pure]

The owner runs health checks and the admin API and holds the authoritative
backend states; workers accept clients and relay.  Owner → worker:

    {"op": "states", "pools": {pool: {id: {"healthy", "admin", "migrating", "ramp_from", "reason"}}}}
    {"op": "reload"}                                 re-read the config file (the owner validated it)
    {"op": "close_tunnels", "pool", "backend", "rate"}   a drain migration's share of this worker

Worker → owner:

    {"op": "ready"}                                  its listeners are bound
    {"op": "failure", "pool", "backend", "detail"}   a backend failed a handshake (passive health)
    {"op": "stats", ...}                             counters, every second, for /status and /metrics

Counters are cumulative per worker; the owner sums the latest report of each
live worker plus everything reported by workers that have since died, so a
restart never makes a Prometheus counter go backwards.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lb.context import ProxyContext, Stats
from lb.observations import Observations
from lb.pool import AdminAction, PoolState


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Raises ValueError for anything but a JSON object with an "op"."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("control message must be a JSON object with an op")
    return message


# -- backend states: owner → workers ----------------------------------------------


def states_message(pools: dict[str, PoolState]) -> dict[str, Any]:
    return {
        "op": "states",
        "pools": {
            pool.name: {
                backend.id: {
                    "healthy": backend.healthy,
                    "admin": backend.admin.value,
                    "migrating": backend.migrating,
                    "ramp_from": backend.ramp_from,
                    "reason": backend.reason,
                }
                for backend in pool.backends.values()
            }
            for pool in pools.values()
        },
    }


def apply_states(pools: dict[str, PoolState], message: dict[str, Any]) -> None:
    """Take the owner's view of every backend this worker also knows."""
    for pool_name, backends in message.get("pools", {}).items():
        pool = pools.get(pool_name)
        if pool is None:
            continue
        for backend_id, state in backends.items():
            backend = pool.get(backend_id)
            if backend is None:
                continue
            backend.healthy = bool(state["healthy"])
            backend.admin = AdminAction(state["admin"])
            backend.migrating = bool(state["migrating"])
            backend.ramp_from = state["ramp_from"]
            backend.reason = str(state["reason"])


# -- counters: workers → owner -------------------------------------------------------


def stats_message(ctx: ProxyContext) -> dict[str, Any]:
    stats = ctx.stats
    bytes_in, bytes_out = ctx.bytes_relayed()
    return {
        "op": "stats",
        "backends": {
            pool.name: {
                b.id: [b.connections, b.handshakes, b.affinity_hits, b.redispatches] for b in pool.backends.values()
            }
            for pool in ctx.pools.values()
        },
        "handshakes": [[*key, count] for key, count in stats.handshakes.items()],
        "decisions": [[*key, count] for key, count in stats.decisions.items()],
        "invalid_tokens": dict(stats.invalid_tokens),
        "rejected": {str(status): count for status, count in stats.rejected.items()},
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "tunnels_closed": stats.tunnels_closed,
        "tunnels": len(ctx.tunnels),
        "observations": ctx.observations.snapshot(),
    }


@dataclass(slots=True)
class _Totals:
    """Cumulative counters of one report, in summable form."""

    backends: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # pool, id, counter index
    stats: Stats = field(default_factory=Stats)
    tunnels: int = 0
    observations: Observations = field(default_factory=Observations)

    @classmethod
    def of(cls, report: dict[str, Any]) -> _Totals:
        totals = cls()
        for pool, backends in report.get("backends", {}).items():
            for backend_id, counters in backends.items():
                for index, value in enumerate(counters):
                    totals.backends[(pool, backend_id, index)] = int(value)
        stats = totals.stats
        stats.handshakes.update({(p, b, o): int(n) for p, b, o, n in report.get("handshakes", [])})
        stats.decisions.update({(p, r): int(n) for p, r, n in report.get("decisions", [])})
        stats.invalid_tokens.update({str(k): int(n) for k, n in report.get("invalid_tokens", {}).items()})
        stats.rejected.update({int(k): int(n) for k, n in report.get("rejected", {}).items()})
        stats.closed_bytes_in = int(report.get("bytes_in", 0))
        stats.closed_bytes_out = int(report.get("bytes_out", 0))
        stats.tunnels_closed = int(report.get("tunnels_closed", 0))
        totals.tunnels = int(report.get("tunnels", 0))
        totals.observations = Observations.from_snapshot(report.get("observations"))
        return totals

    def add(self, other: _Totals, *, counters_only: bool = False) -> None:
        for key, value in other.backends.items():
            # Index 0 is live connections: a gauge, which a dead worker no longer has.
            if not (counters_only and key[2] == 0):
                self.backends[key] += value
        mine, theirs = self.stats, other.stats
        mine.handshakes.update(theirs.handshakes)
        mine.decisions.update(theirs.decisions)
        mine.invalid_tokens.update(theirs.invalid_tokens)
        mine.rejected.update(theirs.rejected)
        mine.closed_bytes_in += theirs.closed_bytes_in
        mine.closed_bytes_out += theirs.closed_bytes_out
        mine.tunnels_closed += theirs.tunnels_closed
        self.observations.merge(other.observations)
        if not counters_only:
            self.tunnels += other.tunnels


class StatsAggregate:
    """The owner's sum of what its workers report."""

    def __init__(self) -> None:
        self._latest: dict[int, _Totals] = {}
        self._departed = _Totals()  # counters of workers that died

    def update(self, worker: int, report: dict[str, Any]) -> None:
        self._latest[worker] = _Totals.of(report)

    def retire(self, worker: int) -> None:
        totals = self._latest.pop(worker, None)
        if totals is not None:
            self._departed.add(totals, counters_only=True)

    def apply_to(self, ctx: ProxyContext) -> int:
        """Write the sums into the owner's counters (read by /status and /metrics); returns live tunnels."""
        total = _Totals()
        total.add(self._departed)
        for totals in self._latest.values():
            total.add(totals)
        for pool in ctx.pools.values():
            for b in pool.backends.values():
                b.connections, b.handshakes, b.affinity_hits, b.redispatches = (
                    total.backends[(pool.name, b.id, index)] for index in range(4)
                )
        ctx.stats = total.stats
        ctx.observations.from_workers = total.observations
        return total.tunnels
