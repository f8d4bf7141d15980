"""SPEC "Errors" and the operator's reload: SIGHUP re-reads the config file.  A valid one is applied without
cutting a live tunnel; an invalid one is logged and the running config keeps serving.

Gateways are shared by the module; each test starts its own balancer (it rewrites the config file).
"""

from __future__ import annotations

import asyncio
import copy
import re
import signal
import time

import pytest

from tests.harness import UNIT
from tests.harness.clients import assert_echo, find_backend, recv_hello, status, visit, ws_connect
from tests.harness.ops import (
    backend_entry,
    metrics_text,
    reload_with,
    rewrite_config,
    signal_balancer,
    start_two,
    token_of,
    visit_until,
    wait_exit,
    wait_for_log,
    wait_until,
)
from tests.harness.processes import Gateway, Launcher, backend_states

POOL = "gateways"


GATEWAYS = 3  # gw-1..3 for the whole module (nothing here changes them); see conftest `gateways`


async def test_sighup_adds_a_backend_without_cutting_a_tunnel(launcher: Launcher, gateways: list[Gateway]) -> None:
    """A backend added to the file shows in /status after SIGHUP, takes new clients; an open tunnel and an
    existing cookie keep working."""
    gw1, gw2, gw3 = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)

    first = await visit(lb.ws_url())
    token = token_of(first)
    async with ws_connect(lb.ws_url(), cookie=token) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == first.server_id
        grown = copy.deepcopy(config)
        grown["pools"][POOL]["backends"].append(backend_entry(gw3))
        rewrite_config(lb, grown)
        mark = lb.log_lines()
        signal_balancer(lb, signal.SIGHUP)

        async def gw3_up() -> bool:
            return backend_states(await status(lb)).get((POOL, gw3.id)) == "up"

        await wait_until(gw3_up, what=f"{gw3.id} up in /status after SIGHUP")
        await wait_for_log(lb, "reloaded", after=mark)
        entry = find_backend(await status(lb), POOL, gw3.id)
        assert entry["address"] == gw3.address

        await assert_echo(ws, "tunnel survives the reload")
        assert (await visit(lb.ws_url(), cookie=token)).server_id == first.server_id, "old cookie still sticks"
        landed = {(await visit(lb.ws_url())).server_id for _ in range(9)}
        assert gw3.id in landed, f"the added backend takes new clients: {landed}"
        await assert_echo(ws, "and after new clients")
    lb.assert_alive()


@pytest.mark.parametrize(
    "broken",
    [
        "listeners: [\n  - bind: 127.0.0.1:1\n  this is: [not yaml\n",
        "pools:\n  gateways:\n    backends: [{id: gw-1, address: nowhere}]\n",
        "",
    ],
    ids=["bad yaml", "invalid values", "empty file"],
)
async def test_sighup_with_a_broken_config_keeps_the_old_one(
    launcher: Launcher, gateways: list[Gateway], broken: str
) -> None:
    """An invalid file on SIGHUP: an error in the log, the balancer keeps serving as before."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    first = await visit(lb.ws_url())
    token = token_of(first)
    before = backend_states(await status(lb))

    async with ws_connect(lb.ws_url(), cookie=token) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == first.server_id
        line = await reload_with(lb, broken, expect="reload failed")
        assert "ERROR" in line or "error" in line.lower(), line
        assert "configuration: :" not in line and ": ;" not in line, f"a problem of the whole file has no path: {line}"

        lb.assert_alive()
        await assert_echo(ws, "tunnel survives a failed reload")
        assert backend_states(await status(lb)) == before
        assert (await visit(lb.ws_url(), cookie=token)).server_id == first.server_id
        landed = {(await visit(lb.ws_url())).server_id for _ in range(4)}
        assert landed <= {gw1.id, gw2.id}, landed  # new clients are still served by the old pool

    # The file fixed again: the next SIGHUP applies it.
    await reload_with(lb, config)
    lb.assert_alive()


async def test_a_reload_with_many_problems_logs_one_bounded_line_and_tunnels_keep_relaying(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A large file is parsed off the event loop (a live tunnel keeps echoing meanwhile), and its
    problems make one log line of at most 20, pointing at `lb validate` for the rest."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    broken = copy.deepcopy(config)
    broken["trusted_proxies"] = [f"not-a-cidr-{i}" for i in range(80_000)]  # about 2 MB, 80,000 problems
    first = await visit(lb.ws_url())
    async with ws_connect(lb.ws_url(), cookie=token_of(first)) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == first.server_id
        rewrite_config(lb, broken)
        mark = lb.log_lines()
        signal_balancer(lb, signal.SIGHUP)
        echoes = 0
        # Bounded in time, not in echoes: on a loaded machine a few thousand echoes fit in one parse.
        deadline = time.monotonic() + 60 * UNIT
        while not any("reload failed" in line for line in lb.log_text().splitlines()[mark:]):
            await assert_echo(ws, f"during the parse {echoes}")
            echoes += 1
            assert time.monotonic() < deadline, f"the reload never ended ({echoes} echoes)"
        # Parsed on the event loop, the file froze the tunnel: one echo at most would straddle the parse.
        assert echoes >= 3, f"only {echoes} echo(es) while the file was parsed"
        line = await wait_for_log(lb, "reload failed", after=mark)
        assert line.count("trusted_proxies[") == 20 and "and 79980 more" in line and "lb validate" in line, line[:500]
        assert len(line) < 10_000, len(line)
        await assert_echo(ws, "after the failed reload")
    lb.assert_alive()


async def test_a_sigterm_while_a_large_file_is_checked_stops_at_once(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """README: a reload still reading or checking its file when the stop comes is abandoned, and the exit does
    not wait for its check.  The stop waited for it (up to 5 s) before it began: the delay and the grace
    started that late, past terminationGracePeriodSeconds."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    large = copy.deepcopy(config)
    large["trusted_proxies"] = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/32" for i in range(80_000)]
    rewrite_config(lb, large)
    mark = lb.log_lines()
    signal_balancer(lb, signal.SIGHUP)
    await asyncio.sleep(0.2 * UNIT)  # the check has begun
    signal_balancer(lb, signal.SIGTERM)
    assert await wait_exit(lb, within=60 * UNIT) == 0, lb.logs_tail()
    lines = lb.log_text().splitlines()[mark:]
    stop = next(i for i, line in enumerate(lines) if "no longer accepting connections" in line)
    applied = [i for i, line in enumerate(lines) if "reloaded configuration" in line]
    if applied and applied[0] < stop:
        pytest.skip("this machine checked the file before the SIGTERM came: nothing to abandon")
    abandoned = [i for i, line in enumerate(lines) if "reload abandoned" in line]
    assert not abandoned or stop < abandoned[0], lines  # the stop began before the check ended


