"""Backend states, the affinity decision and route matching (SPEC: Affinity semantics, Backend states)."""

from __future__ import annotations

import dataclasses

import pytest

from lb.affinity.decision import decide
from lb.config.model import BackendConfig, BalanceMethod, HealthCheckConfig, PoolConfig, RouteConfig
from lb.errors import NoHealthyBackend
from lb.http.routing import match_route, sort_routes
from lb.state.pool import AdminAction, BackendState, PoolState, StateChange


def make_pool(*ids: str, rise: int = 2, fall: int = 3, balance: BalanceMethod = BalanceMethod.ROUND_ROBIN) -> PoolState:
    backends = tuple(BackendConfig(id=i, host="127.0.0.1", port=9001 + n) for n, i in enumerate(ids))
    return PoolState(
        config=PoolConfig(
            name="gateways", backends=backends, balance=balance, health_check=HealthCheckConfig(rise=rise, fall=fall)
        )
    )


def state_of(pool: PoolState, backend_id: str) -> BackendState:
    return pool.backends[backend_id].state


def mark_down(pool: PoolState, backend_id: str) -> None:
    for _ in range(pool.config.health_check.fall):
        pool.record_probe(backend_id, False, 1.0, "refused")
    assert pool.backends[backend_id].state is BackendState.DOWN


# -- pool: health hysteresis ------------------------------------------------


def test_backends_start_up() -> None:
    """Backends start up and take new clients until checks say otherwise."""
    pool = make_pool("gw-1", "gw-2")
    assert [b.state for b in pool.backends.values()] == [BackendState.UP, BackendState.UP]
    assert [b.id for b in pool.new_client_candidates()] == ["gw-1", "gw-2"]


def test_fall_hysteresis_reports_change_once() -> None:
    """A backend goes down only after `fall` consecutive failures, and the change is reported once."""
    pool = make_pool("gw-1", fall=3)
    assert pool.record_probe("gw-1", False, 1.0, "refused") is None
    assert pool.record_probe("gw-1", False, 2.0, "refused") is None
    change = pool.record_probe("gw-1", False, 3.0, "connection refused")
    assert change == StateChange(
        pool="gateways",
        backend="gw-1",
        old=BackendState.UP,
        new=BackendState.DOWN,
        reason="health check failed 3 time(s): connection refused",
    )
    backend = pool.backends["gw-1"]
    assert backend.changed_at == 3.0
    assert pool.record_probe("gw-1", False, 4.0, "refused") is None
    assert backend.changed_at == 3.0
    assert backend.state is BackendState.DOWN


def test_rise_hysteresis_reports_change_once() -> None:
    """A down backend comes back only after `rise` consecutive successes, reported once."""
    pool = make_pool("gw-1", rise=2)
    mark_down(pool, "gw-1")
    assert pool.record_probe("gw-1", True, 10.0, "ok") is None
    assert pool.backends["gw-1"].state is BackendState.DOWN
    change = pool.record_probe("gw-1", True, 11.0, "ok")
    assert change is not None
    assert (change.old, change.new) == (BackendState.DOWN, BackendState.UP)
    assert pool.backends["gw-1"].changed_at == 11.0
    assert pool.record_probe("gw-1", True, 12.0, "ok") is None


def test_interleaved_results_reset_the_counters() -> None:
    """Only consecutive results count: a success resets the failure run and vice versa."""
    pool = make_pool("gw-1", rise=2, fall=2)
    for ok in (False, True, False, True, False):
        assert pool.record_probe("gw-1", ok, 1.0, "flaky") is None
    assert state_of(pool, "gw-1") is BackendState.UP
    assert pool.record_probe("gw-1", False, 2.0, "flaky") is not None
    for ok in (True, False, True, False, True):
        assert pool.record_probe("gw-1", ok, 3.0, "flaky") is None
    assert state_of(pool, "gw-1") is BackendState.DOWN


def test_successes_on_an_up_backend_change_nothing() -> None:
    """Passing checks on a healthy backend report no change."""
    pool = make_pool("gw-1")
    for now in range(5):
        assert pool.record_probe("gw-1", True, float(now), "ok") is None


