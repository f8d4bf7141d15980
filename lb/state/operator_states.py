"""What operators said of discovered backends that DNS took away, given back when DNS brings them back.  [pure]

A discovered backend leaves its pool when its record leaves the answer: a Kubernetes headless Service
drops a pod while it fails readiness.  Back at the next answer, it was a new backend, `up`, whatever
an operator had said of it: a gateway disabled because it misbehaved took new clients again after one
blip of its readiness (HAProxy keeps a server's maintenance state on its slot through DNS changes).
One that kept a tunnel meanwhile came back as itself, still disabled: whether the operator's word
held depended on whether a tunnel happened to be open.  Bounded: past `limit`, the oldest is forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping

from lb.state.pool import AdminAction, BackendStatus, PoolState

OPERATOR_STATES_KEPT = 4096


class OperatorStates:
    __slots__ = ("_limit", "_said")

    def __init__(self, limit: int = OPERATOR_STATES_KEPT) -> None:
        self._limit = limit
        self._said: dict[tuple[str, str], AdminAction] = {}  # (pool, backend id) -> drain or disable

    def remember(self, pool: str, backend: BackendStatus) -> None:
        """`backend` left `pool`: keep what an operator said of it (nothing once enabled again)."""
        key = (pool, backend.id)
        self._said.pop(key, None)  # re-inserted last: the newest is the last forgotten
        if backend.admin is not AdminAction.ENABLE:
            self._said[key] = backend.admin
            if len(self._said) > self._limit:
                del self._said[next(iter(self._said))]

    def restore(self, pool: str, backend: BackendStatus) -> AdminAction | None:
        """`backend` is new in `pool`: give it what an operator said of it before it left, and return that."""
        action = self._said.pop((pool, backend.id), None)
        if action is not None:
            backend.admin = action
            backend.reason = f"operator: {action.value} (kept while it was out of DNS)"
        return action

    def keep_absent(self, pools: Mapping[str, PoolState]) -> None:
        """Forget what is kept for a backend its pool holds again (by whatever path: back as itself with the
        tunnels it kept, or re-added by a reload), and for pools that are gone: the word is on the backend
        now, or has nothing left to apply to.  Kept, it came back once more later: an operator's `enable`
        in between undone by a disable from before it."""
        self._said = {
            key: action for key, action in self._said.items()
            if key[0] in pools and key[1] not in pools[key[0]].backends
        }

    def __len__(self) -> int:
        return len(self._said)
