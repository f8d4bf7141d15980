"""SPEC part 2, rolling updates: SIGTERM → /readyz 503 at once while still serving for
`timeouts.shutdown_delay` → stop accepting → live tunnels get close 1001 spread evenly over
`timeouts.shutdown_grace` → what is left is closed → exit 0.  All measured from the client side.

Gateways are shared by the module; each test starts (and ends) its own balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from lb.control.signal_mask import HANDLED
from tests.harness import HOST, UNIT
from tests.harness.clients import assert_echo, http_get_async, recv_hello, visit, ws_connect
from tests.harness.ops import (
    catches,
    launched,
    signal_balancer,
    signal_set,
    wait_close,
    wait_exit,
    wait_for_log,
    wait_until,
    worker_pids,
)
from tests.harness.processes import Balancer, Gateway, lb_config
from tests.harness.raw import OP_CLOSE, OP_TEXT, RawWs, close_raw, open_raw, read_response, upgrade_request

POOL = "gateways"
GRACE = 1.5  # seconds: timeouts.shutdown_grace of these balancers
DELAY = 1.0  # seconds: timeouts.shutdown_delay of the `delayed` balancer
CLOSE_LINGER = 2.0  # how long the balancer may wait for a client to answer its close (product default)


@pytest.fixture
def lb(tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway]) -> Iterator[Balancer]:
    with launched(tmp_path_factory, "shutdown") as launcher:
        config = lb_config(pools={POOL: gateways}, overrides={"timeouts": {"shutdown_grace": f"{int(GRACE * 1000)}ms"}})
        balancer = launcher.balancer(config)
        balancer.wait_states({(POOL, g.id): "up" for g in gateways})
        yield balancer


def stopping_slowly(
    tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway], name: str, *, grace: float, delay: float,
    workers: int,
) -> Iterator[Balancer]:
    """A balancer with this shutdown delay and grace (seconds) and `workers`, its gateways up."""
    with launched(tmp_path_factory, name) as launcher:
        timeouts = {"shutdown_grace": f"{int(grace * 1000)}ms", "shutdown_delay": f"{int(delay * 1000)}ms"}
        overrides = {"timeouts": timeouts, "workers": workers}
        balancer = launcher.balancer(lb_config(pools={POOL: gateways}, overrides=overrides))
        balancer.wait_states({(POOL, g.id): "up" for g in gateways})
        yield balancer


@pytest.fixture(params=[1, 2], ids=["single", "workers-2"])
def delayed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway]
) -> Iterator[Balancer]:
    yield from stopping_slowly(tmp_path_factory, gateways, "shutdown-delay", grace=GRACE, delay=DELAY,
                               workers=request.param)


async def admin_code(lb: Balancer, path: str) -> int:
    code, _, _ = await http_get_async(lb.admin_url(path))
    return code


async def test_livez_and_readyz_answer_200_while_serving(lb: Balancer) -> None:
    """/livez and /readyz are 200 once the listeners are open."""
    assert await admin_code(lb, "/livez") == 200
    assert await admin_code(lb, "/readyz") == 200


async def test_sigterm_keeps_serving_for_the_delay_with_readyz_503(delayed: Balancer) -> None:
    """During shutdown_delay: /readyz 503, /livez and /healthz 200, new handshakes still served; then they
    are refused and /healthz is 503."""
    async with ws_connect(delayed.ws_url()) as (ws, _):
        await recv_hello(ws)
        sent = time.monotonic()
        signal_balancer(delayed, signal.SIGTERM)

        async def not_ready() -> bool:
            return await admin_code(delayed, "/readyz") == 503

        await wait_until(not_ready, within=0.5 * DELAY, what="/readyz 503 right after SIGTERM")
        assert await admin_code(delayed, "/livez") == 200
        # /status (and the dashboard's banner) say it too, while the listeners still accept.
        status = json.loads((await http_get_async(delayed.admin_url("/status")))[2])
        assert (status["shutting_down"], status["accepting"]) == (True, True), status
        assert await admin_code(delayed, "/healthz") == 200, "SPEC part 1: /healthz is 200 while the balancer serves"
        # Still serving new clients: an L4 balancer may send some until it deregisters us.
        fresh = await visit(delayed.ws_url(), within=2 * UNIT)
        assert fresh.hello is not None
        assert time.monotonic() - sent < DELAY, "the check above must run inside the delay"
        await assert_echo(ws, "during the delay the tunnel relays")

        async def refused() -> bool:
            try:
                await visit(delayed.ws_url(), within=0.5 * UNIT)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return True
            return False

        await wait_until(refused, within=DELAY + 2 * UNIT, what="new handshakes refused after the delay")
        assert await admin_code(delayed, "/healthz") == 503, "no longer serving"
        assert time.monotonic() - sent >= DELAY - 0.1, "handshakes were refused before shutdown_delay ended"
        closed = await wait_close(ws, DELAY + GRACE + 5 * UNIT)
        assert closed.code == 1001, closed
        assert closed.at - sent >= DELAY - 0.1, "a tunnel was closed during the delay"
    assert await wait_exit(delayed, GRACE + CLOSE_LINGER + 5 * UNIT) == 0
    assert "Traceback" not in delayed.log_text(), delayed.logs_tail()


async def test_sigterm_spreads_the_1001_closes_over_the_grace(lb: Balancer) -> None:
    """N tunnels get 1001 at times spread over shutdown_grace, never all in one moment; exit 0."""
    n = 6
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(ws_connect(lb.ws_url())) for _ in range(n)]
        for ws, _ in sockets:
            await recv_hello(ws)
        sent = time.monotonic()
        signal_balancer(lb, signal.SIGTERM)
        closes = await asyncio.gather(*(wait_close(ws, GRACE + 5 * UNIT) for ws, _ in sockets))
    assert all(c.code == 1001 for c in closes), closes
    times = sorted(c.at - sent for c in closes)
    span = times[-1] - times[0]
    # Even spacing: closes at G/n, 2G/n, ... G.  Allow for a busy machine.
    assert span >= 0.5 * GRACE * (n - 1) / n, f"1001s not spread over the grace: {times}"
    assert times[-1] <= GRACE + 2 * UNIT, f"the last 1001 came after the grace: {times}"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < GRACE, f"closes bunched: {times}"
    assert await wait_exit(lb, CLOSE_LINGER + 5 * UNIT) == 0


async def test_during_the_grace_no_new_handshakes_and_tunnels_still_relay(lb: Balancer) -> None:
    """After SIGTERM (no delay): /healthz and /readyz 503, new handshakes refused, live tunnels relay."""
    async with ws_connect(lb.ws_url()) as (ws, _), ws_connect(lb.ws_url()) as (late, _):
        await recv_hello(ws)
        await recv_hello(late)
        signal_balancer(lb, signal.SIGTERM)

        async def unhealthy() -> bool:
            return await admin_code(lb, "/healthz") == 503 and await admin_code(lb, "/readyz") == 503

        await wait_until(unhealthy, within=GRACE, what="/healthz and /readyz 503 during the shutdown grace")
        with pytest.raises((aiohttp.ClientError, OSError, asyncio.TimeoutError)):
            await visit(lb.ws_url(), within=2 * UNIT)
        # Of the two tunnels, the younger is closed last (as the grace ends).
        await assert_echo(late, "during the grace the tunnel still relays")
    assert await wait_exit(lb, GRACE + CLOSE_LINGER + 5 * UNIT) == 0
    assert "Traceback" not in lb.log_text(), lb.logs_tail()


async def test_a_lone_tunnel_relays_through_the_grace_and_gets_its_1001_as_it_ends(lb: Balancer) -> None:
    """SPEC: SIGTERM closes tunnels with 1001 after `timeouts.shutdown_grace`.  Spread over the grace,
    one tunnel's close is the last step's, at its end: it got its 1001 at once before."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        sent = time.monotonic()
        signal_balancer(lb, signal.SIGTERM)
        await asyncio.sleep(0.5 * GRACE)
        await assert_echo(ws, "halfway through the grace")
        closed = await wait_close(ws, GRACE + 5 * UNIT)
    assert closed.code == 1001, closed
    assert closed.at - sent >= 0.9 * GRACE, f"1001 after {closed.at - sent:.2f}s of a {GRACE}s grace"
    assert await wait_exit(lb, CLOSE_LINGER + 5 * UNIT) == 0