def test_failed_handshakes_take_a_backend_down_though_checks_pass_between_them() -> None:
    """Passive health counts handshakes apart from the checks: a gateway whose health endpoint answers
    while its handshakes go unanswered is down after `fall` failed handshakes in a row (with one count
    for both, each passed check undid the failed handshake before it and it stayed up for good)."""
    pool = make_pool("gw-1", rise=2, fall=2)
    assert pool.record_handshake_failure("gw-1", 1.0, "timed out") is None
    assert pool.record_probe("gw-1", True, 1.5, "HTTP 200") is None
    change = pool.record_handshake_failure("gw-1", 2.0, "timed out")
    assert change is not None and (change.old, change.new) == (BackendState.UP, BackendState.DOWN)
    assert change.reason == "handshake failed 2 time(s) in a row: timed out"
    assert pool.record_handshake_failure("gw-1", 2.5, "timed out") is None, "already down: reported once"
    assert pool.record_probe("gw-1", True, 3.0, "HTTP 200") is None
    assert pool.record_probe("gw-1", True, 4.0, "HTTP 200") is not None, "`rise` passed checks bring it back"
    assert pool.record_handshake_failure("gw-1", 5.0, "timed out") is None, "back up, its count starts afresh"


def test_an_answer_between_failed_handshakes_starts_their_count_again() -> None:
    """The connection sets `handshake_failures` to 0 when the backend answers: only failures in a row count."""
    pool = make_pool("gw-1", fall=2)
    backend = pool.backends["gw-1"]
    for now in (1.0, 2.0, 3.0):
        assert pool.record_handshake_failure("gw-1", now, "refused") is None
        backend.handshake_failures = 0  # an answer
    assert state_of(pool, "gw-1") is BackendState.UP


def test_failed_checks_and_failed_handshakes_are_counted_apart() -> None:
    """One of each does not make `fall: 2`: the checks' verdict and the handshakes' are each their own."""
    pool = make_pool("gw-1", fall=2)
    assert pool.record_probe("gw-1", False, 1.0, "refused") is None
    assert pool.record_handshake_failure("gw-1", 2.0, "refused") is None
    assert state_of(pool, "gw-1") is BackendState.UP


def test_a_workers_verdict_takes_the_backend_down_once_with_its_reason() -> None:
    """The owner takes down what a worker's handshakes took down (`take_down`), as after failed checks."""
    pool = make_pool("gw-1", rise=2)
    change = pool.take_down("gw-1", 1.0, "handshake failed 2 time(s) in a row: refused")
    assert change is not None and change.new is BackendState.DOWN
    assert pool.backends["gw-1"].reason == "handshake failed 2 time(s) in a row: refused"
    assert pool.take_down("gw-1", 2.0, "again") is None
    assert pool.record_probe("gw-1", True, 3.0, "ok") is None
    assert pool.record_probe("gw-1", True, 4.0, "ok") is not None


# -- pool: admin and combined states -----------------------------------------


@pytest.mark.parametrize(
    ("healthy", "action", "state", "new", "sticky"),
    [
        (True, AdminAction.ENABLE, BackendState.UP, True, True),
        (True, AdminAction.DRAIN, BackendState.DRAINING, False, True),
        (True, AdminAction.DISABLE, BackendState.DISABLED, False, False),
        (False, AdminAction.ENABLE, BackendState.DOWN, False, False),
        (False, AdminAction.DRAIN, BackendState.DOWN, False, False),
        (False, AdminAction.DISABLE, BackendState.DISABLED, False, False),
    ],
)
def test_state_combines_health_and_admin(
    healthy: bool, action: AdminAction, state: BackendState, new: bool, sticky: bool
) -> None:
    """disabled wins over everything, then down, then draining; only up takes new clients."""
    pool = make_pool("gw-1")
    if not healthy:
        mark_down(pool, "gw-1")
    pool.apply_admin("gw-1", action, 5.0)
    backend = pool.backends["gw-1"]
    assert backend.state is state
    assert backend.takes_new_clients is new
    assert backend.takes_sticky_clients is sticky
    assert [b.id for b in pool.new_client_candidates()] == (["gw-1"] if new else [])


