"""An operator's drain or disable of a discovered backend outlives its absence from DNS (`lb.state.operator_states`)."""

from __future__ import annotations

from lb.config.model import BackendConfig, PoolConfig
from lb.state.operator_states import OperatorStates
from lb.state.pool import AdminAction, BackendState, BackendStatus, PoolState


def backend(backend_id: str, admin: AdminAction = AdminAction.ENABLE) -> BackendStatus:
    status = BackendStatus(config=BackendConfig(backend_id, "127.0.0.1", 9000))
    status.admin = admin
    return status


def test_a_backend_back_from_dns_gets_what_the_operator_said_of_it_once() -> None:
    states = OperatorStates()
    states.remember("gateways", backend("gw-1", AdminAction.DISABLE))
    states.remember("gateways", backend("gw-2", AdminAction.DRAIN))
    back = backend("gw-1")
    assert states.restore("gateways", back) is AdminAction.DISABLE
    assert back.state is BackendState.DISABLED and back.reason == "operator: disable (kept while it was out of DNS)"
    assert states.restore("gateways", backend("gw-1")) is None  # given back once: it is on the backend now
    assert states.restore("other-pool", backend("gw-2")) is None  # per pool
    drained = backend("gw-2")
    assert states.restore("gateways", drained) is AdminAction.DRAIN and drained.state is BackendState.DRAINING


def test_an_enabled_backend_leaves_nothing_and_forgets_what_it_had() -> None:
    states = OperatorStates()
    states.remember("gateways", backend("gw-1", AdminAction.DISABLE))
    states.remember("gateways", backend("gw-1"))  # back, enabled, and gone again
    fresh = backend("gw-1")
    assert states.restore("gateways", fresh) is None and fresh.state is BackendState.UP
    assert len(states) == 0


def test_what_is_kept_is_bounded_the_oldest_forgotten_first() -> None:
    states = OperatorStates(limit=3)
    for n in range(5):
        states.remember("gateways", backend(f"gw-{n}", AdminAction.DISABLE))
    states.remember("gateways", backend("gw-2", AdminAction.DRAIN))  # said again: now the newest
    states.remember("gateways", backend("gw-5", AdminAction.DISABLE))
    assert len(states) == 3
    kept = {n: states.restore("gateways", backend(f"gw-{n}")) for n in range(6)}
    assert kept == {0: None, 1: None, 2: AdminAction.DRAIN, 3: None, 4: AdminAction.DISABLE, 5: AdminAction.DISABLE}


def pool(name: str, *ids: str) -> PoolState:
    backends = tuple(BackendConfig(i, "127.0.0.1", 9000) for i in ids)
    return PoolState(config=PoolConfig(name, backends), backends={b.id: backend(b.id) for b in backends})


def test_what_is_kept_is_forgotten_once_the_backend_is_back_by_any_path_or_its_pool_is_gone() -> None:
    """Back as itself (with the tunnels it kept) or re-added by a reload, the backend carries the word itself:
    kept, the old disable came back at its next return from DNS, undoing an `enable` given meanwhile."""
    states = OperatorStates()
    for pool_name, backend_id in (("gateways", "gw-1"), ("gateways", "gw-2"), ("gone", "gw-3")):
        states.remember(pool_name, backend(backend_id, AdminAction.DISABLE))
    states.keep_absent({"gateways": pool("gateways", "gw-1")})
    assert len(states) == 1
    assert states.restore("gateways", backend("gw-1")) is None
    assert states.restore("gateways", backend("gw-2")) is AdminAction.DISABLE
