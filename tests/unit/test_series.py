"""lb.state.series and those who forget by it (Stats, Observations, the owner's StatsAggregate): bounded
series under any DNS churn, counters that never go back for a backend that is kept."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.config.model import AffinityConfig, BackendConfig, Config, DiscoveryConfig, PoolConfig
from lb.control.ipc import StatsAggregate, stats_message
from lb.control.metrics import LbCollector
from lb.state.context import ProxyContext, Stats
from lb.state.observations import Observations
from lb.state.series import MIN_DEPARTED_KEPT, REMOVED_POOLS_KEPT, SeriesRetention, departed_kept
from tests.harness.fake_tunnels import pool_context


def _held(retention: SeriesRetention, pool: str, ids: list[str]) -> list[str]:
    return [i for i in ids if retention.holds(pool, i)]


def test_present_backends_and_the_last_to_leave_are_kept_the_oldest_forgotten_first() -> None:
    """Departed backends keep their series up to the pool's bound; beyond it the first to leave go first."""
    retention = SeriesRetention()
    assert retention.update({"p": ["a", "b"]}, {"p": 2}) == []
    assert retention.update({"p": ["b"]}, {"p": 2}) == []  # a left
    assert retention.update({"p": ["d"]}, {"p": 2}) == []  # b left
    assert retention.departed("p") == ["a", "b"]
    assert retention.update({"p": ["e"]}, {"p": 2}) == [("p", "a")]  # d left: a, the oldest, goes
    assert _held(retention, "p", ["a", "b", "d", "e"]) == ["b", "d", "e"]


def test_a_backend_back_before_it_is_forgotten_is_present_again() -> None:
    """One DNS interval away and back: its series were never dropped, and it no longer counts as departed."""
    retention = SeriesRetention()
    retention.update({"p": ["a", "b"]}, {"p": 1})
    retention.update({"p": ["b"]}, {"p": 1})
    retention.update({"p": ["a", "b"]}, {"p": 1})
    assert retention.departed("p") == []
    retention.update({"p": ["a"]}, {"p": 1})
    assert retention.update({"p": ["a"]}, {"p": 1}) == []
    assert retention.departed("p") == ["b"]


def test_a_removed_pool_departs_whole_within_its_last_bound() -> None:
    """A reload that removes a pool: its backends depart; the pool's bound still holds for them."""
    retention = SeriesRetention()
    retention.update({"p": ["a", "b", "c"], "q": ["x"]}, {"p": 2, "q": 5})
    forgotten = retention.update({"q": ["x"]}, {"q": 5})
    assert forgotten == [("p", "a")]
    assert retention.departed("p") == ["b", "c"]
    assert retention.holds("q", "x") and not retention.holds("p", "x")


def test_the_bound_is_one_whole_set_of_backends_at_least_a_floor() -> None:
    """A discovery pool keeps as many departed as it may hold (static + max_backends)."""
    static = (BackendConfig(id="s", host="127.0.0.1", port=1),)
    dns = DiscoveryConfig(dns="gw.example", max_backends=256)
    assert departed_kept(PoolConfig(name="p", backends=static, discovery=dns)) == 257
    assert departed_kept(PoolConfig(name="p", backends=static)) == MIN_DEPARTED_KEPT


@given(st.lists(st.sets(st.integers(0, 40), max_size=8), min_size=1, max_size=40), st.integers(1, 6))
def test_whatever_dns_says_held_series_stay_bounded_and_a_constant_backend_is_never_dropped(
    answers: list[set[int]], bound: int
) -> None:
    """Any sequence of answers: at most present + bound held; `static` (in every answer) always held."""
    retention = SeriesRetention()
    for answer in answers:
        present = ["static", *map(str, answer)]
        retention.update({"p": present}, {"p": bound})
        held = _held(retention, "p", ["static", *map(str, range(41))])
        assert len(held) <= len(present) + bound
        assert "static" in held and all(i in held for i in present)
        assert len(retention.departed("p")) <= bound


