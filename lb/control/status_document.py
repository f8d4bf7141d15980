"""The /status document: pools, backends with their states and reasons, counters.  [asyncio shell]

Read from the running balancer (`lb.control.admin.Administered`) and served by /status, `lb ctl status`
and the console's no-JS snapshot.  `status_text` builds it a slice of backends at a time, letting the
loop run between slices: the data plane shares the loop, and 20,000 backends built at once held it
~190 ms an answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lb.config.model import host_port
from lb.state.context import BackendCounts
from lb.state.pool import BackendState, BackendStatus

if TYPE_CHECKING:
    from lb.control.admin import Administered

# Seconds of loop a /status render takes before it lets the loop run, as /metrics' (`Scrapes.TURN`): built
# whole, 20,000 backends held the loop ~190 ms an answer, and four pollers made handshakes wait ~400 ms.
STATUS_TURN = 0.002


async def status_text(balancer: Administered) -> str:
    """`status_document(balancer)` as JSON, its backends built and serialized `STATUS_TURN` at a time.

    The loop runs between turns, so a backend's state may change while the answer is built: each
    backend's entry is read whole, as /metrics reads each series whole (lb.control.exposition).
    """
    loop = asyncio.get_running_loop()
    turn_ends = loop.time() + STATUS_TURN
    pools = _pool_entries(balancer)
    listed: dict[str, list[str]] = {name: [] for name in pools}  # each pool's backends, each as JSON
    for name, document in _backend_entries(balancer):
        listed.setdefault(name, []).append(json.dumps(document))
        if loop.time() >= turn_ends:
            await asyncio.sleep(0)
            turn_ends = loop.time() + STATUS_TURN
    # The document around the lists, each list's JSON put in as it was made (a pool's entry is never empty).
    entries = (
        f"{json.dumps(name)}: {json.dumps(pools.get(name, _removed_pool()))[:-1]}, "
        f'"backends": [{", ".join(items)}]}}'
        for name, items in listed.items()
    )
    totals = _status_totals(balancer, {})
    del totals["pools"]
    return f'{{"pools": {{{", ".join(entries)}}}, {json.dumps(totals)[1:]}'


def status_document(balancer: Administered, max_backends: int | None = None) -> dict[str, Any]:
    """The /status document; with `max_backends`, only the first that many backends in /status's order
    (each pool's entry is there, its list maybe short: `backends_per_pool` says how many it has)."""
    pools = _pool_entries(balancer)
    for entry in pools.values():
        entry["backends"] = []
    entries = _backend_entries(balancer)
    for name, document in entries if max_backends is None else itertools.islice(entries, max_backends):
        pools.setdefault(name, _removed_pool())["backends"].append(document)
    return _status_totals(balancer, pools)


def backends_per_pool(balancer: Administered) -> dict[str, int]:
    """How many backends /status lists in each pool (those a reload removed, still draining, included)."""
    counts = {pool.name: len(pool.backends) for pool in balancer.ctx.pools.values()}
    for name, _ in balancer.retired_backends():
        counts[name] = counts.get(name, 0) + 1
    return counts


def _pool_entries(balancer: Administered) -> dict[str, dict[str, Any]]:
    """Each pool's /status entry but its backends, and one for each pool only removed backends are left of."""
    pools: dict[str, dict[str, Any]] = {
        pool.name: {
            "balance": pool.config.balance.value,
            "slow_start": pool.slow_start,  # in force: none with balance: hash or source
        }
        for pool in balancer.ctx.pools.values()
    }
    for name, entry in pools.items():  # DNS discovery: last_ok, last_error, ... (lb.control.discovery)
        discovery = balancer.discovery.status(name)
        if discovery is not None:
            entry["discovery"] = discovery
    for name, _ in balancer.retired_backends():
        pools.setdefault(name, _removed_pool())
    return pools


def _removed_pool() -> dict[str, Any]:
    return {"balance": None}


def _backend_entries(balancer: Administered) -> Iterator[tuple[str, dict[str, Any]]]:
    """(pool, backend's /status entry) for every backend, those a reload removed last.

    Which backends are listed is read at once, when called; each entry is built as the walk reaches it,
    so that `status_text` may let the loop run between two.  Read as the walk went, a backend that a
    reload or DNS removed mid-render was listed twice: in its pool, walked already, and again as removed.
    """
    counts = balancer.ctx.stats.backend_counts()
    members = [(pool.name, list(pool.backends.values())) for pool in balancer.ctx.pools.values()]
    retired = list(balancer.retired_backends())  # removed backends stay visible while their last tunnels run
    return _documents(members, retired, counts)


def _documents(
    members: list[tuple[str, list[BackendStatus]]], retired: list[tuple[str, BackendStatus]],
    counts: Mapping[tuple[str, str], BackendCounts],
) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, backends in members:
        for backend in backends:
            yield name, _backend_document(backend, counts.get((name, backend.id)))
    for name, backend in retired:
        document = _backend_document(backend, counts.get((name, backend.id)))
        # SPEC's four states: `disabled` is what it is (nothing new reaches it, its cookie holders go
        # elsewhere, its tunnels stay); `removed` says why it is not in the pool's list any more.
        yield name, {**document, "state": BackendState.DISABLED.value, "removed": True}


def _status_totals(balancer: Administered, pools: dict[str, Any]) -> dict[str, Any]:
    """The /status document around its `pools`."""
    ctx = balancer.ctx
    return {
        "pools": pools,
        "tunnels": balancer.live_tunnels(),
        "client_connections": ctx.client_connections(),  # handshakes in flight + tunnels
        "max_connections": ctx.config.limits.max_connections,
        "role": balancer.role.value,
        **_workers_document(balancer),
        "listeners": [host_port(host, port) for host, port in balancer.listen_addresses],
        "accepting": ctx.accepting,
        "shutting_down": balancer.shutting_down,  # from SIGTERM on: through shutdown_delay, accepting stays true
        "time": time.time(),
    }


def _workers_document(balancer: Administered) -> dict[str, Any]:
    """The owner's `"workers": {"count": N, "serving": n}` (serving: see `Balancer.not_ready`); nothing
    in a process without workers."""
    workers = balancer.workers_serving()
    if workers is None:
        return {}
    serving, count = workers
    return {"workers": {"count": count, "serving": serving}}


def _backend_document(b: BackendStatus, counted: BackendCounts | None) -> dict[str, Any]:
    counted = counted or BackendCounts()
    return {
        "id": b.id,
        "address": b.config.address,
        "weight": b.config.weight,
        "effective_weight": b.weight,
        "state": b.state.value,
        "reason": b.reason,
        "connections": b.connections,
        "max_connections": b.config.max_connections,
        "handshakes": counted.handshakes,
        "affinity_hits": counted.affinity_hits,
        "redispatches": counted.redispatches,
        "health": {"passing": b.healthy, "successes": b.successes, "failures": b.failures},
        "migrating": b.migrating,
        "removed": False,  # True: gone from the pool (reload, DNS), shown while its tunnels run
        "requested_state": "draining" if b.requested_drain else None,  # from X-Backend-State
        "changed_at": b.changed_at or None,
    }