def test_state_values_are_the_admin_json_strings() -> None:
    """States read as the strings the admin API shows."""
    assert [s.value for s in BackendState] == ["up", "down", "draining", "disabled"]


def test_admin_change_is_reported_only_on_change() -> None:
    """drain/disable/enable report a StateChange when the state moves, None when it does not."""
    pool = make_pool("gw-1")
    change = pool.apply_admin("gw-1", AdminAction.DRAIN, 1.0)
    assert change == StateChange("gateways", "gw-1", BackendState.UP, BackendState.DRAINING, "operator: drain")
    assert pool.apply_admin("gw-1", AdminAction.DRAIN, 2.0) is None
    change = pool.apply_admin("gw-1", AdminAction.DISABLE, 3.0)
    assert change is not None and (change.old, change.new) == (BackendState.DRAINING, BackendState.DISABLED)
    change = pool.apply_admin("gw-1", AdminAction.ENABLE, 4.0)
    assert change is not None and (change.old, change.new) == (BackendState.DISABLED, BackendState.UP)
    assert pool.apply_admin("gw-1", AdminAction.ENABLE, 5.0) is None


def test_drain_of_a_down_backend_shows_after_recovery() -> None:
    """A drained backend that was down stays down (no change), and recovers into draining, not up."""
    pool = make_pool("gw-1", rise=1)
    mark_down(pool, "gw-1")
    assert pool.apply_admin("gw-1", AdminAction.DRAIN, 1.0) is None
    change = pool.record_probe("gw-1", True, 2.0, "ok")
    assert change is not None and (change.old, change.new) == (BackendState.DOWN, BackendState.DRAINING)


def test_health_changes_under_disable_are_not_reported() -> None:
    """While disabled, health flapping changes no visible state."""
    pool = make_pool("gw-1", fall=1, rise=1)
    pool.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    assert pool.record_probe("gw-1", False, 2.0, "refused") is None
    assert pool.record_probe("gw-1", True, 3.0, "ok") is None
    assert pool.backends["gw-1"].state is BackendState.DISABLED


# -- decide -----------------------------------------------------------------


@pytest.mark.parametrize("action", [AdminAction.ENABLE, AdminAction.DRAIN])
def test_token_for_up_or_draining_backend_is_a_hit(action: AdminAction) -> None:
    """A valid token whose backend is up or draining routes there without a new cookie."""
    pool = make_pool("gw-1", "gw-2", "gw-3")
    pool.apply_admin("gw-2", action, 1.0)
    for _ in range(5):
        decision = decide("gw-2", pool)
        assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-2", "hit", False)


def test_draining_backend_keeps_its_clients_even_when_alone() -> None:
    """Cookie holders of a draining backend reach it even when no backend takes new clients."""
    pool = make_pool("gw-1", "gw-2")
    pool.apply_admin("gw-1", AdminAction.DRAIN, 1.0)
    mark_down(pool, "gw-2")
    assert decide("gw-1", pool).backend.id == "gw-1"
    with pytest.raises(NoHealthyBackend):
        decide(None, pool)


def test_refresh_reissues_cookie_on_hit() -> None:
    """A hit with refresh=True keeps the backend and issues a fresh cookie."""
    pool = make_pool("gw-1", "gw-2")
    decision = decide("gw-2", pool, refresh=True)
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-2", "hit", True)


@pytest.mark.parametrize("state", ["down", "disabled"])
def test_token_for_down_or_disabled_backend_is_redispatched(state: str) -> None:
    """A valid token for a down or disabled backend goes to a healthy backend with a replaced cookie."""
    pool = make_pool("gw-1", "gw-2", "gw-3")
    if state == "down":
        mark_down(pool, "gw-1")
    else:
        pool.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    chosen = set()
    for _ in range(6):
        decision = decide("gw-1", pool)
        assert decision.reason == "redispatch"
        assert decision.issue_cookie is True
        chosen.add(decision.backend.id)
    assert chosen == {"gw-2", "gw-3"}


