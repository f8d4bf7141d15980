"""Reload as one transaction: serialized and coalesced SIGHUPs, health checkers replaced (never
duplicated), a reload that cannot bind changes nothing, a backend that leaves and comes back is one
backend with one count, lb_config_reloads_total counts results.  Start-up with a port in use: one
line naming the address, exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.procs import free_port
from tests.harness import HOST, ROOT, UNIT
from tests.harness.clients import assert_echo, find_backend, recv_hello, status, visit, ws_connect
from tests.harness.ops import (
    backend_entry,
    metric,
    metrics_text,
    reload_with,
    signal_balancer,
    start_two,
    token_of,
    two_workers,
    visit_until,
    wait_for_log,
    wait_until,
)
from tests.harness.processes import (
    DeadBackend,
    Gateway,
    Launcher,
    backend_states,
    child_env,
    lb_config,
    poll_while_running,
    run_lb,
)

POOL = "gateways"
PROBE_INTERVAL = 0.1  # seconds between health probes of the counted backend


class ProbeCounter:
    """An HTTP backend that answers /health 200 and counts the probes it receives."""

    def __init__(self, backend_id: str = "counted") -> None:
        self.id = backend_id
        self.probes = 0
        lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    counter.probes += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def rate(self, over: float) -> float:
        start = self.probes
        await asyncio.sleep(over)
        return (self.probes - start) / over

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def counter() -> Iterator[ProbeCounter]:
    counted = ProbeCounter()
    try:
        yield counted
    finally:
        counted.close()


async def test_twenty_sighups_under_traffic_lose_no_tunnel_and_keep_the_probe_rate(
    launcher: Launcher, gateways: list[Gateway], counter: ProbeCounter
) -> None:
    """20 SIGHUPs in a row while tunnels relay: every tunnel survives, probes per second stay the same."""
    health = {"interval": f"{int(PROBE_INTERVAL * 1000)}ms"}
    config = lb_config(
        pools={POOL: gateways, "counted": [counter]},
        routes={"/": POOL, "/counted": "counted"},
        overrides={"limits": {"handshake_rate_per_ip": 0}, "pools": {"counted": {"health_check": health}}},
    )
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    before = await counter.rate(1.5)
    assert before > 0, "the counted backend is never probed"

    async with contextlib.AsyncExitStack() as stack:
        tunnels = [await stack.enter_async_context(ws_connect(lb.ws_url())) for _ in range(5)]
        for ws, _ in tunnels:
            await recv_hello(ws)

        async def traffic() -> int:
            sent = 0
            deadline = time.monotonic() + 10 * UNIT
            while time.monotonic() < deadline and not done.is_set():
                for ws, _ in tunnels:
                    await assert_echo(ws, f"msg-{sent}")
                    sent += 1
                await asyncio.sleep(0.01)
            return sent

        done = asyncio.Event()
        relaying = asyncio.create_task(traffic())
        mark = lb.log_lines()
        for _ in range(20):
            signal_balancer(lb, signal.SIGHUP)
            await asyncio.sleep(0.01)

        async def settled() -> bool:
            text = await metrics_text(lb)
            return (metric(text, "lb_config_reloads_total", result="success") or 0) >= 1

        await wait_until(settled, within=10 * UNIT, what="a successful reload counted")
        await wait_for_log(lb, "reloaded", after=mark)
        await asyncio.sleep(0.5)  # the coalesced reload, if any, runs now
        done.set()
        assert await relaying > 0
        for ws, _ in tunnels:
            await assert_echo(ws, "after 20 SIGHUPs")

    after = await counter.rate(1.5)
    assert after <= before * 1.5 + 2, f"health probes went from {before:.1f}/s to {after:.1f}/s: checkers duplicated"
    text = await metrics_text(lb)
    assert metric(text, "lb_config_reloads_total", result="failure") == 0
    successes = metric(text, "lb_config_reloads_total", result="success") or 0
    assert 1 <= successes <= 20, successes
    assert (await visit(lb.ws_url())).server_id in {g.id for g in gateways}
    lb.assert_alive()


async def test_a_reload_that_cannot_bind_changes_nothing_and_the_next_applies_in_full(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """New listener on a taken port: one log line, old listeners/admin/backends kept; freed, the next applies."""
    gw1, gw2 = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    taken_port = taken.getsockname()[1]
    new_admin_port = free_port()

    changed = copy.deepcopy(config)
    changed["listeners"].append({"bind": f"{HOST}:{taken_port}"})
    changed["admin"]["bind"] = f"{HOST}:{new_admin_port}"
    changed["pools"][POOL]["backends"] = [backend_entry(gw1)]
    try:
        async with ws_connect(lb.ws_url()) as (ws, _):
            await recv_hello(ws)
            mark = lb.log_lines()
            line = await reload_with(lb, changed, expect="reload failed")
            assert f"{HOST}:{taken_port}" in line, line
            failure = [text for text in lb.log_text().splitlines()[mark:] if text.strip()]
            assert len([t for t in failure if "reload" in t]) == 1, failure
            # Nothing changed: admin where it was, both backends, old listener serving.
            text = await metrics_text(lb)
            assert metric(text, "lb_config_reloads_total", result="failure") == 1
            assert metric(text, "lb_config_last_reload_successful") == 0  # LbConfigReloadFailed fires
            states = backend_states(await status(lb))
            assert states.get((POOL, gw2.id)) == "up", states
            with pytest.raises(OSError):
                socket.create_connection((HOST, new_admin_port), timeout=1).close()
            await assert_echo(ws, "after the failed reload")
    finally:
        taken.close()

    await reload_with(lb)
    lb.admin_port = new_admin_port
    states = backend_states(await status(lb))
    assert (POOL, gw2.id) not in states or states[(POOL, gw2.id)] == "removed", states
    text = await metrics_text(lb)
    assert metric(text, "lb_config_reloads_total", result="success") == 1
    assert metric(text, "lb_config_last_reload_successful") == 1  # and clears on the reload that applies
    lb.port = taken_port
    assert (await visit(lb.ws_url())).server_id == gw1.id
    lb.assert_alive()


async def test_a_backend_removed_and_re_added_is_one_backend_with_its_count(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """Remove gw-2 (tunnels live), reload, add it back, reload: one gw-2 in /status with its connections."""
    gw1, gw2 = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    token = token_of(await visit_until(lb.ws_url(), gw2.id, tries=6))
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(ws_connect(lb.ws_url(), cookie=token)) for _ in range(3)]
        for ws, _ in held:
            assert (await recv_hello(ws))["server_id"] == gw2.id
        shrunk = copy.deepcopy(config)
        shrunk["pools"][POOL]["backends"] = [backend_entry(gw1)]
        for step in (shrunk, config):
            await reload_with(lb, step)
        document = await status(lb)
        entries = [b for b in document["pools"][POOL]["backends"] if b["id"] == gw2.id]
        assert len(entries) == 1, entries
        assert entries[0]["connections"] == 3, entries
        assert find_backend(document, POOL, gw2.id)["state"] == "up"
        for ws, _ in held:
            await assert_echo(ws, "still relaying after remove and re-add")

    async def released() -> bool:
        return find_backend(await status(lb), POOL, gw2.id)["connections"] == 0

    await wait_until(released, what="gw-2's count back to 0 once its tunnels closed")


@contextlib.contextmanager
def _port_taken() -> Iterator[int]:
    """A loopback port somebody else listens on, for as long as the block runs."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        yield int(taken.getsockname()[1])