def test_stats_forget_drops_backend_series_but_not_the_pools_decisions() -> None:
    """lb_affinity_decisions_total{pool} sums backends: forgetting one must not take its count back."""
    stats = Stats()
    stats.handshakes[("p", "gone", "switched")] += 3
    stats.decisions[("p", "gone", "new")] += 3
    stats.decisions[("p", "kept", "new")] += 2
    stats.handshakes[("p", "kept", "switched")] += 2
    before = dict(stats.pool_decisions())
    stats.forget(lambda pool, backend: backend == "kept")
    assert set(stats.handshakes) == {("p", "kept", "switched")}
    assert set(stats.decisions) == {("p", "kept", "new")}
    assert dict(stats.pool_decisions()) == before == {("p", "new"): 5}
    stats.decisions[("p", "gone", "new")] += 1  # back later: a new series, the pool counts on
    assert stats.pool_decisions()[("p", "new")] == 6


def test_observations_forget_drops_per_backend_series_only() -> None:
    observations = Observations()
    observations.observe_handshake("p", 0.01)
    for backend in ("gone", "kept"):
        observations.observe_connect("p", backend, 0.001)
        observations.count_backend_error("p", backend, "refused")
        observations.count_health_check("p", backend, True)
    observations.forget(lambda pool, backend: backend == "kept")
    assert set(observations.connect) == {("p", "kept")}
    assert set(observations.backend_errors) == {("p", "kept", "refused")}
    assert set(observations.health_checks) == {("p", "kept", "success")}
    assert set(observations.handshake) == {"p"}


# -- the owner's sum of its workers' reports ---------------------------------------------------


def _ctx(backends: tuple[str, ...] = ("a",)) -> ProxyContext:
    pool = PoolConfig(name="p", backends=tuple(BackendConfig(id=b, host="127.0.0.1", port=9000) for b in backends))
    return pool_context(
        Config(listeners=(), pools={"p": pool}, routes=(), affinity=AffinityConfig(secret_keys=("k" * 43,)))
    )


def _report(counts: dict[str, int]) -> dict[str, Any]:
    """A worker's stats report: `counts` handshakes (and decisions, health checks) per backend of pool p."""
    ctx = _ctx()
    for backend, n in counts.items():
        ctx.stats.handshakes[("p", backend, "switched")] += n
        ctx.stats.decisions[("p", backend, "new")] += n
        ctx.observations.count_health_check("p", backend, True)
        for _ in range(n):
            ctx.observations.observe_connect("p", backend, 0.001)
    return stats_message(ctx)


def _sums(aggregate: StatsAggregate) -> ProxyContext:
    ctx = _ctx()
    aggregate.apply_to(ctx)
    return ctx


def _handshakes(ctx: ProxyContext, backend: str) -> int:
    return ctx.stats.handshakes.get(("p", backend, "switched"), 0)


def _exported(ctx: ProxyContext, sample_name: str) -> dict[tuple[str, ...], float]:
    """What /metrics shows of one sample name, by its labels: this process's and its workers' sums."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in ctx.observations.families()
        for sample in family.samples
        if sample.name == sample_name
    }


def _connects(ctx: ProxyContext, backend: str) -> int:
    return int(_exported(ctx, "lb_backend_connect_duration_seconds_count").get(("p", backend), 0))


def test_a_worker_that_forgets_a_backend_the_owner_keeps_cannot_take_the_sum_back() -> None:
    """Workers forget on their own schedule (their own DNS lookups): while the owner keeps a backend, what a
    worker reported stays in the sum, and what it counts again from 0 is added to it."""
    aggregate = StatsAggregate(lambda pool, backend: True)
    aggregate.update(100, _report({"a": 10}))
    aggregate.update(200, _report({"a": 5}))
    assert _handshakes(_sums(aggregate), "a") == 15
    aggregate.update(100, _report({}))  # worker 100 forgot `a`
    assert _handshakes(_sums(aggregate), "a") == 15
    assert _connects(_sums(aggregate), "a") == 15
    aggregate.update(100, _report({"a": 2}))  # `a` back at worker 100, counted from 0
    ctx = _sums(aggregate)
    assert _handshakes(ctx, "a") == 17 and _connects(ctx, "a") == 17
    assert ctx.stats.pool_decisions()[("p", "new")] == 17
    aggregate.update(100, _report({"a": 1}))  # forgotten and back between two reports: lower, a restart
    assert _handshakes(_sums(aggregate), "a") == 18
    aggregate.retire(100)
    aggregate.compact(100)  # dead: what it carried stays
    assert _handshakes(_sums(aggregate), "a") == 18


def test_the_owner_keeps_only_the_series_its_retention_holds_and_the_pool_sum_stays() -> None:
    """Series the owner does not keep are not stored; forgotten ones leave the sum, not the pool's total."""
    kept = {"a", "b"}
    aggregate = StatsAggregate(lambda pool, backend: backend in kept)
    aggregate.update(100, _report({"a": 1, "b": 2, "stranger": 4}))
    ctx = _sums(aggregate)
    assert {key[1] for key in ctx.stats.handshakes} == {"a", "b"}
    assert {labels[1] for labels in _exported(ctx, "lb_health_checks_total")} == {"a", "b"}
    assert ctx.stats.pool_decisions()[("p", "new")] == 7  # every decision the worker made counts
    kept.discard("b")
    aggregate.forget()
    ctx = _sums(aggregate)
    assert {key[1] for key in ctx.stats.handshakes} == {"a"}
    assert ctx.stats.pool_decisions()[("p", "new")] == 7
    assert ctx.stats.backend_counts()[("p", "a")].handshakes == 1


