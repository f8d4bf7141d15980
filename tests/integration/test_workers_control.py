"""`workers: 2`, the control plane's promises: a migration stopped by `enable` stops in every worker, a
state message far past 64 KiB reaches the workers, SIGKILL of the owner takes the workers with it, and
per-instance limits hold at the configured number whatever the number of workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import COOKIE, HOST, UNIT
from tests.harness.clients import assert_echo, recv_hello, status, visit, ws_connect
from tests.harness.ops import (
    both_serving,
    catches,
    metric,
    metrics_text,
    process_alive,
    reload_with,
    set_state,
    signal_balancer,
    started_stack,
    token_of,
    two_workers,
    visit_until,
    wait_close,
    wait_exit,
    wait_for_log,
    wait_until,
    worker_pids,
)
from tests.harness.processes import Balancer, Gateway, Launcher, deep_merge, lb_config
from tests.harness.raw import RawWs, close_raw, open_raw, read_response, upgrade_request

POOL = "gateways"
SLOW_TCP_HEALTH = {"type": "tcp", "interval": "10s", "timeout": "1s", "rise": 1, "fall": 1}


@dataclass(frozen=True)
class Nowhere:
    """A backend address nobody listens on (port 9 of a loopback address: refused at once)."""

    id: str
    address: str


def start(launcher: Launcher, backends: dict[str, Any], overrides: dict[str, Any] | None = None) -> Balancer:
    base: dict[str, Any] = {"workers": 2, "limits": {"handshake_rate_per_ip": 0}}
    return launcher.balancer(lb_config(pools=backends, overrides=deep_merge(base, overrides or {})))


async def test_drain_then_enable_stops_the_closes_in_every_worker(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A slow drain migration, then enable: no tunnel is closed after the enable, in any worker."""
    gw1, gw2 = gateways
    lb = start(launcher, {POOL: gateways})
    lb.wait_states({(POOL, gw1.id): "up", (POOL, gw2.id): "up"})
    await two_workers(lb)
    token = token_of(await visit_until(lb.ws_url(), gw1.id, tries=10))
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=token)) for _ in range(12)]
        for ws, _ in held:
            assert (await recv_hello(ws))["server_id"] == gw1.id
        # 2 closes per second over both workers: each worker closes one at once, the next a second later.
        await set_state(lb, gw1.id, "drain", params={"close_after": "0s", "rate": "1"})

        async def first_closes() -> list[int]:
            done = []
            for index, (ws, _) in enumerate(held):
                with contextlib.suppress(TimeoutError):
                    msg = await ws.receive(timeout=0.01)
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        done.append(index)
            return done

        closed_early: set[int] = set()

        async def some_closed() -> bool:
            closed_early.update(await first_closes())
            return bool(closed_early)

        await wait_until(some_closed, within=5 * UNIT, what="the drain closing its first tunnel")
        await set_state(lb, gw1.id, "enable")
        enabled_at = time.monotonic()
        await asyncio.sleep(0.3)  # a close already on the wire when enable arrived
        closed_early.update(await first_closes())
        # With the migration still running, both workers would close ~2 more per second.
        late: list[int] = []
        deadline = enabled_at + 4 * UNIT
        while time.monotonic() < deadline:
            late.extend(i for i in await first_closes() if i not in closed_early)
            await asyncio.sleep(0.1)
        assert not late, f"{len(late)} tunnel(s) closed after enable"
        assert len(closed_early) <= 4, closed_early
        for index, (ws, _) in enumerate(held):
            if index not in closed_early:
                await assert_echo(ws, "still open after enable")
    lb.assert_alive()