async def test_sighup_removing_a_backend_keeps_its_live_tunnel(launcher: Launcher, gateways: list[Gateway]) -> None:
    """A backend removed from the file takes no new client, but its open tunnel runs until it ends."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    pinned = token_of(await visit_until(lb.ws_url(), gw2.id, tries=4))

    async with ws_connect(lb.ws_url(), cookie=pinned) as (ws, _):
        assert (await recv_hello(ws))["server_id"] == gw2.id
        shrunk = copy.deepcopy(config)
        shrunk["pools"][POOL]["backends"] = [backend_entry(gw1)]
        await reload_with(lb, shrunk)

        assert {(await visit(lb.ws_url())).server_id for _ in range(4)} == {gw1.id}
        moved = await visit(lb.ws_url(), cookie=pinned)
        assert moved.server_id == gw1.id and moved.cookie is not None, "a token for a removed backend is replaced"
        await assert_echo(ws, "the removed backend's tunnel still relays")
        states = backend_states(await status(lb))
        assert states.get((POOL, gw2.id)) in (None, "removed"), states
    lb.assert_alive()


async def test_a_reload_that_changes_restart_only_settings_says_so(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """`workers` and `runtime.event_loop` take a restart: a reload applies the rest and warns of each, with
    what still runs, instead of a silent success that /status and the metrics then misdescribe."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    changed = copy.deepcopy(config)
    changed["workers"] = 2
    running = config.get("runtime", {}).get("event_loop")
    changed["runtime"] = {"event_loop": "asyncio" if running == "uvloop" else "uvloop"}
    hash_before = _config_hash(await metrics_text(lb))
    mark = lb.log_lines()
    await reload_with(lb, changed)
    await wait_for_log(lb, "workers: 2 (running: 1): the reload applied everything else; this takes a restart",
                       after=mark)
    await wait_for_log(lb, "runtime.event_loop: ", after=mark)
    assert (await visit(lb.ws_url())).server_id in {gw1.id, gw2.id}
    # What runs is unchanged, so is its hash: the file's `workers: 2` hashed alike a replica started with two
    # workers, and LbConfigDrift missed the difference.
    assert _config_hash(await metrics_text(lb)) == hash_before
    lb.assert_alive()


async def test_a_reload_that_renames_a_pool_says_its_pins_are_dropped(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """A pin names its pool: a reload that renames one gives every client of it a new cookie, and some
    move.  The reload applies it and says so, naming the name to keep."""
    gw1, gw2, _ = gateways
    lb, config = start_two(launcher, POOL, gw1, gw2)
    renamed = copy.deepcopy(config)
    renamed["pools"] = {"arena": renamed["pools"].pop(POOL)}
    renamed["routes"] = [dict(route, pool="arena") for route in renamed["routes"]]
    mark = lb.log_lines()
    await reload_with(lb, renamed)
    await wait_for_log(lb, f"pool {POOL} is gone and pool arena has its backends ({gw1.id}, {gw2.id})", after=mark)
    assert (await visit(lb.ws_url())).server_id in {gw1.id, gw2.id}
    lb.assert_alive()


def _config_hash(exposition: str) -> str:
    found = re.search(r'^lb_build_info\{[^}]*config_hash="([0-9a-f]+)"', exposition, re.MULTILINE)
    assert found, "no lb_build_info in /metrics"
    return found.group(1)