def test_redispatch_never_goes_to_a_draining_backend() -> None:
    """Redispatched clients are new to their next backend, so draining ones are skipped."""
    pool = make_pool("gw-1", "gw-2", "gw-3")
    mark_down(pool, "gw-1")
    pool.apply_admin("gw-2", AdminAction.DRAIN, 1.0)
    assert {decide("gw-1", pool).backend.id for _ in range(6)} == {"gw-3"}


def _pinned_backend_in(pool: PoolState, condition: str) -> None:
    """Put gw-1 in `condition`, its state changed at t=100 (what redispatch_grace counts from)."""
    backend = pool.backends["gw-1"]
    if condition.startswith("down"):
        for _ in range(pool.config.health_check.fall):
            pool.record_probe("gw-1", False, 100.0, "refused")
        if condition == "down, then disabled":
            pool.apply_admin("gw-1", AdminAction.DISABLE, 100.0)
        backend.changed_at = 100.0
        return
    backend.config = dataclasses.replace(backend.config, max_connections=1)
    backend.connections = 1
    if condition == "full and draining":
        pool.apply_admin("gw-1", AdminAction.DRAIN, 100.0)


@pytest.mark.parametrize(
    ("condition", "now", "keeps_pin"),
    [
        ("down", 129.0, True),
        ("down", 130.0, False),  # the grace is over at its end
        ("down, then disabled", 101.0, False),  # an operator's disable is no passing condition
        ("full", 500.0, True),
        ("full and draining", 500.0, False),  # its clients are being moved anyway
        ("full and draining", 110.0, False),  # drained 10 s ago: the grace is for a backend that is down
    ],
)
def test_a_redispatched_client_keeps_its_pin_only_while_its_backend_may_take_it_back(
    condition: str, now: float, keeps_pin: bool
) -> None:
    """Served elsewhere, a client keeps its cookie while its backend is briefly down (redispatch_grace) or full."""
    pool = make_pool("gw-1", "gw-2")
    _pinned_backend_in(pool, condition)
    decision = decide("gw-1", pool, session=b"\x01" * 8, now=now, grace=30.0)
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-2", "redispatch", not keeps_pin)


def test_a_backend_whose_tunnels_a_drain_is_closing_sends_its_cookie_holders_elsewhere_until_an_operator_acts() -> None:
    """A drain that migrates (closes tunnels) redispatches the clients who reconnect; the next act stops it."""
    pool = make_pool("gw-1", "gw-2")
    pool.apply_admin("gw-1", AdminAction.DRAIN, 1.0)
    pool.backends["gw-1"].migrating = True
    decision = decide("gw-1", pool)
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-2", "redispatch", True)
    pool.apply_admin("gw-1", AdminAction.ENABLE, 2.0)
    assert not pool.backends["gw-1"].migrating
    assert (decide("gw-1", pool).backend.id, decide("gw-1", pool).reason) == ("gw-1", "hit")


@pytest.mark.parametrize("claimed", ["gw-9", "", "GW-1"])
def test_token_for_unknown_backend_is_invalid(claimed: str) -> None:
    """A token naming a backend the pool does not have is treated as absent (reason "invalid")."""
    pool = make_pool("gw-1", "gw-2")
    decision = decide(claimed, pool)
    assert decision.reason == "invalid"
    assert decision.issue_cookie is True
    assert decision.backend.id in {"gw-1", "gw-2"}


def test_no_token_is_new() -> None:
    """Without a token the client is balanced and gets a cookie (reason "new")."""
    pool = make_pool("gw-1", "gw-2")
    decisions = [decide(None, pool) for _ in range(4)]
    assert [d.backend.id for d in decisions] == ["gw-1", "gw-2", "gw-1", "gw-2"]
    assert {(d.reason, d.issue_cookie) for d in decisions} == {("new", True)}


