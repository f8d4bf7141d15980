"""Pool and backend state: health counters, operator states, live connection counts.  [pure, in memory]

A backend's state combines two things kept apart on purpose: what health
checks say (healthy or not, with rise/fall hysteresis) and what an operator
asked for (drain, disable).  Callers read `state`, the combination.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from lb.affinity.balancing import LeastConn, RoundRobin, make_policy
from lb.config.model import HASHED_METHODS, BackendConfig, HealthCheckExpect, PoolConfig


class BackendState(StrEnum):
    UP = "up"
    DOWN = "down"              # failed health checks
    DRAINING = "draining"      # no new clients; cookie holders still reach it
    DISABLED = "disabled"      # nothing reaches it; cookie holders are redispatched


class AdminAction(StrEnum):
    ENABLE = "enable"
    DRAIN = "drain"
    DISABLE = "disable"


# The two read for every backend of every choice: compiled, a Final name is read where it is kept,
# where `AdminAction.ENABLE` is an attribute looked up on the class each time.
_ENABLE: Final = AdminAction.ENABLE
_DISABLE: Final = AdminAction.DISABLE


@dataclass(slots=True)
class BackendStatus:
    """The live view of one backend.  Mutated only on the event loop thread."""

    config: BackendConfig
    healthy: bool = True  # HAProxy's default: servers start up and checks confirm it
    admin: AdminAction = AdminAction.ENABLE
    reason: str = "initial state"
    successes: int = 0  # consecutive passed checks, toward `rise`
    failures: int = 0   # consecutive failed checks, toward `fall`
    # Consecutive handshakes it failed (passive health), toward `fall` too; only an answer from it
    # (or its coming back up) starts them again, never a passed check (`record_handshake_failure`).
    handshake_failures: int = 0
    changed_at: float = 0.0
    ramp_from: float | None = None  # when the backend came back: slow start runs from here
    effective_weight: float = 0.0  # weight after slow start; refreshed before each choice
    connections: int = 0
    migrating: bool = False  # a drain is closing its tunnels: cookie holders go elsewhere now
    # The backend's own health answer says `X-Backend-State: draining` (HAProxy's agent-check, simply).
    requested_drain: bool = False
    # What health said last (`_health_reason`), kept under an operator's reason: a down backend an
    # operator drains or enables is still down for this, and /status must say so (`apply_admin`).
    health_said: str = ""
    # config.id, copied once: read a dozen times per handshake, where a property is a call each.
    # A reload may swap `config`, always for one with the same id (backends are matched by id).
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.config.id

    @property
    def weight(self) -> float:
        # A float on every path: read for each candidate of each choice, and `effective_weight or
        # config.weight` (a float or an int) was boxed and unboxed, compiled: about 200 instructions.
        effective = self.effective_weight
        return effective if effective else float(self.config.weight)

    @property
    def full(self) -> bool:
        limit = self.config.max_connections
        return limit is not None and self.connections >= limit

    @property
    def state(self) -> BackendState:
        if self.admin is AdminAction.DISABLE:
            return BackendState.DISABLED
        if not self.healthy:
            return BackendState.DOWN
        if self.admin is AdminAction.DRAIN or self.requested_drain:
            return BackendState.DRAINING
        return BackendState.UP

    @property
    def takes_new_clients(self) -> bool:
        return self.healthy and self.admin is _ENABLE and not self.requested_drain and not self.full

    @property
    def takes_sticky_clients(self) -> bool:
        # A full backend sends even its own clients elsewhere (HAProxy's `option redispatch`).
        return self.healthy and self.admin is not _DISABLE and not self.full and not self.migrating


@dataclass(frozen=True, slots=True)
class StateChange:
    pool: str
    backend: str
    old: BackendState
    new: BackendState
    reason: str


@dataclass(slots=True)
class PoolState:
    """All backends of one pool, with its balancing policy."""

    config: PoolConfig
    backends: dict[str, BackendStatus] = field(default_factory=dict)
    policy: RoundRobin | LeastConn = field(init=False)
    name: str = field(init=False)  # config.name, copied once (read per handshake; never changes)
    slow_start: float = field(init=False)  # the ramp in force: none for a hash (see __post_init__)

    def __post_init__(self) -> None:
        if not self.backends:
            self.backends = {b.id: BackendStatus(config=b) for b in self.config.backends}
        self.policy = make_policy(self.config.balance)
        self.name = self.config.name
        # A ramp runs on each instance's own clock from when it saw the backend come back, so a
        # weight that ramps would send one key to different backends through different instances:
        # `balance: hash` and `source` promise the same backend everywhere (SPEC: /route).  HAProxy
        # ramps its dynamic algorithms only, too (lb.config.advice says the setting is ignored).
        ramps = self.config.balance not in HASHED_METHODS
        self.slow_start = self.config.slow_start if ramps else 0.0

    def get(self, backend_id: str) -> BackendStatus | None:
        return self.backends.get(backend_id)

    def new_client_candidates(self, exclude: Iterable[str] = (), now: float | None = None) -> list[BackendStatus]:
        """Backends that may take a new client, with slow-start weights refreshed for `now`."""
        if exclude:  # the backends this request already tried
            excluded = set(exclude)
            candidates = [b for b in self.backends.values() if b.takes_new_clients and b.id not in excluded]
        else:  # a first attempt (nearly all): no id to look up in an empty set, backend by backend
            candidates = [b for b in self.backends.values() if b.takes_new_clients]
        window = self.slow_start
        for backend in candidates:
            if backend.ramp_from is None:
                continue
            if window > 0 and now is not None:
                backend.effective_weight = _ramped_weight(backend, now, window)
            else:
                # A reload turned slow start off mid-ramp: the full weight applies at once.
                backend.effective_weight, backend.ramp_from = 0.0, None
        return candidates

    def record_probe(self, backend_id: str, ok: bool, now: float, detail: str) -> StateChange | None:
        """Count one health probe (active or passive); return the state change it caused, if any."""
        backend = self.backends[backend_id]
        old = backend.state
        check = self.config.health_check
        if ok:
            backend.failures = 0
            backend.successes += 1
            if not backend.healthy and backend.successes >= check.rise:
                backend.healthy = True
                backend.handshake_failures = 0
                said = f"health check passed {backend.successes} time(s)"
                if check.expect is HealthCheckExpect.ANY:
                    # What passed, for an operator who reads `up` beside a /health that answers 404.
                    said += f": {detail} (expect: any)"
                _health_reason(backend, said)
        else:
            backend.successes = 0
            backend.failures += 1
            if backend.healthy and backend.failures >= check.fall:
                backend.healthy = False
                _health_reason(backend, f"health check failed {backend.failures} time(s): {detail}")
            elif not backend.healthy:
                # Down already: the reason follows the latest failure, as HAProxy's last check status does
                # (the first one's detail stayed for as long as the backend was down, whatever it answered).
                _health_reason(backend, f"health check failed {backend.failures} time(s): {detail}")
        return self._change(backend, old, now)

    def record_handshake_failure(self, backend_id: str, now: float, detail: str) -> StateChange | None:
        """Count one handshake the backend failed (passive health); `fall` in a row take it down.

        Counted apart from the active checks: a gateway whose health endpoint answers while its
        WebSocket handshakes go unanswered passed a check between two failed handshakes, and with one
        counter for both it never went down (every other new client waited out backend_connect, for
        good).  An answer from it starts the count again (the connection sets it to 0).
        """
        backend = self.backends[backend_id]
        backend.handshake_failures += 1
        count = backend.handshake_failures
        if count < self.config.health_check.fall:
            return None
        return self.take_down(backend_id, now, f"handshake failed {count} time(s) in a row: {detail}")

    def take_down(self, backend_id: str, now: float, reason: str) -> StateChange | None:
        """Passive health's verdict (this process's, or a worker's through the owner): down until `rise`
        checks pass, as after failed checks."""
        backend = self.backends[backend_id]
        if not backend.healthy:
            return None
        old = backend.state
        backend.healthy = False
        backend.successes = 0
        _health_reason(backend, reason)
        return self._change(backend, old, now)

    def record_requested_state(self, backend_id: str, draining: bool, now: float) -> StateChange | None:
        """The backend's health answer asks to drain (or no longer does); an operator's disable still wins."""
        backend = self.backends[backend_id]
        if backend.requested_drain is draining:
            return None
        old = backend.state
        backend.requested_drain = draining
        # An operator's reason stays until the operator acts again, and a failed health check's while
        # the backend is down: the reason shown is the one in force.
        if backend.admin is AdminAction.ENABLE and backend.healthy:
            backend.reason = "backend asks to drain" if draining else "backend no longer asks to drain"
        return self._change(backend, old, now)

    def apply_admin(self, backend_id: str, action: AdminAction, now: float) -> StateChange | None:
        """An operator's drain, disable or enable."""
        backend = self.backends[backend_id]
        old = backend.state
        backend.admin = action
        backend.migrating = False
        backend.reason = reason_in_force(backend, f"operator: {action.value}", "; backend still asks to drain")
        return self._change(backend, old, now)

    def _change(self, backend: BackendStatus, old: BackendState, now: float) -> StateChange | None:
        new = backend.state
        if new is old:
            return None
        backend.changed_at = now
        if new is BackendState.UP and old in (BackendState.DOWN, BackendState.DISABLED):
            backend.ramp_from = now
        return StateChange(pool=self.name, backend=backend.id, old=old, new=new, reason=backend.reason)


