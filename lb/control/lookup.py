"""Session lookup: which gateway holds the session an affinity token names, now.  [pure]

`GET /lookup?token=T` (admin API, bearer) answers a push dispatcher's question:
where does a handshake carrying this token go right now?  Answer shapes:

    {"valid": true, "pool": P, "backend": ID, "state": S, "routes_to": ID | null,
     "issued_at": "2026-11-30T16:20:41Z", "expires_at": "2026-11-30T17:20:41Z"}
    {"valid": false, "reason": "expired" | "future" | "bad_mac" | "malformed" | "unknown_key" | "unknown_backend"
                      | "no_pin_for_pool"}

- `backend` is what the token names; `routes_to` is where a handshake carrying it
  goes now, after the redispatch rules: the same backend while it is up or
  draining, else the survivor rendezvous hashing picks from the token's
  session, which is what every balancer instance sharing the keys picks
  (`null` when no backend can take the client).  It runs the data path's own
  `lb.affinity.decision.decide`; a valid token always carries a session, so decide never
  calls a balancing policy's `choose` (which records its picks): the lookup changes nothing.
- In a `balance: source` or `hash` pool the data path hashes the client's key (its address, its
  `hash_key` value), not the session, wherever it balances: for a pin that no longer holds, and
  for every client of a pool without `sticky`.  The token does not carry that key, so there
  `routes_to` needs it (`&key=`, read as `/pools/{pool}/route` reads it); without one the answer
  is `"routes_to": null, "routes_by": "key"`, never a guess from the session.
- Times are ISO-8601 UTC with `Z`, to the second, truncated (as they always were; a token
  carries milliseconds, one of an earlier layout whole seconds): the second the token was issued
  in, and the second it expires in, never one after it.
- The token may be the whole affinity cookie value: with pins per pool it holds
  one pin per pool (`pin.pin`), and the answer is for the pool `?pool=` names,
  else for the first pin's that opens; of several pins for that pool, the
  youngest is answered for, as it is the one the data path routes by.  A pin
  sealed for a pool is looked up in that pool; a version-1 token names no pool:
  the first pool (in config order) with its backend id, or the one asked for
  with `?pool=`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.affinity.balancing import admin_key
from lb.affinity.carriers import MAX_PINS, PIN_SEPARATOR
from lb.affinity.codec import Claim, TokenCodec
from lb.affinity.decision import decide
from lb.config.model import HASHED_METHODS
from lb.errors import InvalidToken, NoHealthyBackend
from lb.log import iso_utc as log_iso_utc
from lb.state.pool import BackendStatus, PoolState


def lookup_token(
    token: str,
    codec: TokenCodec,
    pools: Mapping[str, PoolState],
    *,
    now: float,
    max_age: float,
    grace: float = 0.0,
    pool: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """The /lookup answer for `token`.

    Args:
        token: the affinity token as the client carries it (cookie value or header).
        codec: the running token codec (the same keys the data path opens with).
        pools: the running pools, with their live backend states.
        now: wall-clock seconds (expiry and the redispatch grace window).
        max_age: token lifetime in seconds (`affinity.max_age`), for `expires_at`.
        grace: `affinity.redispatch_grace`, as the data path uses it.
        pool: restrict the search to this pool (a token names a backend id, not a pool).
        key: the client's key as given (`&key=`): its address in a `source` pool, its `hash_key`
            value in a `hash` pool; ignored by other pools.

    Returns:
        A JSON-ready dict, `{"valid": false, "reason": ...}` for a token the data path would ignore.

    Raises:
        BadKey: `key` is not a key of the token's pool (not an address, or only spaces).
    """
    claim: Claim | None = None
    reason = "malformed"  # no pin at all (an empty value, or only separators)
    # The affinity cookie of a client using several pools carries one pin per pool (`a.b`); read it
    # as the data path does (lb.affinity.carriers.find_token): at most MAX_PINS of them, and of the
    # pins for the pool (`?pool=`, else the first pin's that opens) the youngest routes.
    wanted_pool = pool
    for index, pin in enumerate(token.split(PIN_SEPARATOR)[:MAX_PINS]):
        try:
            opened = codec.open(pin, now)
        except InvalidToken as exc:
            if index == 0:
                reason = exc.reason
            continue
        if wanted_pool is not None and not opened.for_pool(wanted_pool):
            # A valid pin for another pool: the data path makes a fresh choice in this one, as for no
            # cookie at all (not an invalid token), and nothing here is broken or forged.
            reason = "no_pin_for_pool"
            continue
        if claim is None or opened.issued_at > claim.issued_at:
            claim = opened
            wanted_pool = wanted_pool or opened.pool
    if claim is None:
        return {"valid": False, "reason": reason}
    # A pin sealed for a pool routes in that pool only (two pools may share backend ids); a
    # version-1 token names no pool: the first pool, in config order, with its backend.
    wanted = pool or claim.pool
    candidates = ([pools[wanted]] if wanted in pools else []) if wanted is not None else list(pools.values())
    state = next((p for p in candidates if p.get(claim.backend_id) is not None), None)
    if state is None:
        return {"valid": False, "reason": "unknown_backend"}
    backend = state.backends[claim.backend_id]
    balance_key = None
    if state.config.balance in HASHED_METHODS:
        if key is not None:
            balance_key = admin_key(state.config.balance, key)  # BadKey: the caller's 400
        elif not state.config.sticky or not backend.takes_sticky_clients:
            return _answer(claim, state, backend, max_age, None) | {"routes_by": "key"}  # the key decides
    try:
        # With a session (a valid token has one) or a key, decide hashes: it never calls a balancing
        # policy's `choose` (which records its picks), so the lookup changes nothing.
        routes_to: str | None = decide(
            claim.backend_id, state, session=claim.session, now=now, grace=grace, balance_key=balance_key
        ).backend.id
    except NoHealthyBackend:
        routes_to = None
    return _answer(claim, state, backend, max_age, routes_to)


def _answer(
    claim: Claim, state: PoolState, backend: BackendStatus, max_age: float, routes_to: str | None
) -> dict[str, Any]:
    return {
        "valid": True,
        "pool": state.name,
        "backend": backend.id,
        "state": backend.state.value,
        "routes_to": routes_to,
        "issued_at": iso_utc(claim.issued_at),
        "expires_at": iso_utc(claim.issued_at + max_age),
    }


def iso_utc(epoch: float) -> str:
    """ISO-8601 in UTC with a `Z`, to the second (truncated): 2026-11-30T16:20:41Z."""
    return log_iso_utc(epoch, millis=False)