async def test_after_the_answer_to_disable_no_worker_routes_to_the_backend(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """SPEC: disabled, "nothing new reaches it".  The answer used to come before the workers had the new
    state: handshakes sent right after the 200 reached the disabled backend in a few rounds of 40."""
    gw1, gw2 = gateways
    lb = start(launcher, {POOL: gateways})
    lb.wait_states({(POOL, gw1.id): "up", (POOL, gw2.id): "up"})
    await two_workers(lb)
    token = token_of(await visit_until(lb.ws_url(), gw1.id, tries=10))
    head = upgrade_request(host=f"{HOST}:{lb.port}", extra=[("Cookie", f"{COOKIE}={token}")])

    async def hello_from(reader: asyncio.StreamReader) -> str:
        response = await read_response(reader, body=False)
        assert response.status == 101, response
        frame = RawWs(reader, writer=None, response=response)  # type: ignore[arg-type]
        _, payload, _ = await frame.recv_message()
        return str(json.loads(payload)["server_id"])

    reached: list[int] = []
    for round_ in range(30):
        # Connected (accepted by the workers) before the disable; their heads go out as its 200 comes in.
        clients = [await open_raw(lb.port) for _ in range(8)]
        await set_state(lb, gw1.id, "disable")
        for _, writer in clients:
            writer.write(head)
        landed = await asyncio.gather(*(hello_from(reader) for reader, _ in clients))
        for _, writer in clients:
            await close_raw(writer)
        if gw1.id in landed:
            reached.append(round_)
        await set_state(lb, gw1.id, "enable")
    assert not reached, f"handshakes sent after the 200 reached the disabled backend in rounds {reached}"
    lb.assert_alive()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_stops_a_paced_drain_and_the_rest_get_1001(
    launcher: Launcher, gateways: list[Gateway], workers: int
) -> None:
    """README: a drain stopped by SIGTERM stops asking for closes; the shutdown's 1001s over
    `shutdown_grace` close the rest.  With workers, each worker went on closing its share with 1012 at
    the drain's rate through the whole grace."""
    gw1, gw2 = gateways
    grace = 4.0
    lb = start(launcher, {POOL: gateways}, {"workers": workers, "timeouts": {"shutdown_grace": f"{grace:g}s"}})
    lb.wait_states({(POOL, gw1.id): "up", (POOL, gw2.id): "up"})
    if workers == 2:
        await two_workers(lb)
    token = token_of(await visit_until(lb.ws_url(), gw1.id, tries=10))
    async with contextlib.AsyncExitStack() as stack:
        held = [(await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=token)))[0] for _ in range(12)]
        for ws in held:
            assert (await recv_hello(ws))["server_id"] == gw1.id
        # One close every 2 s over the instance: at most one or two before SIGTERM, about two more per
        # worker through the grace if the drain ran on.
        await set_state(lb, gw1.id, "drain", params={"close_after": "0s", "rate": "0.5"})
        await asyncio.sleep(0.5)
        signal_balancer(lb, signal.SIGTERM)
        stopped_at = time.monotonic()
        closes = await asyncio.gather(*(wait_close(ws, grace + 6 * UNIT) for ws in held))
    late_1012 = [c for c in closes if c.code == 1012 and c.at > stopped_at + 0.5]
    assert not late_1012, f"{len(late_1012)} tunnel(s) closed with 1012 after SIGTERM: {closes}"
    assert sum(c.code == 1001 for c in closes) >= len(held) - 2 * workers, closes
    assert await wait_exit(lb, grace + 10 * UNIT) == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_drain_closes_its_tunnels_even_when_a_reload_removes_the_backend_first(
    launcher: Launcher, gateways: list[Gateway], workers: int
) -> None:
    """`drain` with close_after and rate, then a reload that removes the backend before the closes begin
    (a gateway's decommission): its tunnels still get their 1012s, as the operator asked, with one process
    or with workers.  With workers the drain looked the backend up again in the pool, found none, and its
    closes were lost without a word."""
    gw1, gw2 = gateways
    config = lb_config(pools={POOL: gateways}, overrides={"workers": workers, "limits": {"handshake_rate_per_ip": 0}})
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, gw1.id): "up", (POOL, gw2.id): "up"})
    token = token_of(await visit_until(lb.ws_url(), gw1.id, tries=10))
    changed = copy.deepcopy(config)
    changed["pools"][POOL]["backends"] = [b for b in changed["pools"][POOL]["backends"] if b["id"] != gw1.id]
    close_after = 2.0
    async with contextlib.AsyncExitStack() as stack:
        held = [(await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=token)))[0] for _ in range(4)]
        for ws in held:
            assert (await recv_hello(ws))["server_id"] == gw1.id
        drained_at = time.monotonic()
        await set_state(lb, gw1.id, "drain", params={"close_after": f"{close_after:g}s", "rate": "20"})
        await reload_with(lb, changed)
        assert time.monotonic() - drained_at < close_after, "the reload came after the closes began"
        closes = await asyncio.gather(*(wait_close(ws, 6 * UNIT + close_after) for ws in held))
        assert [c.code for c in closes] == [1012] * len(held), closes
        assert min(c.at for c in closes) - drained_at >= close_after - 0.1, "closed before close_after"
    assert "Traceback" not in lb.log_text(), lb.logs_tail()
    lb.assert_alive()


