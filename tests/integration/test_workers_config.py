"""`workers: 2`: only the owner reads the config file; its workers run the text the owner runs.

A file rewritten between the owner's read on SIGHUP and the workers' reload, or since the owner last
read it, must not make a worker run something else than the owner's /status shows: the workers parse the
owner's text (handed over at their start and with every reload), never the file.  The same holds for the
files that text names (`${file:PATH}`, a mounted Secret holding the cookie keys): the owner hands over what
it read, and a key rewritten meanwhile cannot leave the workers sealing cookies with different keys.

Each test starts its own balancer over the module's gateways (they rewrite its config file); which worker
served a handshake is read from its access log line (`worker-N lb.access: ... backend=ID`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import UNIT
from tests.harness.clients import status, visit
from tests.harness.ops import (
    admin_post,
    admin_request,
    backend_entry,
    metric,
    metrics_text,
    paused,
    rewrite_config,
    set_state,
    signal_balancer,
    token_of,
    two_workers,
    wait_until,
    worker_pids,
)
from tests.harness.processes import Balancer, Gateway, Launcher, backend_states, lb_config, new_key

POOL = "gateways"
GATEWAYS = 3  # gw-1..3 for the whole module; see conftest `gateways`
BROKEN = "listeners: [\n  - bind: 127.0.0.1:1\n  this is: [not yaml\n"
_ACCESS = re.compile(r" (worker-\d+) lb\.access: event=request .*\bbackend=(\S+)")
_AFFINITY = re.compile(r" (worker-\d+) lb\.access: event=request .*\baffinity=(\S+)")
# Every line names its process before the logger: `owner`, or a worker's `worker-N`.
_OWNER_RELOAD = re.compile(r" (INFO|ERROR) owner lb\.control\.balancer: (reloaded configuration|reload failed)")


def two_worker_balancer(launcher: Launcher, *gateways: Gateway) -> tuple[Balancer, dict[str, object]]:
    config = lb_config(pools={POOL: gateways}, overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}})
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    return lb, config


def lines_after(lb: Balancer, mark: int) -> list[str]:
    return lb.log_text().splitlines()[mark:]


def served(lb: Balancer, mark: int) -> list[tuple[str, str]]:
    """(worker-N, backend id) of every handshake logged after line `mark`."""
    return [(m[1], m[2]) for line in lines_after(lb, mark) if (m := _ACCESS.search(line))]


def worker_index(pid: int) -> int:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--index") + 1])


async def replace_worker(lb: Balancer, pid: int) -> tuple[str, int]:
    """SIGKILL worker `pid` and wait until the owner's replacement for it is listening; returns the
    replacement's name in the log and the log mark from before the kill."""
    victim = f"worker-{worker_index(pid)}"
    assert lb.proc is not None
    owner = lb.proc.pid
    mark = lb.log_lines()
    os.kill(pid, signal.SIGKILL)
    await wait_until(
        lambda: len(pids := worker_pids(owner)) == 2 and pid not in pids, within=10 * UNIT,
        what="a replacement worker",
    )
    await wait_until(
        lambda: any(f" {victim} " in line and "listening on" in line for line in lines_after(lb, mark)),
        within=10 * UNIT, what=f"the replacement {victim} listening",
    )
    return victim, mark