def _run_to_exit(tmp_path: Path, config: dict[str, Any]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`lb run` on CONFIG until it exits by itself; its result and its non-blank stderr lines."""
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_lb("run", "--config", str(path), timeout=20 * UNIT)
    return done, [line for line in done.stderr.splitlines() if line.strip()]


def test_lb_run_with_a_port_in_use_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """A listener port in use: one line naming the address, exit 2, nothing left listening."""
    with _port_taken() as port:
        free = free_port()
        admin = free_port()
        config = lb_config(pools={POOL: [DeadBackend("gw-1", 9)]})
        config["listeners"] = [{"bind": f"{HOST}:{free}"}, {"bind": f"{HOST}:{port}"}]
        config["admin"]["bind"] = f"{HOST}:{admin}"
        done, lines = _run_to_exit(tmp_path, config)
    assert done.returncode == 2, done
    assert len(lines) == 1, lines
    assert f"{HOST}:{port}" in lines[0] and "Traceback" not in lines[0], lines
    for leftover in (free, admin):
        with pytest.raises(OSError):
            socket.create_connection((HOST, leftover), timeout=1).close()


class _Run:
    """`lb run` of its own config (`workers: 2`, a listener on `port`), its output in a file."""

    def __init__(
        self, tmp_path: Path, name: str, port: int, *, workers: int = 2, gateways: list[Gateway] | None = None,
        grace: str = "10s",
    ) -> None:
        pools = {POOL: gateways or [DeadBackend("gw-1", 9)]}
        config = lb_config(pools=pools, overrides={"workers": workers, "timeouts": {"shutdown_grace": grace}})
        config["listeners"] = [{"bind": f"{HOST}:{port}"}]
        self.admin = free_port()
        config["admin"]["bind"] = f"{HOST}:{self.admin}"
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"{name}.log"
        with self.log.open("wb") as log:
            command = [sys.executable, "-m", "lb", "run", "--config", str(tmp_path / f"{name}.yaml")]
            self.proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=log, stderr=log)

    def ready(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.admin), timeout=1) as probe:
            probe.sendall(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return probe.recv(64).startswith(b"HTTP/1.1 200")
        return False

    def wait_ready(self) -> None:
        poll_while_running(
            self.proc, self.ready, within=20 * UNIT, who="lb run", what="never ready", every=0.1,
            tail=lambda: self.log.read_text(errors="replace")[-2000:],
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20 * UNIT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_two_lb_runs_started_at_once_on_one_listener_one_serves_and_the_other_exits_2(tmp_path: Path) -> None:
    """With `workers: N` the owner checked the port, then let it go until its workers bound it, half a second
    later: two `lb run`s started together both passed the check, and both served, splitting the clients."""
    port = free_port()
    runs: list[_Run] = []
    try:
        runs = [_Run(tmp_path, "a", port), _Run(tmp_path, "b", port)]
        deadline = time.monotonic() + 30 * UNIT
        while all(run.proc.poll() is None for run in runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [run for run in runs if run.proc.poll() is not None]
        assert len(refused) == 1, "both served" if not refused else "both exited"
        lines = [line for line in refused[0].log.read_text(errors="replace").splitlines() if line.strip()]
        assert refused[0].proc.returncode == 2 and len(lines) == 1 and f"{HOST}:{port}" in lines[0], lines
        (survivor,) = [run for run in runs if run.proc.poll() is None]
        survivor.wait_ready()  # its workers came up on the port: it alone serves there
        assert survivor.stop() == 0
    finally:
        for run in runs:
            run.kill()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_new_lb_run_takes_the_address_over_while_the_old_one_drains(
    tmp_path: Path, gateways: list[Gateway], workers: int
) -> None:
    """Blue/green on one host: the old balancer, stopped, closes its listeners and drains its tunnels over
    `shutdown_grace`, and the new one starts on the same address meanwhile.  The claim on the address goes
    with the listeners, not with the process."""
    port = free_port()
    old = _Run(tmp_path, "old", port, workers=workers, gateways=gateways, grace="20s")
    new: _Run | None = None
    try:
        old.wait_ready()
        async with ws_connect(f"ws://{HOST}:{port}/ws") as (ws, _):
            await recv_hello(ws)
            old.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: "no longer accepting" in old.log.read_text(errors="replace"),
                             within=10 * UNIT, what="the old balancer's listeners closed")
            new = _Run(tmp_path, "new", port, workers=workers, gateways=gateways)
            await asyncio.to_thread(new.wait_ready)
            assert old.proc.poll() is None, "the old one still drains its tunnel"
            fresh = await visit(f"ws://{HOST}:{port}/ws", within=5 * UNIT)
            assert fresh.hello is not None
            await assert_echo(ws, "the old tunnel relays on")
        assert new.stop() == 0
    finally:
        for run in (old, new):
            if run is not None:
                run.kill()


def test_an_lb_run_with_workers_starts_where_an_earlier_server_left_connections_in_time_wait(tmp_path: Path) -> None:
    """The port holds only TIME_WAIT connections of a server that closed them first (a balancer stopped a
    moment ago): it is free.  A claim that bound the port itself, with SO_REUSEPORT alone, found it in
    use, and a restart from one process to `workers: 2` exited 2 for a minute."""
    with socket.socket() as earlier:
        earlier.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        earlier.bind((HOST, 0))
        earlier.listen(4)
        port = int(earlier.getsockname()[1])
        with socket.create_connection((HOST, port)) as client:
            accepted, _ = earlier.accept()
            accepted.close()  # the server closes first: its side goes to TIME_WAIT
            client.recv(1)
    run = _Run(tmp_path, "after", port)
    try:
        run.wait_ready()
        assert run.stop() == 0
    finally:
        run.kill()


def test_lb_run_with_the_admin_port_in_use_exits_2(tmp_path: Path) -> None:
    """The admin address taken (bound first, before any listener): the same one line, and exit 2."""
    with _port_taken() as port:
        config = lb_config(pools={POOL: [DeadBackend("gw-1", 9)]})
        config["admin"]["bind"] = f"{HOST}:{port}"
        done, lines = _run_to_exit(tmp_path, config)
    assert done.returncode == 2, done
    assert len(lines) == 1 and re.search(rf"{HOST}:\d+", lines[0]), lines


def _backend_labels(text: str, pool: str) -> set[str]:
    """Every `backend` label value of `pool` in an exposition."""
    return {m.group(1) for line in text.splitlines() if f'pool="{pool}"' in line
            for m in [re.search(r'[{,]backend="([^"]*)"', line)] if m}


@pytest.mark.parametrize("workers", [1, 2])
async def test_removed_backends_leave_metrics_within_the_bound_once_their_tunnels_end(
    launcher: Launcher, gateways: list[Gateway], workers: int
) -> None:
    """README: the series of backends that left are kept for the last max(16, ...) to leave.  A backend a
    reload removes while its tunnels run is still counted present; once they have ended it has left.
    The retention was recomputed only at the next reload or DNS change, so after a rollout with long
    tunnels its series stayed past the bound for the process's life."""
    gw = gateways[0]
    generations = 20

    base = lb_config(pools={POOL: [gw]}, overrides={"workers": workers, "limits": {"handshake_rate_per_ip": 0}})

    def config_of(generation: int) -> dict[str, Any]:
        config = copy.deepcopy(base)
        config["pools"][POOL]["backends"] = [{"id": f"g{generation}", "address": gw.address, "weight": 1}]
        return config

    lb = launcher.balancer(config_of(0))
    async with contextlib.AsyncExitStack() as stack:
        for generation in range(generations + 1):
            if generation:
                await reload_with(lb, config_of(generation))
            ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))  # the only backend: g{generation}
            await recv_hello(ws)
        assert len(_backend_labels(await metrics_text(lb), POOL)) == generations + 1  # all live: all present
    # Every tunnel has ended; no reload or DNS change follows.
    bound = 1 + 16  # g20 present, and the last 16 to leave

    async def within_bound() -> bool:
        return len(_backend_labels(await metrics_text(lb), POOL)) <= bound

    await wait_until(within_bound, within=6 * UNIT, what=f"at most {bound} backends' series once the tunnels ended")
    assert f"g{generations}" in _backend_labels(await metrics_text(lb), POOL)
    lb.assert_alive()