async def test_sigterm_without_tunnels_exits_0_promptly(lb: Balancer) -> None:
    """Nothing to wait for: the grace is not spent, the process just stops with 0."""
    await visit(lb.ws_url())
    sent = time.monotonic()
    signal_balancer(lb, signal.SIGTERM)
    assert await wait_exit(lb, 5 * UNIT) == 0
    assert time.monotonic() - sent < GRACE + 1.0, "an idle balancer should not wait out the grace"


async def test_client_that_ignores_the_1001_is_cut_and_exit_is_still_0(lb: Balancer) -> None:
    """A client that never answers the close frame does not keep the balancer alive."""
    assert lb.port is not None
    async with RawWs.connect(lb.port) as raw:
        opcode, _, _ = await raw.recv_message()
        assert opcode == OP_TEXT  # the hello
        signal_balancer(lb, signal.SIGTERM)
        frame = await raw.recv_frame(within=GRACE + 5 * UNIT)
        assert frame.opcode == OP_CLOSE
        assert struct.unpack("!H", frame.payload[:2])[0] == 1001
        # We never answer; the balancer must still finish.
        assert await wait_exit(lb, GRACE + CLOSE_LINGER + 5 * UNIT) == 0


async def test_a_client_that_connected_as_the_stop_began_gets_its_503(lb: Balancer) -> None:
    """README: on SIGTERM, handshakes that have not reached a backend get 503 with Retry-After.  One whose
    connection was accepted and whose head had not arrived yet got a FIN and no answer."""
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    await asyncio.sleep(0.2)  # accepted, nothing sent yet
    mark = lb.log_lines()
    signal_balancer(lb, signal.SIGTERM)
    await wait_for_log(lb, "no longer accepting connections", after=mark)
    await asyncio.sleep(0.2)  # the stop has gone over the connections in flight
    writer.write(upgrade_request(host=f"{HOST}:{lb.port}"))
    response = await read_response(reader)
    assert response.status == 503 and response.get("Retry-After"), response
    await close_raw(writer)
    assert await wait_exit(lb, GRACE + 5 * UNIT) == 0