async def test_counters_read_right_after_the_handshakes_count_them(launcher: Launcher, gateways: list[Gateway]) -> None:
    """/status and /metrics ask the workers for their counters as they are asked: handshakes a client has
    just made are counted there at once, not one or two seconds later (a report a second, then summed)."""
    lb = start(launcher, {POOL: gateways}, {"pools": {POOL: {"health_check": SLOW_TCP_HEALTH}}})
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    await two_workers(lb)
    for round_ in (1, 2):
        for _ in range(6):
            await visit(lb.ws_url())
        counted = sum(b["handshakes"] for b in (await status(lb))["pools"][POOL]["backends"])
        assert counted == 6 * round_, "/status right after the handshakes"
        text = await metrics_text(lb)
        exported = sum(metric(text, "lb_backend_handshakes_total", pool=POOL, backend=g.id) or 0 for g in gateways)
        assert exported == 6 * round_, "/metrics right after the handshakes"


async def test_a_state_message_past_64k_reaches_the_workers(launcher: Launcher, gateways: list[Gateway]) -> None:
    """600 backends (a states message of ~100 KB): workers keep serving and apply later states."""
    gw1, gw2 = gateways
    many = [Nowhere(f"dead-{i:03d}-{'x' * 40}", f"127.1.{i // 250}.{i % 250 + 1}:9") for i in range(600)]
    lb = start(
        launcher,
        {POOL: gateways, "many": many},
        {"pools": {"many": {"health_check": SLOW_TCP_HEALTH}}},
    )
    lb.wait_states({(POOL, gw1.id): "up", (POOL, gw2.id): "up"})
    before = await two_workers(lb)
    await set_state(lb, gw2.id, "disable")
    try:

        async def only_gw1() -> bool:
            seen = {(await visit(lb.ws_url())).server_id for _ in range(10)}
            assert seen == {gw1.id}, seen
            return True

        # Ties take turns: a worker that still counts gw2 in sends it about half of its visits.
        await wait_until(only_gw1, within=5 * UNIT, every=0.2, what="every worker applying the disable")
    finally:
        await set_state(lb, gw2.id, "enable")
    assert all(process_alive(pid) for pid in before), "a worker died"
    assert "bad control message" not in lb.log_text(), lb.logs_tail()


async def test_sigkill_of_the_owner_takes_the_workers_with_it(tmp_path: Path) -> None:
    """No orphan: the workers exit when their owner is SIGKILLed."""
    with started_stack(tmp_path, gateways=1, overrides={"workers": 2}) as stack:
        workers = await two_workers(stack.balancer)
        assert stack.balancer.proc is not None
        os.kill(stack.balancer.proc.pid, signal.SIGKILL)

        def gone() -> bool:
            return not any(process_alive(pid) for pid in workers)

        await wait_until(gone, within=10 * UNIT, what="every worker gone after SIGKILL of the owner")


