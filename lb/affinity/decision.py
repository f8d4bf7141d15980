"""The affinity decision: honour a valid token, or balance and issue a fresh one.  [pure]

Cookie and hash (`balance: source|hash`), when the healthy set changes:

- The cookie wins while its backend is up or draining: a pinned client
  stays with its session state even if the hash of its key now points
  elsewhere (a backend joined, or weights changed).
- A client without a usable pin goes where the hash says (`route_for_key`,
  the same answer `GET /pools/{pool}/route?key=K` gives), and is pinned there.
- A pinned client whose backend is down or disabled is redispatched by its
  key's hash too (not by its session), so it lands where /route says,
  and its new pin names that backend.
- A request without a key (no header, or no parseable client address) falls
  back to least_conn; its redispatch hashes the session, as in other pools.
- `sticky: false` on the pool: tokens are ignored and no cookie is issued,
  so the hash alone decides and /route is exact for every client (a push
  dispatcher's lookup), at the price of moving clients when the set changes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from lb.affinity.balancing import hash_choose, rendezvous_choose
from lb.config.model import HASHED_METHODS
from lb.errors import NoHealthyBackend
from lb.state.pool import AdminAction, BackendStatus, PoolState

# Also the `result` label of lb_affinity_decisions_total.
DecisionReason = Literal["hit", "new", "redispatch", "invalid"]


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class Decision:
    """Which backend serves this request, and whether the client needs a fresh cookie."""

    backend: BackendStatus
    reason: DecisionReason
    issue_cookie: bool

    def __init__(self, backend: BackendStatus, reason: DecisionReason, issue_cookie: bool) -> None:
        self.backend = backend
        self.reason = reason
        self.issue_cookie = issue_cookie


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
    balance_key: str | None = None,
) -> Decision:
    """Honour a token whose backend is up or draining; otherwise choose among backends taking new clients.

    Args:
        claimed: backend id from a valid token, or None.
        pool: the route's pool.
        session: the token's session key; a redispatch hashes it over the survivors (rendezvous),
            so every balancer instance sends this client to the same one.
        token_invalid: a token was present but could not be used (counted as "invalid").
        refresh: re-issue the cookie even on a hit (the token is past half its life, or an older key opened it).
        exclude: backends already tried for this request (they refused the connection).
        now: wall-clock time, for slow start and the redispatch grace window.
        grace: a backend that failed health checks less than this long ago keeps its
            clients' cookies: they are served elsewhere, and return when it is back.
        balance_key: `balance: source`: the client address; `balance: hash`: the hash_key
            value; None when the request has none (least_conn then).  Ignored by other pools.

    Raises:
        NoHealthyBackend: no backend can take a new client (the connection core answers 503).
    """
    hashed = balance_key is not None and pool.config.balance in HASHED_METHODS
    if not pool.config.pins:
        chosen = _require(_choose_new(pool, balance_key if hashed else None, exclude, now), pool)
        return Decision(backend=chosen, reason="new", issue_cookie=False)
    if claimed is not None:
        backend = pool.get(claimed)
        # The hit is the common case: it needs no candidate list.
        if backend is not None and backend.takes_sticky_clients and backend.id not in exclude:
            return Decision(backend=backend, reason="hit", issue_cookie=refresh)
        if backend is not None:
            if hashed:
                chosen = _require(_choose_new(pool, balance_key, exclude, now), pool)
            else:
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
    chosen = _require(_choose_new(pool, balance_key if hashed else None, exclude, now), pool)
    return Decision(backend=chosen, reason=reason, issue_cookie=True)


def route_for_key(pool: PoolState, key: str, now: float | None = None) -> BackendStatus | None:
    """Where a new client with `key` goes now in a source/hash pool (None: no backend takes new clients).

    A pure function of the key, the backends taking new clients and their weights: every
    instance with the same config and health view gives the same answer.
    """
    return hash_choose(key, pool.new_client_candidates((), now))


def _choose_new(
    pool: PoolState, key: str | None, exclude: Collection[str], now: float | None
) -> BackendStatus | None:
    candidates = pool.new_client_candidates(exclude, now)
    return hash_choose(key, candidates) if key is not None else pool.policy.choose(candidates)


def _require(chosen: BackendStatus | None, pool: PoolState) -> BackendStatus:
    if chosen is None:
        raise NoHealthyBackend(f"no healthy backend in pool {pool.name}")
    return chosen