@pytest.mark.parametrize("workers", [1, 2])
async def test_pools_renamed_at_every_reload_leave_metrics_bounded(
    launcher: Launcher, gateways: list[Gateway], workers: int
) -> None:
    """A pool renamed at each reload (release names): /metrics keeps the series of the last 16 removed
    pools, not of every pool ever configured (200 reloads grew it from 16 KB to 752 KB)."""
    gw = gateways[0]
    generations = 24
    base = lb_config(pools={"v0": [gw]}, overrides={"workers": workers, "limits": {"handshake_rate_per_ip": 0}})

    def config_of(generation: int) -> dict[str, Any]:
        config = copy.deepcopy(base)
        config["pools"] = {f"v{generation}": config["pools"]["v0"]}
        config["routes"] = [{"path_prefix": "/", "pool": f"v{generation}"}]
        return config

    lb = launcher.balancer(config_of(0))
    for generation in range(generations + 1):
        if generation:
            await reload_with(lb, config_of(generation))
        await visit(lb.ws_url())
    await asyncio.sleep(1.5)  # with workers, their last reports reach the owner
    pools = set(re.findall(r'pool="(v\d+)"', await metrics_text(lb)))
    assert f"v{generations}" in pools
    assert len(pools) <= 1 + 16, f"{len(pools)} pools in /metrics: {sorted(pools)}"
    assert "v0" not in pools
    lb.assert_alive()