async def test_a_file_rewritten_during_a_reload_cannot_split_the_owner_from_its_workers(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """SIGHUP, then the file overwritten with a broken one 2 ms later: the workers apply what the owner
    applied, so /status and the data path agree (every worker sends new clients to the added gw-3) and no
    worker fails the reload."""
    gw1, gw2, gw3 = gateways
    lb, config = two_worker_balancer(launcher, gw1, gw2)
    await two_workers(lb)
    grown = copy.deepcopy(config)
    grown["pools"][POOL]["backends"].append(backend_entry(gw3))  # type: ignore[index]
    for _ in range(10):
        mark = lb.log_lines()
        rewrite_config(lb, grown)
        signal_balancer(lb, signal.SIGHUP)
        await asyncio.sleep(0.002)  # as config management or an editor would: the file changes again at once
        rewrite_config(lb, BROKEN)
        outcome = await wait_until(
            lambda at=mark: next((line for line in lines_after(lb, at) if _OWNER_RELOAD.search(line)), None),
            what="the owner's reload logged",
        )
        if "reloaded" in outcome:
            break
        # The owner itself was too slow to read the valid file this time: nothing to check, try again.
    else:
        raise AssertionError(f"the owner never read the valid file before it was overwritten:\n{lb.logs_tail()}")

    def worker_outcomes() -> dict[str, str] | None:
        found: dict[str, str] = {}
        for line in lines_after(lb, mark):
            if m := re.search(r" (worker-\d+) lb\.control\.balancer: (reloaded configuration|reload failed.*)", line):
                found[m[1]] = m[2]
        return found if len(found) == 2 else None

    outcomes = await wait_until(worker_outcomes, what="both workers' reloads logged")
    assert all(o == "reloaded configuration" for o in outcomes.values()), outcomes
    assert not [line for line in lines_after(lb, mark) if "could not apply the reload" in line]

    async def gw3_up() -> bool:
        return backend_states(await status(lb)).get((POOL, gw3.id)) == "up"

    await wait_until(gw3_up, what=f"{gw3.id} up in the owner's /status")
    mark = lb.log_lines()
    for _ in range(120):
        await visit(lb.ws_url())
        if {w for w, backend in served(lb, mark) if backend == gw3.id} == {"worker-0", "worker-1"}:
            break
    else:
        raise AssertionError(f"not every worker sent a client to {gw3.id}: {served(lb, mark)}")
    lb.assert_alive()


async def test_a_restarted_worker_runs_the_owners_config_not_the_file_changed_since(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """The file changed without a SIGHUP (to gw-3 only), then a worker is SIGKILLed: its replacement runs the
    owner's config (gw-1, gw-2), not what the file says now."""
    gw1, gw2, gw3 = gateways
    lb, config = two_worker_balancer(launcher, gw1, gw2)
    before = await two_workers(lb)
    elsewhere = copy.deepcopy(config)
    elsewhere["pools"][POOL]["backends"] = [backend_entry(gw3)]  # type: ignore[index]
    rewrite_config(lb, elsewhere)  # and no SIGHUP
    victim, mark = await replace_worker(lb, before[0])
    for _ in range(60):
        assert (await visit(lb.ws_url())).server_id != gw3.id, f"a worker ran the file:\n{lb.logs_tail()}"
        if sum(w == victim for w, _ in served(lb, mark)) >= 6:
            break
    else:
        raise AssertionError(f"the replacement {victim} served no client: {served(lb, mark)}")
    assert {backend for w, backend in served(lb, mark) if w == victim} <= {gw1.id, gw2.id}
    assert set(backend_states(await status(lb))) == {(POOL, gw1.id), (POOL, gw2.id)}
    lb.assert_alive()


def _gw1_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in data["pools"][POOL]["backends"] if b["id"] == "gw-1"]


async def _wait_gw1_removed_with_2_tunnels(lb: Balancer) -> None:
    """/status shows gw-1 `removed` (state disabled) with its 2 tunnels, and lb_active_connections counts them."""

    async def shown_removed() -> bool:
        rows = _gw1_rows(await status(lb))
        return [(row["state"], row["removed"], row["connections"]) for row in rows] == [("disabled", True, 2)]

    await wait_until(shown_removed, what="gw-1 removed with its 2 tunnels", within=10 * UNIT)
    assert metric(await metrics_text(lb), "lb_active_connections", pool=POOL, backend="gw-1") == 2


async def _wait_gw1_gone(lb: Balancer) -> None:
    async def gone() -> bool:
        return not _gw1_rows(await status(lb)) and metric(
            await metrics_text(lb), "lb_active_connections", pool=POOL, backend="gw-1") is None

    await wait_until(gone, what="gw-1 gone once its tunnels ended", within=10 * UNIT)


async def test_a_removed_backend_counts_its_tunnels_down_to_none(launcher: Launcher, gateways: list[Gateway]) -> None:
    """workers: 2, tunnels on gw-1, then a reload that removes gw-1: the owner shows it `removed` with its
    live tunnels (in /status and lb_active_connections), and once they end, not at all.  The workers'
    reports carry their removed backends; without them the owner's count stayed at its last value."""
    lb, config = two_worker_balancer(launcher, *gateways)
    async with contextlib.AsyncExitStack() as tunnels:
        await _remove_gw1_under_2_tunnels(lb, config, tunnels)
    await _wait_gw1_gone(lb)


async def _remove_gw1_under_2_tunnels(
    lb: Balancer, config: dict[str, Any], tunnels: contextlib.AsyncExitStack
) -> list[aiohttp.ClientWebSocketResponse]:
    """Two tunnels on gw-1 (kept open by `tunnels`), then a reload without gw-1, seen by the owner."""
    from tests.harness.clients import recv_hello, ws_connect

    on_gw1: list[aiohttp.ClientWebSocketResponse] = []
    while len(on_gw1) < 2:
        async with contextlib.AsyncExitStack() as attempt:
            ws, _ = await attempt.enter_async_context(ws_connect(lb.ws_url()))
            if (await recv_hello(ws))["server_id"] == "gw-1":
                tunnels.push_async_callback(attempt.pop_all().aclose)  # kept open until the reload is seen
                on_gw1.append(ws)

    async def counted() -> bool:  # the owner knows of them: the workers report every second
        return [row["connections"] for row in _gw1_rows(await status(lb))] == [2]

    await wait_until(counted, what="the owner counting gw-1's 2 tunnels", within=10 * UNIT)
    changed = copy.deepcopy(config)
    changed["pools"][POOL]["backends"] = [b for b in changed["pools"][POOL]["backends"] if b["id"] != "gw-1"]
    rewrite_config(lb, changed)
    signal_balancer(lb, signal.SIGHUP)
    await _wait_gw1_removed_with_2_tunnels(lb)
    return on_gw1


async def test_a_removed_backends_tunnels_are_the_operators_to_close(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """workers: 2, a reload removes gw-1 while 2 tunnels run on it: /status lists it `removed`, and a drain
    with close_after/rate closes them with 1012 in every worker (it answered 404: a decommission begun by
    the config, or by DNS, could not be finished by the operator).  Enable cannot bring it back (409); once
    its tunnels have ended it is unknown again (404)."""
    lb, config = two_worker_balancer(launcher, *gateways)
    async with contextlib.AsyncExitStack() as stack:
        on_gw1 = await _remove_gw1_under_2_tunnels(lb, config, stack)
        code, body, _ = await admin_post(lb, f"/pools/{POOL}/backends/gw-1/enable")
        assert code == 409, (code, body)
        answer = await set_state(lb, "gw-1", "drain", pool=POOL, params={"close_after": "0s", "rate": "50"})
        assert (answer["state"], answer["removed"]) == ("disabled", True), answer
        for ws in on_gw1:
            async with asyncio.timeout(10 * UNIT):
                closed = await ws.receive()
            assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1012), (closed.type, closed.data)
    await _wait_gw1_gone(lb)
    code, body, _ = await admin_post(lb, f"/pools/{POOL}/backends/gw-1/drain")
    assert code == 404, (code, body)


async def test_a_backend_removed_right_after_its_tunnels_opened_still_shows_them(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """workers: 2, tunnels on gw-1 and at once a reload that removes gw-1, before a worker's report has told
    the owner of them: /status still shows gw-1 `removed` with its tunnels, and lb_active_connections counts
    them.  The owner keeps a removed backend until every worker has reported after the reload; it dropped one
    it counted at 0, and its tunnels ran on counted nowhere."""
    from tests.harness.clients import recv_hello, ws_connect
    from tests.harness.ops import visit_until

    lb, config = two_worker_balancer(launcher, *gateways)
    await two_workers(lb)
    changed = copy.deepcopy(config)
    changed["pools"][POOL]["backends"] = [b for b in changed["pools"][POOL]["backends"] if b["id"] != "gw-1"]
    token = token_of(await visit_until(lb.ws_url(), "gw-1", tries=20))
    rewrite_config(lb, changed)  # now, so that the SIGHUP follows the tunnels within milliseconds
    async with contextlib.AsyncExitStack() as tunnels:
        for _ in range(2):
            ws, _ = await tunnels.enter_async_context(ws_connect(lb.ws_url(), cookie=token))
            assert (await recv_hello(ws))["server_id"] == "gw-1"
        signal_balancer(lb, signal.SIGHUP)
        await _wait_gw1_removed_with_2_tunnels(lb)
    await _wait_gw1_gone(lb)


# -- ${file:PATH}: the cookie keys from a file, one set of keys for the whole instance -------------------


def write_key(path: Path, key: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(key + "\n")
    tmp.replace(path)  # the kubelet swaps a Secret volume atomically too


def key_file_balancer(launcher: Launcher, key_file: Path, *gateways: Gateway) -> Balancer:
    config = lb_config(pools={POOL: gateways}, overrides={"workers": 2, "limits": {"handshake_rate_per_ip": 0}})
    config["affinity"]["secret_keys"] = [f"${{file:{key_file}}}"]
    lb = launcher.balancer(config)
    lb.wait_states({(POOL, g.id): "up" for g in gateways})
    return lb


async def handshake_on(lb: Balancer, worker: str, *, cookie: str | None = None) -> tuple[str, str]:
    """Visit (with `cookie`, if given) until worker `worker` serves it: the token it issued ("" if none) and
    the `affinity=` it logged."""
    for _ in range(60):
        mark = lb.log_lines()
        seen = await visit(lb.ws_url(), cookie=cookie)
        logged = await wait_until(
            lambda at=mark: [(m[1], m[2]) for line in lines_after(lb, at) if (m := _AFFINITY.search(line))],
            what="the handshake's access line",
        )
        served_by, affinity = logged[-1]
        if served_by == worker:
            return (token_of(seen) if seen.cookie is not None else ""), affinity
    raise AssertionError(f"{worker} served none of 60 handshakes:\n{lb.logs_tail()}")


async def assert_one_set_of_keys(lb: Balancer) -> None:
    """A cookie either worker issues is a hit on the other, and the owner's /lookup opens it."""
    for issuer, other in (("worker-0", "worker-1"), ("worker-1", "worker-0")):
        token, affinity = await handshake_on(lb, issuer)
        assert token and affinity == "new", (issuer, affinity)
        reissued, affinity = await handshake_on(lb, other, cookie=token)
        assert affinity == "hit", f"a cookie {issuer} issued is {affinity!r} on {other}:\n{lb.logs_tail()}"
        assert not reissued, f"{other} re-issued a cookie {issuer} had just sealed"
        reply = await admin_request(lb, "GET", "/lookup", params={"token": token})
        assert reply.status == 200 and reply.body.get("valid") is True, (issuer, reply.body)

    async def none_unknown() -> bool:  # the workers' counters reach the owner every second
        text = await metrics_text(lb)
        return (metric(text, "lb_affinity_decisions_total", result="hit") or 0) >= 2 and not metric(
            text, "lb_affinity_invalid_tokens_total", reason="unknown_key")

    await wait_until(none_unknown, what="two hits and no unknown_key counted", within=5 * UNIT)


async def test_a_key_file_rewritten_right_after_a_sighup_cannot_split_the_workers_keys(
    launcher: Launcher, gateways: list[Gateway], tmp_path: Path
) -> None:
    """SIGHUP with a new valid key in the file; the file then holds an invalid key before one worker gets to
    the reload (it is held with SIGSTOP until then, so this is deterministic): both workers run the key the
    owner read, the reload is a success everywhere, and a cookie either worker seals opens on the other."""
    gw1, gw2, _ = gateways
    key_file = tmp_path / "cookie-key"
    write_key(key_file, new_key())
    lb = key_file_balancer(launcher, key_file, gw1, gw2)
    held, prompt = await two_workers(lb)
    held_name, prompt_name = f"worker-{worker_index(held)}", f"worker-{worker_index(prompt)}"
    mark = lb.log_lines()

    def reloaded(name: str) -> Any:
        return lambda: next((line for line in lines_after(lb, mark)
                             if f" {name} lb.control.balancer: reload" in line), None)

    with paused(held):
        write_key(key_file, new_key())
        signal_balancer(lb, signal.SIGHUP)
        assert "reloaded configuration" in await wait_until(reloaded("owner"), what="the owner's reload")
        assert "reloaded configuration" in await wait_until(reloaded(prompt_name), what=f"{prompt_name}'s reload")
        write_key(key_file, "too-short-to-be-a-key")  # what the held worker would read, did it read the file
    outcome = await wait_until(reloaded(held_name), what=f"{held_name}'s reload")
    assert "reloaded configuration" in outcome, f"{held_name} read the file itself:\n{lb.logs_tail()}"
    assert not [line for line in lines_after(lb, mark) if "could not apply the reload" in line]
    text = await metrics_text(lb)
    assert metric(text, "lb_config_reloads_total", result="success") == 1
    assert metric(text, "lb_config_reloads_total", result="failure") == 0
    await assert_one_set_of_keys(lb)
    lb.assert_alive()


async def test_a_restarted_worker_seals_with_the_owners_key_not_the_file_changed_since(
    launcher: Launcher, gateways: list[Gateway], tmp_path: Path
) -> None:
    """The key file rotated without a SIGHUP, then a worker is SIGKILLed: its replacement seals and opens
    with the owner's running key (the snapshot the owner read), like its sibling, not the file's new one."""
    gw1, gw2, _ = gateways
    key_file = tmp_path / "cookie-key"
    write_key(key_file, new_key())
    lb = key_file_balancer(launcher, key_file, gw1, gw2)
    before = await two_workers(lb)
    write_key(key_file, new_key())  # valid, and no SIGHUP: nothing may run it yet
    await replace_worker(lb, before[0])
    await assert_one_set_of_keys(lb)
    lb.assert_alive()