def test_churn_through_workers_and_owner_stays_bounded_and_monotonic() -> None:
    """Every report names 8 new backends and a constant one: the owner's sum holds at most present + bound
    backends, the constant one's count and the pool's decisions only ever grow."""
    retention = SeriesRetention()
    bound = 8
    aggregate = StatsAggregate(retention.holds)
    workers = {100: Stats(), 200: Stats()}
    last_constant, last_pool = 0, 0
    for generation in range(30):
        present = ["constant", *(f"g{generation}-{i}" for i in range(8))]
        retention.update({"p": present}, {"p": bound})
        aggregate.forget()
        for pid, stats in workers.items():
            for backend in present:
                stats.handshakes[("p", backend, "switched")] += 1
                stats.decisions[("p", backend, "new")] += 1
            if (generation + pid // 100) % 3 == 0:  # each worker forgets on its own schedule
                worker_view = SeriesRetention()
                worker_view.update({"p": present}, {"p": 0})
                stats.forget(worker_view.holds)
            ctx = _ctx()
            ctx.stats = stats
            aggregate.update(pid, stats_message(ctx))
        ctx = _sums(aggregate)
        backends = {key[1] for key in ctx.stats.handshakes}
        assert len(backends) <= len(present) + bound, backends
        constant, pool = _handshakes(ctx, "constant"), ctx.stats.pool_decisions()[("p", "new")]
        assert constant >= last_constant and pool >= last_pool
        last_constant, last_pool = constant, pool
    assert last_constant == 2 * 30 and last_pool == 2 * 30 * 9


@pytest.mark.parametrize("forgets", [False, True])
def test_a_single_process_pool_total_is_exact_whatever_it_forgets(forgets: bool) -> None:
    """Forgetting changes which backends show, never the pool's lb_affinity_decisions_total."""
    stats = Stats()
    totals = []
    for generation, backend in zip(range(10), itertools.cycle("abc"), strict=False):
        stats.decisions[("p", f"{backend}{generation}", "hit")] += 1
        if forgets:
            stats.forget(lambda pool, backend_id, keep=f"{backend}{generation}": backend_id == keep)
        totals.append(stats.pool_decisions()[("p", "hit")])
    assert totals == list(range(1, 11))


# -- what /metrics exports of them --------------------------------------------------------------


def _scrape(ctx: ProxyContext, retention: SeriesRetention) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, its labels) → value, as the balancer's collector exports them."""
    collector = LbCollector(lambda: ctx, departed=retention.departed_everywhere)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect() for sample in family.samples
    }


def _series_of(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], backend: str) -> dict[str, float]:
    """The per-backend series of `backend`, keyed by name and the labels other than pool and backend."""
    return {
        name + "".join(f",{key}={value}" for key, value in labels if key not in ("pool", "backend")): value
        for (name, labels), value in scrape.items() if ("backend", backend) in labels
    }