async def test_with_workers_a_removed_pools_counters_never_go_back(launcher: Launcher, gateways: list[Gateway]) -> None:
    """Each worker forgets a removed pool on its own: one with no tunnel of it at the 17th removal after, while
    the owner keeps it for another worker's tunnel.  The owner's sum carries that worker's share (a review's
    case: lb_handshake_duration_seconds_count{pool="v0"} fell from 31 to 14)."""
    gw = gateways[0]
    base = lb_config(pools={"v0": [gw]}, overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}})

    def config_of(generation: int) -> dict[str, Any]:
        config = copy.deepcopy(base)
        config["pools"] = {f"v{generation}": config["pools"]["v0"]}
        config["routes"] = [{"path_prefix": "/", "pool": f"v{generation}"}]
        return config

    def count(text: str) -> float:
        found = re.search(r'^lb_handshake_duration_seconds_count\{[^}]*pool="v0"[^}]*\} (\S+)', text, re.MULTILINE)
        return float(found.group(1)) if found else -1.0

    lb = launcher.balancer(config_of(0))
    await two_workers(lb)
    for _ in range(30):
        await visit(lb.ws_url())  # over both workers, as the kernel spreads them
    async with contextlib.AsyncExitStack() as stack:
        ws, _ = await stack.enter_async_context(ws_connect(lb.ws_url()))  # one long tunnel, in one worker
        await recv_hello(ws)
        seen = [count(await metrics_text(lb))]
        for generation in range(1, 19):
            await reload_with(lb, config_of(generation))
            await asyncio.sleep(0.3)
            seen.append(count(await metrics_text(lb)))
    assert seen[0] >= 30 and seen == sorted(seen), f'lb_handshake_duration_seconds_count{{pool="v0"}}: {seen}'