async def test_a_stopped_worker_whose_owner_is_sigkilled_resumes_and_frees_the_listener(tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP, a debugger) when its owner is SIGKILLed (the OOM killer) held the SIGTERM
    the kernel sent it, and with it the listening socket, for good: a new `lb run` on the address exited 2
    ('address in use').  It is sent SIGCONT, and stops as a running worker does."""
    with started_stack(tmp_path, gateways=1, overrides={"workers": 2}) as stack:
        lb = stack.balancer
        assert lb.proc is not None and lb.port is not None
        first, second = await two_workers(lb)
        os.kill(first, signal.SIGSTOP)
        os.kill(lb.proc.pid, signal.SIGKILL)
        try:
            await wait_until(lambda: not process_alive(first) and not process_alive(second), within=10 * UNIT,
                             what="the stopped worker gone after SIGKILL of its owner")
        finally:
            if process_alive(first):  # no orphan left by a failure
                os.kill(first, signal.SIGKILL)
        with socket.socket() as probe:  # as a new `lb run` probes it
            probe.bind((HOST, lb.port))
            probe.listen()


async def hold(lb: Balancer, n: int) -> int:
    """Open n tunnels at once; how many got through (the rest are refused)."""
    async with contextlib.AsyncExitStack() as stack:

        async def one() -> bool:
            try:
                ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))
                await recv_hello(ws)
            except (aiohttp.ClientError, OSError, TimeoutError, AssertionError):
                return False
            return True

        results = await asyncio.gather(*(one() for _ in range(n)))
        return sum(results)


async def assert_holds_at(lb: Balancer, limit: int, *, tries: int) -> None:
    """Once both workers serve, three rounds of `tries` tunnels at once: each gets 1 to `limit` of them."""
    await two_workers(lb)
    for _ in range(3):
        got = await hold(lb, tries)
        assert 1 <= got <= limit, got


async def test_max_connections_holds_at_the_configured_number(launcher: Launcher, gateways: list[Gateway]) -> None:
    """limits.max_connections: 4 with 2 workers: never more than 4 tunnels at once."""
    lb = start(launcher, {POOL: gateways}, {"limits": {"max_connections": 4}})
    await assert_holds_at(lb, 4, tries=12)


async def test_backend_max_connections_holds_at_the_configured_number(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A backend's max_connections: 3 with 2 workers: never more than 3 of its tunnels at once."""
    gw1 = gateways[0]
    config = lb_config(pools={POOL: [gw1]}, overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}})
    config["pools"][POOL]["backends"][0]["max_connections"] = 3
    lb2 = launcher.balancer(config)
    lb2.wait_states({(POOL, gw1.id): "up"})
    await assert_holds_at(lb2, 3, tries=10)


async def test_per_ip_handshake_rate_holds_at_the_configured_number(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """handshake_rate_per_ip 1/s, burst 2, 2 workers: a burst of 10 gets at most burst + rate x time."""
    lb = start(launcher, {POOL: gateways}, {"limits": {"handshake_rate_per_ip": 1, "handshake_burst_per_ip": 2}})
    await two_workers(lb)
    started = time.monotonic()

    async def one() -> bool:
        try:
            await visit(lb.ws_url(), within=2 * UNIT)
        except (aiohttp.ClientError, OSError, TimeoutError, AssertionError):
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(10)))
    elapsed = time.monotonic() - started
    assert sum(results) <= 2 + int(elapsed * 1) + 1, (sum(results), elapsed)


async def test_a_worker_killed_while_stopping_is_logged(launcher: Launcher, gateways: list[Gateway]) -> None:
    """Its tunnels were cut without their 1001s: the operator hears of it (nothing was logged)."""
    lb = start(launcher, {POOL: gateways}, {"timeouts": {"shutdown_grace": "4s"}})
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    first, _ = await two_workers(lb)
    mark = lb.log_lines()
    signal_balancer(lb, signal.SIGTERM)
    await wait_for_log(lb, "shutting down", after=mark)
    os.kill(first, signal.SIGKILL)
    assert await wait_exit(lb, 10 * UNIT) == 0
    assert any(f"(pid {first}) exited with -9 while stopping" in line for line in lb.log_text().splitlines()[mark:]), (
        lb.logs_tail()
    )


