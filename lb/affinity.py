"""The affinity decision: honour a valid token, or balance and issue a fresh one.  [pure]"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from lb.balancing import rendezvous_choose
from lb.errors import NoHealthyBackend
from lb.pool import AdminAction, BackendStatus, PoolState

# Also the `result` label of lb_affinity_decisions_total.
DecisionReason = Literal["hit", "new", "redispatch", "invalid"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Which backend serves this request, and whether the client needs a fresh cookie."""

    backend: BackendStatus
    reason: DecisionReason
    issue_cookie: bool


def decide(
    claimed: str | None,
    pool: PoolState,
    *,
    session: bytes | None = None,
    token_invalid: bool = False,
    refresh: bool = False,
    exclude: Collection[str] = (),
    now: float | None = None,
    grace: float = 0.0,
) -> Decision:
    """Honour a token whose backend is up or draining; otherwise choose among backends taking new clients.

    Args:
        claimed: backend id from a valid token, or None.
        pool: the route's pool.
        session: the token's session key; a redispatch hashes it over the survivors (rendezvous),
            so every balancer instance sends this client to the same one.
        token_invalid: a token was present but could not be used (counted as "invalid").
        refresh: re-issue the cookie even on a hit (the token is past half its life).
        exclude: backends already tried for this request (they refused the connection).
        now: wall-clock time, for slow start and the redispatch grace window.
        grace: a backend that failed health checks less than this long ago keeps its
            clients' cookies: they are served elsewhere, and return when it is back.

    Raises:
        NoHealthyBackend: no backend can take a new client (the listener answers 503).
    """
    if claimed is not None:
        backend = pool.get(claimed)
        # The hit is the common case: it needs no candidate list.
        if backend is not None and backend.takes_sticky_clients and backend.id not in exclude:
            return Decision(backend=backend, reason="hit", issue_cookie=refresh)
        if backend is not None:
            candidates = pool.new_client_candidates(exclude, now)
            chosen = _require(
                rendezvous_choose(session, candidates) if session else pool.policy.choose(candidates), pool
            )
            flapping = (
                grace > 0 and now is not None and not backend.healthy
                and backend.admin is not AdminAction.DISABLE and now - backend.changed_at < grace
            )
            # A full backend (max_connections) is a passing condition too: keep the pin.
            keep_pin = flapping or (backend.full and backend.healthy and backend.admin is AdminAction.ENABLE)
            return Decision(backend=chosen, reason="redispatch", issue_cookie=not keep_pin)
        # A token naming a backend this pool does not have is as good as no token.
        reason: DecisionReason = "invalid"
    else:
        reason = "invalid" if token_invalid else "new"
    chosen = _require(pool.policy.choose(pool.new_client_candidates(exclude, now)), pool)
    return Decision(backend=chosen, reason=reason, issue_cookie=True)


def _require(chosen: BackendStatus | None, pool: PoolState) -> BackendStatus:
    if chosen is None:
        raise NoHealthyBackend(f"no healthy backend in pool {pool.name}")
    return chosen
