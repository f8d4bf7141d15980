"""A backend's own request (`X-Backend-State`) combined with health and the operator's action.  No socket."""

from __future__ import annotations

import asyncio
import bisect
import errno
import time
from collections.abc import Callable

import pytest

from lb.config.model import BackendConfig, BalanceMethod, HealthCheckConfig, PoolConfig, implied_health_check
from lb.control.health import HealthChecker, ProbeResult, requested_state
from lb.state.observations import Observations
from lb.state.pool import AdminAction, BackendState, BackendStatus, PoolState


def pool(health_check: HealthCheckConfig | None = None) -> PoolState:
    """One backend; its pool's check is a written `health_check` (wants a 2xx/3xx) unless one is given."""
    config = PoolConfig(
        name="p", backends=(BackendConfig("gw-1", "127.0.0.1", 9001),), health_check=health_check or HealthCheckConfig()
    )
    return PoolState(config=config)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("draining", "draining"), ("Draining ", "draining"), ("drain", "draining"), ("up", "up"), (None, "up"),
     ("", "up"), ("maint", "up"), ("x" * 10_000, "up"),
     ("up, draining", "draining"), ("draining, up", "draining"), ("maint,Drain", "draining"), ("up,up", "up"),
     ("up, maint", "up"), ("\tdraining\t", "draining"), ("up,\t Drain \t", "draining")],
)
def test_header_values(header: str | None, expected: str) -> None:
    """`draining` (or HAProxy's `drain`) asks to drain, also in a list (repeated lines); anything else, or no
    header, means up."""
    assert requested_state(header) == expected


def test_request_drains_and_release_returns() -> None:
    state = pool()
    change = state.record_requested_state("gw-1", True, 1.0)
    assert change is not None and (change.old, change.new) == (BackendState.UP, BackendState.DRAINING)
    backend = state.backends["gw-1"]
    assert not backend.takes_new_clients and backend.takes_sticky_clients
    assert state.record_requested_state("gw-1", True, 2.0) is None  # repeated: no change
    change = state.record_requested_state("gw-1", False, 3.0)
    assert change is not None and change.new is BackendState.UP
    assert backend.takes_new_clients


def test_operator_disable_wins_and_keeps_its_reason() -> None:
    state = pool()
    state.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    assert state.record_requested_state("gw-1", True, 2.0) is None
    backend = state.backends["gw-1"]
    assert backend.state is BackendState.DISABLED and backend.reason == "operator: disable"
    state.apply_admin("gw-1", AdminAction.ENABLE, 3.0)
    assert backend.state is BackendState.DRAINING
    assert backend.reason == "operator: enable; backend still asks to drain", "the reason in force, not only the act"


def test_down_beats_a_drain_request() -> None:
    state = pool()
    state.record_requested_state("gw-1", True, 1.0)
    for now in (2.0, 3.0):
        state.record_probe("gw-1", False, now, "refused")
    assert state.backends["gw-1"].state is BackendState.DOWN


def test_the_reason_shown_is_the_one_in_force_through_down_and_back() -> None:
    """Draining on request, then failed health answers (a 503 without the header): the reason is the
    failure, not "no longer asks to drain"; back up while still asking, the reason says both."""
    state = pool()
    backend = state.backends["gw-1"]
    state.record_requested_state("gw-1", True, 1.0)
    for now in (2.0, 3.0):
        state.record_probe("gw-1", False, now, "HTTP 503")
    assert backend.state is BackendState.DOWN
    state.record_requested_state("gw-1", False, 3.0)  # the 503 carried no X-Backend-State
    assert backend.reason == "health check failed 2 time(s): HTTP 503"
    state.record_requested_state("gw-1", True, 4.0)
    for now in (5.0, 6.0):
        state.record_probe("gw-1", True, now, "HTTP 200")
    assert backend.state is BackendState.DRAINING
    assert backend.reason == "health check passed 2 time(s); backend asks to drain"


def test_back_up_by_the_implied_check_the_reason_says_what_passed() -> None:
    """A pool without `health_check` passes any HTTP answer: back up, the reason names the answer and that
    any passes, for an operator who sees `up` beside a /health that answers 404; failures read as ever."""
    state = pool(implied_health_check())
    backend = state.backends["gw-1"]
    for now in (1.0, 2.0):
        state.record_probe("gw-1", False, now, "[Errno 111] Connection refused")
    assert backend.reason == "health check failed 2 time(s): [Errno 111] Connection refused"
    for now in (3.0, 4.0):
        state.record_probe("gw-1", True, now, "HTTP 404")
    assert (backend.state, backend.reason) == (BackendState.UP, "health check passed 2 time(s): HTTP 404 (expect: any)")