@pytest.mark.parametrize("workers", [False, True])
def test_a_departed_backend_the_retention_keeps_stays_in_metrics_at_its_last_counts(workers: bool) -> None:
    """A backend a reload removed keeps every series at its last value until the retention forgets it."""
    retention = SeriesRetention()
    ctx = _ctx(("a", "b"))
    retention.update({"p": ["a", "b"]}, {"p": 2})
    if workers:  # the owner's sums of a worker's report (lb.control.ipc)
        aggregate = StatsAggregate(retention.holds)
        aggregate.update(100, _report({"b": 3}))
        aggregate.apply_to(ctx)
    else:
        ctx.stats.decisions[("p", "b", "hit")] += 3
        ctx.observations.count_health_check("p", "b", True)
        ctx.observations.observe_connect("p", "b", 0.001)
    before = _series_of(_scrape(ctx, retention), "b")
    assert before["lb_backend_handshakes_total"] == 3
    assert before["lb_backend_errors_total,kind=refused"] == 0
    assert before["lb_health_checks_total,result=failure"] == 0
    after_reload = _ctx(("a",))  # the reload's new pools: b is gone, the process's counts stay
    after_reload.stats, after_reload.observations = ctx.stats, ctx.observations
    retention.update({"p": ["a"]}, {"p": 2})
    kept = _series_of(_scrape(after_reload, retention), "b")
    gauges = {"lb_active_connections", "lb_backend_up"}
    assert kept == {name: value for name, value in before.items()
                    if name.split(",")[0] not in gauges and not name.startswith("lb_backend_state")}
    for generation in range(3):  # three more leave: b, the first to leave, is forgotten (bound 2)
        retention.update({"p": ["a", f"n{generation}"]}, {"p": 2})
        retention.update({"p": ["a"]}, {"p": 2})
    ctx.stats.forget(retention.holds)
    ctx.observations.forget(retention.holds)
    if workers:
        aggregate.forget()
        aggregate.apply_to(after_reload)
    assert _series_of(_scrape(after_reload, retention), "b") == {}


def test_a_departed_backend_forgotten_mid_render_leaves_the_body_and_is_never_shown_at_zero() -> None:
    """/metrics renders a slice at a time with the loop running between: a departed backend's series that
    the retention forgets meanwhile (a DNS answer) are left out of that body, not exported at 0 after N
    in the body before (a counter going backwards)."""
    from lb.control.exposition import SlicedRender
    from lb.control.metrics import make_registry

    retention = SeriesRetention()
    retention.update({"p": ["a", "gone"]}, {"p": 16})
    retention.update({"p": ["a"]}, {"p": 16})  # gone departed, its series kept

    def gone_series(forget_after: int | None) -> dict[str, float]:
        """The series of `gone` in one body, its counts forgotten after slice `forget_after` (None: never)."""
        ctx = _ctx(("a",))
        ctx.stats.decisions[("p", "gone", "new")] += 7
        for _ in range(7):
            ctx.observations.observe_connect("p", "gone", 0.01)
            ctx.observations.count_health_check("p", "gone", True)
        registry = make_registry(lambda: ctx, departed=retention.departed_everywhere, worker_pids=list)
        render = SlicedRender(registry.collect_slices())
        turns = 0
        while not render.advance(lambda: 0.0, -1.0):  # one slice a turn, the loop running in between
            turns += 1
            if turns == forget_after:
                ctx.stats.forget(lambda pool, backend: backend != "gone")
                ctx.observations.forget(lambda pool, backend: backend != "gone")
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in render.body().decode().splitlines()
            if 'backend="gone"' in line and not line.startswith("#")
        }

    before = gone_series(None)
    assert before['lb_backend_handshakes_total{backend="gone",pool="p"}'] == 7
    assert before['lb_backend_connect_duration_seconds_count{backend="gone",pool="p"}'] == 7
    for forget_after in range(1, 40):
        shown = gone_series(forget_after)
        assert all(before[series] == value for series, value in shown.items()), (forget_after, shown)


def test_every_decision_result_is_exported_from_zero_for_each_configured_pool() -> None:
    """lb_affinity_decisions_total{pool,result} exists at 0 before its first count: rate()/increase() count
    nothing of the value a series is born with, so a first redispatch storm would not show."""
    ctx = _ctx()
    before = _scrape(ctx, SeriesRetention())
    assert {
        dict(labels)["result"]: value for (name, labels), value in before.items()
        if name == "lb_affinity_decisions_total"
    } == {"hit": 0, "new": 0, "redispatch": 0, "invalid": 0}
    ctx.stats.decisions[("p", "a", "redispatch")] += 3
    ctx.stats.decisions[("gone", "x", "hit")] += 1  # a pool a reload removed keeps its count
    after = _scrape(ctx, SeriesRetention())
    assert after[("lb_affinity_decisions_total", (("pool", "p"), ("result", "redispatch")))] == 3
    assert after[("lb_affinity_decisions_total", (("pool", "gone"), ("result", "hit")))] == 1