def test_unusable_token_is_counted_invalid() -> None:
    """A present but unusable token (tampered, expired, foreign) is balanced like none, reason "invalid"."""
    decision = decide(None, make_pool("gw-1"), token_invalid=True)
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-1", "invalid", True)


@pytest.mark.parametrize("claimed", [None, "gw-1", "gw-2", "gw-9"])
def test_no_backend_for_new_clients_is_503(claimed: str | None) -> None:
    """When no backend takes new clients (down, draining, disabled), a client needing one gets 503."""
    pool = make_pool("gw-1", "gw-2", "gw-3")
    mark_down(pool, "gw-1")
    pool.apply_admin("gw-2", AdminAction.DISABLE, 1.0)
    pool.apply_admin("gw-3", AdminAction.DRAIN, 1.0)
    with pytest.raises(NoHealthyBackend) as info:
        decide(claimed, pool)
    assert info.value.status == 503
    assert "Retry-After" in info.value.headers


def test_empty_pool_is_503() -> None:
    """A pool without backends answers 503."""
    with pytest.raises(NoHealthyBackend):
        decide(None, make_pool())


def test_exclude_is_honoured_for_new_clients() -> None:
    """Backends already tried for this request are not chosen again."""
    pool = make_pool("gw-1", "gw-2", "gw-3")
    assert {decide(None, pool, exclude=["gw-1", "gw-3"]).backend.id for _ in range(5)} == {"gw-2"}
    with pytest.raises(NoHealthyBackend):
        decide(None, pool, exclude=["gw-1", "gw-2", "gw-3"])


def test_exclude_overrides_a_hit() -> None:
    """A pinned backend that refused the connection is left for another, as a redispatch."""
    pool = make_pool("gw-1", "gw-2")
    decision = decide("gw-1", pool, exclude={"gw-1"})
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == ("gw-2", "redispatch", True)


def test_least_conn_pool_decides_by_load() -> None:
    """In a least_conn pool new clients go to the least loaded backend."""
    pool = make_pool("gw-1", "gw-2", "gw-3", balance=BalanceMethod.LEAST_CONN)
    pool.backends["gw-1"].connections = 4
    pool.backends["gw-2"].connections = 1
    pool.backends["gw-3"].connections = 2
    assert decide(None, pool).backend.id == "gw-2"
    assert decide("gw-1", pool).backend.id == "gw-1"  # stickiness beats load


# -- routing ----------------------------------------------------------------

ROUTES = sort_routes(
    [
        RouteConfig(path_prefix="/", pool="default"),
        RouteConfig(path_prefix="/api/v2", pool="v2"),
        RouteConfig(path_prefix="/api", pool="api"),
        RouteConfig(path_prefix="/ws/", pool="ws"),
    ]
)


@pytest.mark.parametrize(
    ("path", "pool"),
    [
        ("/", "default"),
        ("/index.html", "default"),
        ("/api", "api"),
        ("/api/v1/x", "api"),
        ("/apix", "api"),  # a string prefix, as HAProxy's path_beg
        ("/api/v2", "v2"),
        ("/api/v2/users", "v2"),
        ("/ws/chat", "ws"),
        ("/ws", "default"),
        ("/API", "default"),
    ],
)
def test_longest_prefix_wins(path: str, pool: str) -> None:
    """The longest matching path prefix picks the pool, whatever the configured order."""
    route = match_route(ROUTES, path)
    assert route is not None and route.pool == pool


def test_sort_routes_orders_longest_first() -> None:
    """sort_routes puts longer prefixes first so the first match is the longest."""
    assert [r.path_prefix for r in ROUTES] == ["/api/v2", "/api", "/ws/", "/"]


@pytest.mark.parametrize("path", ["/other", "", "api", "/ap"])
def test_no_matching_route_is_none(path: str) -> None:
    """A path no prefix matches has no route (the connection core answers 404)."""
    routes = sort_routes([RouteConfig("/api", "api"), RouteConfig("/ws", "ws")])
    assert match_route(routes, path) is None
    assert match_route((), "/") is None