def test_a_down_backend_s_reason_follows_its_latest_failed_check() -> None:
    """An operator debugging a down backend wants what it answers now: the first failure's detail stayed."""
    state = pool()
    backend = state.backends["gw-1"]
    for now in (1.0, 2.0):
        state.record_probe("gw-1", False, now, "no answer within 0.5s")
    assert backend.reason == "health check failed 2 time(s): no answer within 0.5s"
    changed_at = backend.changed_at
    assert state.record_probe("gw-1", False, 3.0, "not a valid HTTP answer") is None  # no state change, no line
    assert backend.state is BackendState.DOWN
    assert backend.reason == "health check failed 3 time(s): not a valid HTTP answer"
    assert backend.changed_at == changed_at, "down since the first time, still"
    state.apply_admin("gw-1", AdminAction.DISABLE, 4.0)
    state.record_probe("gw-1", False, 5.0, "refused")
    assert backend.reason == "operator: disable", "the operator's reason wins while in force"


def test_an_operators_reason_outlives_health_transitions_while_it_is_in_force() -> None:
    """Disabled, the backend shows the operator's reason through down and up; drained by the operator,
    down shows the failure and back up says both."""
    state = pool()
    backend = state.backends["gw-1"]
    state.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    for now, ok in ((2.0, False), (3.0, False), (4.0, True), (5.0, True)):
        state.record_probe("gw-1", ok, now, "refused")
        assert backend.reason == "operator: disable", now
    state.apply_admin("gw-1", AdminAction.DRAIN, 6.0)
    for now in (7.0, 8.0):
        state.record_probe("gw-1", False, now, "refused")
    assert (backend.state, backend.reason) == (BackendState.DOWN, "health check failed 2 time(s): refused")
    for now in (9.0, 10.0):
        state.record_probe("gw-1", True, now, "HTTP 200")
    assert (backend.state, backend.reason) == (BackendState.DRAINING, "health check passed 2 time(s); operator: drain")


def test_an_operators_drain_or_enable_of_a_down_backend_leaves_the_failure_as_its_reason() -> None:
    """Down, drained, enabled, disabled and enabled again: the state stays `down` and so does why, until the
    next check. /status said `down` with reason `operator: drain` (then `operator: enable`) for a whole
    `interval`; after a disable, health's reason had not even been kept to come back to."""
    state = pool()
    backend = state.backends["gw-1"]
    for now in (1.0, 2.0):
        state.record_probe("gw-1", False, now, "refused")
    failed = "health check failed 2 time(s): refused"
    for now, action in ((3.0, AdminAction.DRAIN), (4.0, AdminAction.ENABLE)):
        assert state.apply_admin("gw-1", action, now) is None  # down before and after: no change, no line
        assert (backend.state, backend.reason) == (BackendState.DOWN, failed), action
    state.apply_admin("gw-1", AdminAction.DISABLE, 5.0)
    state.record_probe("gw-1", False, 6.0, "no answer within 0.5s")
    assert (backend.state, backend.reason) == (BackendState.DISABLED, "operator: disable")
    change = state.apply_admin("gw-1", AdminAction.ENABLE, 7.0)
    assert change is not None and change.reason == "health check failed 3 time(s): no answer within 0.5s"
    assert (backend.state, backend.reason) == (BackendState.DOWN, change.reason)
    state.apply_admin("gw-1", AdminAction.DRAIN, 8.0)
    for now in (9.0, 10.0):
        state.record_probe("gw-1", True, now, "HTTP 200")
    assert (backend.state, backend.reason) == (BackendState.DRAINING, "health check passed 2 time(s); operator: drain")
    state.apply_admin("gw-1", AdminAction.ENABLE, 11.0)
    assert (backend.state, backend.reason) == (BackendState.UP, "operator: enable"), "up: the act is the reason"