def test_every_status_the_balancer_answers_is_exported_from_zero() -> None:
    """lb_rejected_requests_total{status} exists at 0 for every status of the error tree before its first
    count: the first 502 or 503 storm after a start would not show in rate() (LbHandshakeErrorRatio)."""
    ctx = _ctx()
    before = _scrape(ctx, SeriesRetention())
    exported = {
        dict(labels)["status"]: value for (name, labels), value in before.items()
        if name == "lb_rejected_requests_total"
    }
    assert exported == dict.fromkeys(["400", "404", "408", "426", "429", "431", "500", "501", "502", "503", "505"], 0)
    ctx.stats.rejected[503] += 4
    ctx.stats.rejected[418] += 1  # a status outside the tree (none today) is still exported once counted
    after = _scrape(ctx, SeriesRetention())
    assert after[("lb_rejected_requests_total", (("status", "503"),))] == 4
    assert after[("lb_rejected_requests_total", (("status", "418"),))] == 1


def test_every_reason_a_token_is_refused_for_is_exported_from_zero() -> None:
    """lb_affinity_invalid_tokens_total{reason} exists at 0 for every reason before its first count, so the
    first burst of `bad_mac` (a key left out of one instance) or `future` (a clock ahead) shows in rate()."""
    ctx = _ctx()
    exported = {
        dict(labels)["reason"]: value for (name, labels), value in _scrape(ctx, SeriesRetention()).items()
        if name == "lb_affinity_invalid_tokens_total"
    }
    assert exported == dict.fromkeys(
        ["malformed", "unknown_key", "bad_mac", "expired", "future", "unknown_backend"], 0
    )
    ctx.stats.invalid_tokens["future"] += 3
    after = _scrape(ctx, SeriesRetention())
    assert after[("lb_affinity_invalid_tokens_total", (("reason", "future"),))] == 3


def test_pools_renamed_at_every_reload_keep_the_series_of_the_last_removed_only() -> None:
    """A release-named pool (`gateways-v1`, `-v2`, ...) renamed at each reload: the series of the last
    REMOVED_POOLS_KEPT removed pools stay (per pool, and of their backends), older ones are forgotten
    whole; they stayed for the process's life (50 series a reload)."""
    retention = SeriesRetention()
    reloads = REMOVED_POOLS_KEPT + 5
    forgotten: list[tuple[str, str]] = []
    for version in range(reloads + 1):
        forgotten += retention.update({"static": ["s"], f"v{version}": [f"b{version}"]}, {f"v{version}": 16})
    removed = [f"v{version}" for version in range(reloads)]
    held = [pool for pool in removed if retention.holds_pool(pool)]
    assert held == removed[-REMOVED_POOLS_KEPT:]
    assert retention.holds_pool("static") and retention.holds_pool(f"v{reloads}")
    assert forgotten == [(f"v{version}", f"b{version}") for version in range(reloads - REMOVED_POOLS_KEPT)]
    assert not retention.holds("v0", "b0") and retention.holds(f"v{reloads - 1}", f"b{reloads - 1}")
    # Back before it is forgotten: its series go on.
    retention.update({"static": ["s"], f"v{reloads - 1}": [f"b{reloads - 1}"]}, {})
    assert retention.holds_pool(f"v{reloads - 1}") and retention.holds(f"v{reloads - 1}", f"b{reloads - 1}")


def test_stats_and_observations_forget_the_per_pool_series_of_a_forgotten_pool() -> None:
    stats, observations = Stats(), Observations()
    for pool in ("gone", "kept"):
        stats.decisions[(pool, "b", "new")] += 2
        stats.unsealed_cookies[pool] += 1
        observations.observe_handshake(pool, 0.01)
    stats.forget(lambda pool, backend: pool == "kept", lambda pool: pool == "kept")
    observations.forget(lambda pool, backend: pool == "kept", lambda pool: pool == "kept")
    assert dict(stats.pool_decisions()) == {("kept", "new"): 2}
    assert set(stats.unsealed_cookies) == {"kept"} and set(observations.handshake) == {"kept"}
    aggregate = StatsAggregate(lambda pool, backend: True, lambda pool: pool == "kept")
    report = {"pool_decisions": [["gone", "new", 2], ["kept", "new", 3]]}
    aggregate.update(1, report)
    total = aggregate._latest[1]
    assert dict(total.pool_decisions) == {("kept", "new"): 3}