async def test_sigquit_stops_gracefully_like_sigterm(lb: Balancer) -> None:
    """nginx's graceful stop (its image's STOPSIGNAL): a live tunnel gets its 1001 and the exit is 0.  Python's
    default ended the process at once, the tunnel cut with no close frame."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        signal_balancer(lb, signal.SIGQUIT)
        closed = await wait_close(ws, GRACE + 5 * UNIT)
    assert closed.code == 1001, closed
    assert await wait_exit(lb, GRACE + 5 * UNIT) == 0


async def test_a_silent_connection_holds_a_stop_for_a_moment_only(lb: Balancer) -> None:
    """A connection that sends nothing is waited for briefly (its head may be on its way), then closed: it
    held every stop for the stop's bound (a review's case: 0.11 s became 9.9 s), and anyone can open one."""
    assert lb.port is not None
    _, writer = await open_raw(lb.port)
    await asyncio.sleep(0.2)  # accepted
    sent = time.monotonic()
    signal_balancer(lb, signal.SIGTERM)
    assert await wait_exit(lb, 10 * UNIT) == 0
    assert time.monotonic() - sent < 2.2, "a silent connection held the stop"
    await close_raw(writer)


@pytest.mark.parametrize("sent", [b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /whoami HTTP/1.1\r\nHost: a\r\n"],
                         ids=["idle-keep-alive", "part-of-a-head"])
async def test_a_quiet_tls_client_that_never_answers_close_notify_does_not_hold_the_stop(
    tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway], sent: bytes
) -> None:
    """Closed at once, as on a plain listener, but its TLS transport waited for a close_notify that a pooled
    client never sends, and held the exit for the whole grace with no tunnel open."""
    import socket
    import ssl

    from tests.harness.processes import lb_certs

    grace = 8.0
    with launched(tmp_path_factory, "shutdown-tls") as launcher:
        certs = lb_certs(launcher.workdir / "certs")
        config = lb_config(pools={POOL: gateways}, tls=(certs / "server.crt", certs / "server.key"),
                           overrides={"timeouts": {"shutdown_grace": f"{grace:g}s"}})
        lb = launcher.balancer(config)
        lb.wait_states({(POOL, g.id): "up" for g in gateways})
        assert lb.tls_port is not None
        raw = socket.create_connection((HOST, lb.tls_port), timeout=5)
        with ssl.create_default_context(cafile=str(certs / "ca.crt")).wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(sent)
            if sent.endswith(b"\r\n\r\n"):
                assert tls.recv(65536).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.3)
            started = time.monotonic()
            signal_balancer(lb, signal.SIGTERM)
            assert await wait_exit(lb, within=grace + 10) == 0  # the socket stays open, unread, meanwhile
            assert time.monotonic() - started < grace / 2, lb.logs_tail()


LONG_GRACE = 20.0  # seconds: a stop that a second Ctrl-C must not have to wait out
LONG_DELAY = 3.0


@pytest.fixture(params=[1, 2], ids=["single", "workers-2"])
def patient(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway]
) -> Iterator[Balancer]:
    yield from stopping_slowly(tmp_path_factory, gateways, "shutdown-patient", grace=LONG_GRACE, delay=LONG_DELAY,
                               workers=request.param)


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_ctrl_c_stops_at_once(patient: Balancer, first: int) -> None:
    """Ctrl-C again while stopping is "stop now", as at any server run at a terminal: the rest of the
    delay and the grace is not waited for, every tunnel gets its 1001 together, and the exit is 0.  Before,
    the second signal did nothing: only the grace's end (or SIGKILL) ended it."""
    n = 4
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(ws_connect(patient.ws_url())) for _ in range(n)]
        for ws, _ in sockets:
            await recv_hello(ws)
        mark = patient.log_lines()
        signal_balancer(patient, first)
        await wait_for_log(patient, "shutting down: /readyz answers 503", after=mark)
        await asyncio.sleep(0.5)
        sent = time.monotonic()
        signal_balancer(patient, signal.SIGINT)
        closes = await asyncio.gather(*(wait_close(ws, 5 * UNIT) for ws, _ in sockets))
    assert all(c.code == 1001 for c in closes), closes
    assert max(c.at for c in closes) - sent < 2 * UNIT, [c.at - sent for c in closes]
    assert await wait_exit(patient, 5 * UNIT) == 0
    assert time.monotonic() - sent < LONG_DELAY + 2 * UNIT
    assert "stopping now" in patient.log_text() and "Traceback" not in patient.log_text(), patient.logs_tail()