@pytest.mark.parametrize(("balance", "ramps"), [
    (BalanceMethod.LEAST_CONN, True), (BalanceMethod.ROUND_ROBIN, True),
    (BalanceMethod.HASH, False), (BalanceMethod.SOURCE, False),
])
def test_slow_start_ramps_the_dynamic_balancers_only(balance: BalanceMethod, ramps: bool) -> None:
    """A ramp runs on each instance's own clock: under `hash` or `source` it sent one key to different
    backends through two instances that enabled a backend 3 s apart (HAProxy ramps only its dynamic
    algorithms too)."""
    backend_config = BackendConfig("gw-1", "127.0.0.1", 9001, weight=4)
    state = PoolState(config=PoolConfig(name="p", backends=(backend_config,), balance=balance, slow_start=60.0))
    state.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    state.apply_admin("gw-1", AdminAction.ENABLE, 2.0)
    (candidate,) = state.new_client_candidates(now=8.0)  # 6 s into a 60 s ramp
    assert candidate.weight == (pytest.approx(0.4) if ramps else 4)


@pytest.mark.parametrize(("since", "weight"), [(0.0, 0.2), (1.2, 0.2), (6.0, 0.4), (60.0, 4)])
def test_slow_start_never_quite_starts_from_zero(since: float, weight: float) -> None:
    """Back up, a backend's weight ramps from 5% of its own to the whole over slow_start."""
    backend_config = BackendConfig("gw-1", "127.0.0.1", 9001, weight=4)
    state = PoolState(config=PoolConfig(name="p", backends=(backend_config,), slow_start=60.0))
    state.apply_admin("gw-1", AdminAction.DISABLE, 1.0)
    state.apply_admin("gw-1", AdminAction.ENABLE, 2.0)
    (candidate,) = state.new_client_candidates(now=2.0 + since)
    assert candidate.weight == pytest.approx(weight)


def test_an_operators_drain_is_the_reason_even_while_the_backend_asks_to_drain_too() -> None:
    """`; backend still asks to drain` is said of an enabled backend only: drained, the operator's act is the reason."""
    state = PoolState(config=PoolConfig(name="p", backends=(BackendConfig("gw-1", "127.0.0.1", 9001),)))
    state.record_requested_state("gw-1", True, 1.0)
    state.apply_admin("gw-1", AdminAction.DRAIN, 2.0)
    assert state.backends["gw-1"].reason == "operator: drain"
    state.apply_admin("gw-1", AdminAction.ENABLE, 3.0)
    assert state.backends["gw-1"].reason == "operator: enable; backend still asks to drain"