def reason_in_force(backend: BackendStatus, word: str, drain_asked: str = "; backend asks to drain") -> str:
    """The reason /status shows once `word` (an operator's act, or what brought the backend back) is said
    of `backend`, with its `admin` already set: the one in force.  A disable is the operator's own (it wins
    over health); down, the health failure (a drain or an enable changes nothing of why: the state is
    `down` either way, and until the next check, an `interval` away, /status named the act); enabled yet
    draining because the backend asks to, `word` and `drain_asked`."""
    if backend.admin is not AdminAction.DISABLE and not backend.healthy and backend.health_said:
        return backend.health_said
    if backend.admin is AdminAction.ENABLE and backend.requested_drain:
        return word + drain_asked
    return word


def _health_reason(backend: BackendStatus, said: str) -> None:
    """After a health transition, the reason /status shows is the one in force: an operator's disable
    keeps its own (it wins over health); back up, a drain (the operator's or the backend's) is named."""
    backend.health_said = said
    if backend.admin is AdminAction.DISABLE:
        return
    if backend.healthy and backend.admin is AdminAction.DRAIN:
        said += "; operator: drain"
    elif backend.healthy and backend.requested_drain:
        said += "; backend asks to drain"
    backend.reason = said


# Slow start never quite starts from zero: a lone backend back up must still take clients.
_RAMP_FLOOR = 0.05


def _ramped_weight(backend: BackendStatus, now: float, window: float) -> float:
    """HAProxy's slowstart: weight grows linearly over `window` after the backend came back."""
    weight = float(backend.config.weight)
    if backend.ramp_from is None:
        return 0.0  # not ramping: `BackendStatus.weight` falls back to the configured weight
    progress = (now - backend.ramp_from) / window
    if progress >= 1.0:
        backend.ramp_from = None
        return 0.0
    return weight * max(_RAMP_FLOOR, progress)