async def test_a_worker_restarted_as_the_stop_begins_is_not_said_to_have_cut_tunnels(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A worker restarted just before a SIGTERM gets the owner's SIGTERM while its interpreter starts,
    before it can hold it, and ends by it; it had not listened, so it had no tunnel to cut, and the log
    does not say it had (a WARNING `its tunnels were cut`, an operator's false alarm).  The replacement is
    stopped (SIGSTOP) before it holds SIGTERM, so that the owner's SIGTERM finds it there for certain (and
    ends it at once: the kernel does not wait for a stopped process to go on to end it by a default action)."""
    lb = start(launcher, {POOL: gateways})
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    async with _replacement_stopped_as_it_starts(lb, before_it_holds=signal.SIGTERM) as young:
        signal_balancer(lb, signal.SIGTERM)
        assert await wait_exit(lb, 10 * UNIT) == 0
    assert not process_alive(young)
    # Said at INFO ("before it listened: it had no client"), or not at all if the stop began before the
    # owner had it among its workers (a restart's _spawn stops it then, without a word).
    stopping = [line for line in lb.log_text().splitlines() if "while stopping" in line]
    assert all("tunnels were cut" not in line for line in stopping), stopping


async def test_a_restarted_worker_stuck_before_it_listens_is_killed_and_replaced(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A restart's worker stopped as it starts (SIGSTOP here; a hung mount or a starved cgroup alike)
    never listened, so the watchdog, which judges ready workers, never judged it: the instance ran a
    worker short for good.  Past WORKER_READY the owner kills it and starts another, which serves."""
    lb = start(launcher, {POOL: gateways})
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    assert lb.proc is not None
    owner = lb.proc.pid
    async with _replacement_stopped_as_it_starts(lb) as stuck:
        mark = lb.log_lines()
        await wait_until(lambda: len(pids := worker_pids(owner)) == 2 and stuck not in pids,
                         within=WORKER_READY + 10 * UNIT, what="the stuck worker replaced")
    await both_serving(lb)
    logged = "\n".join(lb.log_text().splitlines()[mark:])
    assert f"(pid {stuck}) has not started listening in {WORKER_READY:g}s" in logged, logged[-2000:]


WORKER_READY = 15.0  # the product's bound on a new worker's start (lb.control.workers)
MAX_RESTART_DELAY = 10.0  # and its longest wait before it replaces a worker that keeps dying young


@contextlib.asynccontextmanager
async def _replacement_stopped_as_it_starts(
    lb: Balancer, *, before_it_holds: int | None = None
) -> AsyncIterator[int]:
    """Kill a worker and stop (SIGSTOP) its replacement as soon as it is there, for the block; its PID.
    It goes on (SIGCONT) on the way out, unless it is gone by then.

    With `before_it_holds`, one that already holds that signal (lb.startup_signals, some 30 ms into its
    start) is let go, left to serve and the kill tried again, so that the one given does not."""
    assert lb.proc is not None
    let_go: list[int] = []
    for _ in range(6):
        known = set(await both_serving(lb))
        # The one that has lived longest: a worker that died young is replaced later each time.
        os.kill(min(known, key=lambda pid: let_go.index(pid) if pid in let_go else -1), signal.SIGKILL)
        young = spawned_by(lb, known)
        os.kill(young, signal.SIGSTOP)
        if before_it_holds is None or not catches(young, before_it_holds):
            try:
                yield young
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(young, signal.SIGCONT)
            return
        os.kill(young, signal.SIGCONT)
        let_go.append(young)
    raise AssertionError(f"every replacement held signal {before_it_holds} before it could be stopped")


def spawned_by(lb: Balancer, known: set[int]) -> int:
    """The owner's worker not in `known`, as soon as it is there (ps, polled without yielding: a worker just
    spawned is some 30 ms from holding its signals)."""
    assert lb.proc is not None
    deadline = time.monotonic() + MAX_RESTART_DELAY + 5 * UNIT
    while not (new := set(worker_pids(lb.proc.pid)) - known):
        assert time.monotonic() < deadline, lb.logs_tail()
        time.sleep(0.001)
    return new.pop()