@pytest.mark.parametrize(
    ("error", "local"),
    [
        (OSError(errno.EMFILE, "Too many open files"), True),
        (OSError(errno.ENFILE, "File table overflow"), True),
        (OSError(errno.ECONNREFUSED, "Connection refused"), False),
        (TimeoutError(), False),
    ],
    ids=["emfile", "enfile", "refused", "timeout"],
)
async def test_a_check_that_failed_for_our_own_shortage_is_not_the_backends(
    error: OSError, local: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's connect fails with `error`: out of descriptors or memory is ours, not the backend's."""

    async def failing_connect(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(asyncio, "open_connection", failing_connect)
    state = pool()
    result = await HealthChecker(state, lambda change: None).check(state.backends["gw-1"])
    assert not result.ok and result.local is local


async def _probe_loop_with(
    check: Callable[[], ProbeResult], rounds: int, *, interval: float = 0.01, observations: Observations | None = None,
) -> tuple[PoolState, list[object]]:
    """One backend (`fall: 1`, 10 ms interval) probed `rounds` times by `check` through the real loop."""
    config = PoolConfig(
        name="p", backends=(BackendConfig("gw-1", "127.0.0.1", 9001),),
        health_check=HealthCheckConfig(interval=interval, fall=1, rise=1),
    )
    state = PoolState(config=config)
    changes: list[object] = []
    checker = HealthChecker(state, changes.append, observations)
    calls = 0
    done = asyncio.Event()

    async def counted(backend: object) -> ProbeResult:
        nonlocal calls
        calls += 1
        if calls == rounds:
            done.set()
        return check()

    checker.check = counted  # type: ignore[method-assign]
    checker.retarget(state)
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await checker.stop()
    return state, changes


async def test_a_probe_loop_keeps_every_state_while_checks_cannot_be_made() -> None:
    """`fall: 1`, and every check fails for want of our own descriptors: the backend stays up."""
    state, changes = await _probe_loop_with(lambda: ProbeResult(False, "Too many open files", local=True), 5)
    assert state.backends["gw-1"].state is BackendState.UP and changes == []


async def test_a_check_that_raises_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a check must not end that backend's checks for good, silently."""

    def broken() -> ProbeResult:
        raise UnicodeEncodeError("latin-1", "健", 0, 1, "a bug")

    state, changes = await _probe_loop_with(broken, 3)  # three rounds: the loop survived the first two
    assert state.backends["gw-1"].state is BackendState.UP and changes == []
    assert any("health check of p/gw-1 failed in the balancer" in r.getMessage() for r in caplog.records)


async def test_a_503_that_asks_to_drain_drains_the_backend_and_counts_as_a_passed_check() -> None:
    """A gateway that fails its readiness (503) while it drains, saying `draining`: draining, not down (its
    cookie holders keep their sessions); the check counts as a success in lb_health_checks_total."""
    observations = Observations()
    state, _ = await _probe_loop_with(lambda: ProbeResult(True, "HTTP 503", "draining"), 2, observations=observations)
    backend = state.backends["gw-1"]
    assert backend.state is BackendState.DRAINING and backend.requested_drain
    assert set(observations.health_checks) == {("p", "gw-1", "success")}


async def test_a_check_that_fails_after_a_drain_request_takes_the_backend_down_and_keeps_the_request() -> None:
    """A drain request, then silence: down (a dead gateway is not draining), and its request kept for when
    it answers again."""
    results = iter([ProbeResult(True, "HTTP 200", "draining")])
    state, _ = await _probe_loop_with(lambda: next(results, ProbeResult(False, "no answer within 1s")), 3)
    backend = state.backends["gw-1"]
    assert backend.state is BackendState.DOWN and backend.requested_drain


async def test_probes_start_an_interval_apart_whatever_a_check_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that takes 0.3 s of a 1 s interval is followed by 0.7 s of sleep, not a whole interval."""
    import time
    from types import SimpleNamespace

    from lb.control import health

    clock = [100.0]

    def slow_check() -> ProbeResult:
        clock[0] += 0.3
        return ProbeResult(True, "HTTP 200", "up")

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(health, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await _probe_loop_with(slow_check, 3, interval=1.0)
    assert sleeps[:2] == [pytest.approx(0.7), pytest.approx(0.7)]


async def test_a_backend_removed_and_added_back_is_probed_again() -> None:
    """A backend that leaves the pool loses its loop; back (a new status, same id and address), it gets a
    new one at once: a loop kept for the one that left would leave the new one unprobed for good."""
    backends = (BackendConfig("gw-1", "127.0.0.1", 9001), BackendConfig("gw-2", "127.0.0.1", 9002))
    check_config = HealthCheckConfig(interval=3600.0)
    state = PoolState(config=PoolConfig(name="p", backends=backends, health_check=check_config))
    checker = HealthChecker(state, lambda change: None)
    probed: list[str] = []
    arrived = asyncio.Event()

    async def check(backend: BackendStatus) -> ProbeResult:
        probed.append(backend.id)
        arrived.set()
        return ProbeResult(True, "HTTP 200", "up")

    async def probed_now(count: int) -> list[str]:
        while len(probed) < count:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 5)
        for _ in range(10):
            await asyncio.sleep(0)
        taken = sorted(probed)
        probed.clear()
        return taken

    checker.check = check  # type: ignore[method-assign]
    checker.retarget(state)
    try:
        assert await probed_now(2) == ["gw-1", "gw-2"]
        without = PoolState(config=PoolConfig(name="p", backends=backends[1:], health_check=check_config))
        without.backends["gw-2"] = state.backends["gw-2"]  # kept, as a reload or a DNS answer keeps it
        checker.retarget(without)
        assert sorted(checker._tasks) == ["gw-2"]
        again = PoolState(config=PoolConfig(name="p", backends=backends, health_check=check_config))
        again.backends["gw-2"] = state.backends["gw-2"]
        checker.retarget(again)
        assert await probed_now(1) == ["gw-1"]
    finally:
        await checker.stop()


@pytest.mark.parametrize("header", [None, "", "up", "READY", "drain", "Draining", "up, draining", "up,", " , "])
def test_known_values_and_no_value_are_not_said_to_be_unknown(
    caplog: pytest.LogCaptureFixture, header: str | None
) -> None:
    """No header, an empty one, `up`/`ready`/`draining`/`drain` in any case: no warning (an answer without
    the header is most answers)."""
    state = pool()
    with caplog.at_level("WARNING", logger="lb.control.health"):
        HealthChecker(state, lambda change: None)._note_unknown(state.backends["gw-1"], header)
    assert caplog.records == []


def test_an_unknown_value_is_said_once_whatever_its_case_and_one_line_an_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`Maint` then `MAINT` is one unknown value, said once; an answer with two unknown values is one line."""
    state = pool()
    checker = HealthChecker(state, lambda change: None)
    with caplog.at_level("WARNING", logger="lb.control.health"):
        for header in ("Maint", "MAINT", "maint", "junk-1, junk-2"):
            checker._note_unknown(state.backends["gw-1"], header)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "'Maint'" in lines[0] and "'junk-1'" in lines[1], lines


def test_the_first_throttled_unknown_value_line_has_no_count(caplog: pytest.LogCaptureFixture) -> None:
    """Past the 32 values remembered, the next line carries a count only when some were left unsaid."""
    state = pool()
    checker = HealthChecker(state, lambda change: None)
    with caplog.at_level("WARNING", logger="lb.control.health"):
        for i in range(33):
            checker._note_unknown(state.backends["gw-1"], f"junk-{i}")
    said = caplog.records[-1].getMessage()
    assert said.endswith("'junk-32', which is neither draining nor up: it does not ask to drain"), said


def test_a_backend_that_sends_a_new_unknown_state_at_every_check_is_not_a_line_a_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each new unknown value is said, up to 32 of them; past those, one line a minute with a count."""
    state = pool()
    checker = HealthChecker(state, lambda change: None)
    backend = state.backends["gw-1"]
    with caplog.at_level("WARNING", logger="lb.control.health"):
        for i in range(1000):
            checker._note_unknown(backend, f"junk-{i}")
    lines = [r.getMessage() for r in caplog.records if "neither draining nor up" in r.getMessage()]
    assert len(lines) == 33, lines[-3:]
    checker._unknown_said.last -= 60.0  # a minute later
    with caplog.at_level("WARNING", logger="lb.control.health"):
        checker._note_unknown(backend, "junk-again")
    assert "(967 more unknown value(s) since the last report)" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    ("sent", "said"),
    [("drainé".encode().decode("latin-1"), "'drainé'"), ("voilà".encode().decode("latin-1"), "'voilà'"),
     ("Drain\xe9", "'Drain\\udce9'"),
     ("x" * 60, "'" + "x" * 37 + "...'")],
    ids=["utf-8", "utf-8 ending in 0xa0", "not utf-8", "long"],
)
def test_an_unknown_state_is_said_as_the_text_its_bytes_spell(
    caplog: pytest.LogCaptureFixture, sent: str, said: str
) -> None:
    """The parser reads a field as latin-1 (one character a byte): UTF-8 `drainé` must not be logged as `drainÃ©`,
    nor as it is once lower-cased or stripped of 0xA0 (NBSP to `str.strip()`, the last byte of `à`)."""
    state = pool()
    checker = HealthChecker(state, lambda change: None)
    with caplog.at_level("WARNING", logger="lb.control.health"):
        checker._note_unknown(state.backends["gw-1"], sent)
    assert f"X-Backend-State: {said}, which is neither" in caplog.records[-1].getMessage()


async def test_first_probes_of_many_new_loops_come_in_slices_in_order() -> None:
    """120 new loops: `at_once` first probes per slice, in the order the loops asked; one cancelled while
    it waits takes no place; once they are through, a new loop goes at the next turn."""
    from lb.control.health import FirstProbes

    gate = FirstProbes(at_once=50, gap=0.5)  # no second slice within the few turns the first is looked at
    through: list[int] = []

    async def new_loop(index: int) -> None:
        await gate.turn()
        through.append(index)

    loops = [asyncio.create_task(new_loop(index)) for index in range(120)]
    await asyncio.sleep(0)  # every loop waits at the gate now
    loops[10].cancel()
    for _ in range(5):  # turns of the event loop
        await asyncio.sleep(0)
    assert through == [*range(10), *range(11, 51)], "one slice, the cancelled loop's place given to the next"
    await asyncio.wait_for(asyncio.gather(*loops, return_exceptions=True), 10)
    assert through == [index for index in range(120) if index != 10]
    late = asyncio.create_task(new_loop(120))
    for _ in range(5):
        await asyncio.sleep(0)
    assert late.done() and through[-1] == 120


async def test_probes_a_stall_of_the_loop_made_due_together_are_spread_again() -> None:
    """200 probe loops spread by their first probes; the event loop stalls past their interval, and all of
    them wake in one turn: they go on in slices of `at_once`, not as one turn of 200 checks at every interval
    from then on (the loops keep the phase their probe after the stall had)."""
    from lb.control.health import FirstProbes

    config = PoolConfig(
        name="p", backends=tuple(BackendConfig(f"gw-{index}", "127.0.0.1", 9001 + index) for index in range(200)),
        health_check=HealthCheckConfig(interval=1.0, fall=2, rise=1),
    )
    state = PoolState(config=config)
    at_once, gap = 20, 0.05  # ten slices, 0.5 s: within the interval
    checker = HealthChecker(state, lambda change: None, first_probes=FirstProbes(at_once=at_once, gap=gap))
    loop = asyncio.get_running_loop()
    started: list[float] = []
    stalled = asyncio.Event()

    async def instant(backend: BackendStatus) -> ProbeResult:
        started.append(loop.time())
        if len(started) == 200:
            stalled.set()  # every loop has had its first probe: they are spread now
        return ProbeResult(True, "HTTP 200", "up")

    checker.check = instant  # type: ignore[method-assign]
    checker.retarget(state)
    try:
        await asyncio.wait_for(stalled.wait(), 10)
        time.sleep(1.2)  # noqa: ASYNC251 - the stall itself: this loop runs nothing meanwhile
        resumed = loop.time()
        await asyncio.sleep(2.2)  # the 200 probes after the stall, and theirs an interval after
    finally:
        await checker.stop()
    after = sorted(at for at in started if at >= resumed)
    assert len(after) >= 300, f"only {len(after)} probes in 2.2 s after the stall"
    crowd = max(bisect.bisect_right(after, at + gap / 2) - index for index, at in enumerate(after))
    # One slice (and on a loaded machine, part of the next one, late), not the 200 of one turn.
    assert crowd <= 2 * at_once, f"{crowd} probes within {gap / 2}s of each other after the stall"


async def test_probes_on_a_loop_whose_every_turn_is_long_keep_their_interval() -> None:
    """On an event loop that is merely busy (every turn 30 ms), every probe wakes a little late; each is
    still made about once an interval, not held back a turn at a time behind the others (2,000 backends
    checked every 0.5 s were checked about once every two seconds)."""
    count, interval, busy, run = 2000, 0.5, 0.03, 2.0
    config = PoolConfig(
        name="p", backends=tuple(BackendConfig(f"gw-{index}", "127.0.0.1", 9001 + index) for index in range(count)),
        health_check=HealthCheckConfig(interval=interval, fall=2, rise=1),
    )
    state = PoolState(config=config)
    checker = HealthChecker(state, lambda change: None)
    loop = asyncio.get_running_loop()
    probes = 0
    all_made = asyncio.Event()
    seen: set[str] = set()

    async def instant(backend: BackendStatus) -> ProbeResult:
        nonlocal probes
        probes += 1
        seen.add(backend.id)
        if len(seen) == count:
            all_made.set()
        return ProbeResult(True, "HTTP 200", "up")

    busy_until = 0.0

    def turn_of_30_ms() -> None:
        if loop.time() >= busy_until:
            return
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            pass
        loop.call_soon(turn_of_30_ms)

    checker.check = instant  # type: ignore[method-assign]
    checker.retarget(state)
    try:
        await asyncio.wait_for(all_made.wait(), 10)  # the first probes, spread
        before = probes
        busy_until = loop.time() + run
        loop.call_soon(turn_of_30_ms)
        await asyncio.sleep(run)
        made = probes - before
    finally:
        busy_until = 0.0
        await checker.stop()
    # About run / interval each (4); half of that leaves room for a loaded machine (the first probes' slices,
    # taken by every late probe, let through one in eight).
    expected = run / interval
    assert made >= count * expected / 2, f"{made / count:.1f} probes a backend in {run} s, not ~{expected:.0f}"