async def test_a_second_sigterm_is_not_a_hurry_but_says_how_to_stop_now(lb: Balancer) -> None:
    """`pkill -f 'lb run'` and a supervisor that repeats itself send SIGTERM twice in an ordinary stop: the
    tunnels still get their grace.  The log says, once, what would stop at once."""
    async with ws_connect(lb.ws_url()) as (ws, _):
        await recv_hello(ws)
        sent = time.monotonic()
        for _ in range(3):
            signal_balancer(lb, signal.SIGTERM)
            await asyncio.sleep(0.1)
        await wait_for_log(lb, "already stopping")
        await assert_echo(ws, "the grace goes on")
        closed = await wait_close(ws, GRACE + 5 * UNIT)
    assert closed.code == 1001 and closed.at - sent >= 0.9 * GRACE, (closed, closed.at - sent)
    assert await wait_exit(lb, CLOSE_LINGER + 5 * UNIT) == 0
    assert lb.log_text().count("already stopping") == 1, lb.logs_tail()


@pytest.fixture(params=[1, 2], ids=["single", "workers-2"])
def brief(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, gateways: list[Gateway]
) -> Iterator[Balancer]:
    yield from stopping_slowly(tmp_path_factory, gateways, "shutdown-brief", grace=0.2, delay=0.0,
                               workers=request.param)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1],
                         ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGUSR1"])
async def test_signals_until_the_very_exit_leave_the_exit_code_0(brief: Balancer, sig: int) -> None:
    """A stop ends with exit 0 whatever signal comes while it ends: closing the event loop put back each
    signal's default action some 10 ms before the process was gone, so a second `kill`, a config reloader's
    SIGHUP or a logrotate's SIGUSR1 in that moment ended a clean stop by that signal (-15, -1)."""
    assert brief.proc is not None
    signal_balancer(brief, signal.SIGTERM)
    deadline = time.monotonic() + 10 * UNIT
    sent = 0
    while brief.proc.poll() is None and time.monotonic() < deadline:
        brief.proc.send_signal(sig)  # a no-op once the process is reaped
        sent += 1
        await asyncio.sleep(0.002)
    assert await wait_exit(brief, 5 * UNIT) == 0, (sent, brief.logs_tail())
    assert "Traceback" not in brief.log_text(), brief.logs_tail()


async def test_no_thread_but_the_main_one_takes_a_signal(brief: Balancer) -> None:
    """The kernel hands a signal to any thread that does not block it, and as a stop ends each one's
    action is the default for a moment, while the main thread holds them back: libuv's four threads,
    started by the first listener's lookup, took them, and a SIGTERM then ended a clean stop with 143."""
    assert brief.proc is not None
    owner = brief.proc.pid
    processes = [owner, *worker_pids(owner)]  # its workers are all up once its gateways are (the fixture)
    if len(processes) > 1 and os.environ.get("LB_TEST_EVENT_LOOP") == "asyncio" and sys.version_info < (3, 12):
        pytest.skip("Python 3.11's asyncio watches each worker from a thread of its own (ThreadedChildWatcher), "
                    "which takes signals; it ends with its worker, before a stop's last moment")
    await wait_until(lambda: all(catches(pid, signal.SIGUSR2) for pid in processes), within=10 * UNIT,
                     what="every process serving")
    wanted = sum(1 << (signum - 1) for signum in HANDLED)
    for pid in processes:
        threads = {int(task.name): signal_set(task / "status", "SigBlk") for task in _threads(pid)}
        assert len(threads) > 1, f"no thread but the main one in {pid}: nothing tried"
        taking = {tid: hex(mask) for tid, mask in threads.items() if tid != pid and mask & wanted != wanted}
        assert not taking, (pid, taking)


def _threads(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())

