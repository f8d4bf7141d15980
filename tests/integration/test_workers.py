"""`workers: 2`: an owner process (health, admin) and two workers sharing the listeners.

The owner's /status and /metrics cover every worker; backend states reach
every worker; a worker that dies is restarted, and its clients reconnect with
their cookies to the same backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT, UNIT
from tests.harness.clients import assert_echo, recv_hello, visit, ws_connect
from tests.harness.ops import (
    OpsStack,
    both_serving,
    catches,
    metric,
    paused,
    process_alive,
    started_stack,
    two_workers,
    wait_until,
    worker_pids,
)
from tests.harness.processes import Balancer, Launcher, http_get, lb_certs, lb_config

# A log event's line, as lb.log writes it: `TIME LEVEL PROCESS logger: message` (not a traceback's or a
# child's stray output).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+ \S+: ")


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    with started_stack(tmp_path_factory.mktemp("workers"), overrides={"workers": 2}) as stack:
        yield stack


def status(ops: OpsStack) -> dict[str, object]:
    code, body = http_get(ops.balancer.admin_url("/status"))
    assert code == 200
    return dict(json.loads(body))


def owner_pid(ops: OpsStack) -> int:
    assert ops.balancer.proc is not None
    return ops.balancer.proc.pid


async def test_two_workers_serve_and_the_owner_reports_for_both(ops: OpsStack) -> None:
    """With workers: 2 the owner starts two workers, and /status and /metrics sum what they did."""
    pids = await two_workers(ops.balancer)
    assert len(set(pids)) == 2, pids
    visits = [await visit(ops.balancer.ws_url()) for _ in range(12)]
    assert {v.server_id for v in visits} <= {g.id for g in ops.gateways}

    def handshakes() -> int:
        backends = status(ops)["pools"]["gateways"]["backends"]  # type: ignore[index]
        return sum(int(b["handshakes"]) for b in backends)

    await wait_until(lambda: handshakes() >= 12, within=5 * UNIT, what="worker counters at the owner")
    owner = status(ops)
    assert owner["role"] == "owner"
    # The owner binds no listener; /status names its workers' (it named none).
    binds = [listener["bind"] for listener in ops.balancer.config["listeners"]]
    assert owner["listeners"] == binds, owner["listeners"]
    code, metrics = http_get(ops.balancer.admin_url("/metrics"))
    assert code == 200 and b"lb_handshakes_total" in metrics
    # Every line names its process, the owner's too: `TIME LEVEL owner|worker-N logger: message`.
    events = [line for line in ops.balancer.log_text().splitlines() if LOG_LINE.match(line)]
    processes = {line.split(" ")[2] for line in events}
    assert processes == {"owner", "worker-0", "worker-1"}, events[:5]


async def test_a_killed_worker_is_restarted_and_cookies_still_stick(ops: OpsStack) -> None:
    """A worker that dies is replaced; a client reconnecting with its cookie reaches the same gateway."""
    first = await visit(ops.balancer.ws_url())
    assert first.cookie is not None
    before = await two_workers(ops.balancer)
    os.kill(before[0], signal.SIGKILL)
    after = await wait_until(
        lambda: pids if len(pids := worker_pids(owner_pid(ops))) == 2 and before[0] not in pids else None,
        within=10 * UNIT,
        what="a replacement worker",
    )
    assert before[1] in after
    await asyncio.sleep(0.5 * UNIT)  # the replacement binds its listeners
    for _ in range(8):
        again = await visit(ops.balancer.ws_url(), cookie=f"{first.cookie.name}={first.cookie.value}")
        assert again.server_id == first.server_id
    # Metrics say it too (an alert on a worker that crash-loops has nothing else to go by).
    code, body = http_get(ops.balancer.admin_url("/metrics"))
    text = body.decode()
    assert code == 200 and 'lb_workers{state="configured"} 2.0' in text, text[:300]
    restarts = re.search(r"^lb_worker_restarts_total (\S+)$", text, re.MULTILINE)
    assert restarts is not None and float(restarts.group(1)) >= 1, text[-500:]
    # The line the LbWorkerCrashLoop alert tells the operator to look for is the one the owner wrote.
    rules = yaml.safe_load((ROOT / "deploy" / "observability" / "alerts.yaml").read_text())
    alert = next(rule for group in rules["groups"] for rule in group["rules"]
                 if rule.get("alert") == "LbWorkerCrashLoop")
    quoted = re.search(r'"([^"]*exited with[^"]*)"', alert["annotations"]["description"])
    assert quoted is not None, alert["annotations"]["description"]
    said = re.escape(quoted.group(1).removesuffix("...")).replace("N", r"\d+").replace("P", str(before[0]))
    assert re.search(said, ops.balancer.log_text()), (said, ops.balancer.logs_tail())


async def test_the_tunnels_of_workers_that_died_count_as_closed(ops: OpsStack) -> None:
    """Killed, a worker takes its tunnels with it: lb_tunnels_closed_total counts them, and
    lb_tunnel_closes_total{cause="worker_exit"} says why (they were open, then neither open nor closed)."""

    def scrape() -> str:
        code, body = http_get(ops.balancer.admin_url("/metrics"))
        assert code == 200
        return body.decode()

    await two_workers(ops.balancer)
    await wait_until(lambda: status(ops)["tunnels"] == 0, within=10 * UNIT, what="no tunnel left open")
    closed_before = metric(scrape(), "lb_tunnels_closed_total") or 0.0
    exits_before = metric(scrape(), "lb_tunnel_closes_total", cause="worker_exit") or 0.0
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(6):
            ws, _ = await stack.enter_async_context(ws_connect(ops.balancer.ws_url()))
            await recv_hello(ws)
        await wait_until(lambda: status(ops)["tunnels"] == 6, within=5 * UNIT, what="6 tunnels in the reports")
        for pid in await two_workers(ops.balancer):  # SO_REUSEPORT spread them: both go
            os.kill(pid, signal.SIGKILL)

        def counted() -> tuple[float, float] | None:
            text = scrape()
            closed = (metric(text, "lb_tunnels_closed_total") or 0.0) - closed_before
            exits = (metric(text, "lb_tunnel_closes_total", cause="worker_exit") or 0.0) - exits_before
            return (closed, exits) if exits >= 6 else None

        assert await wait_until(counted, within=10 * UNIT, what="the dead workers' tunnels counted") == (6.0, 6.0)
    await wait_until(lambda: len(worker_pids(owner_pid(ops))) == 2, within=10 * UNIT, what="two new workers")


async def test_a_worker_restarted_after_its_tls_files_broke_serves_the_owners_pair(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The owner hands its workers the certificate and key it read: a worker restarted after the files on
    disk were cut or replaced by garbage serves the running pair (it read the files itself, failed to
    parse them and crash-looped, with /readyz still 200 and its share of the instance gone)."""
    certs = lb_certs(tmp_path / "certs")
    gateways = launcher.gateways(1)
    config = lb_config(pools={"gateways": gateways}, tls=(certs / "server.crt", certs / "server.key"),
                       overrides={"workers": 2})
    lb = launcher.balancer(config)
    lb.wait_states({("gateways", gateways[0].id): "up"})
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    before = await two_workers(lb)
    (certs / "server.crt").write_text("-----BEGIN CERTIFICATE-----\ncut short\n")
    (certs / "server.key").unlink()
    assert lb.proc is not None
    owner = lb.proc.pid
    os.kill(before[0], signal.SIGKILL)
    replaced = await wait_until(
        lambda: pids if len(pids := worker_pids(owner)) == 2 and before[0] not in pids else None,
        within=10 * UNIT, what="a replacement worker",
    )
    await wait_until(lambda: _serving(lb) == 2, within=10 * UNIT, what="both workers serving")
    for _ in range(6):
        assert (await visit(lb.ws_url(tls=True), ssl=context)).server_id == gateways[0].id
    await asyncio.sleep(2 * UNIT)  # a crash loop would have replaced it again by now
    assert sorted(worker_pids(owner)) == sorted(replaced) and _serving(lb) == 2, lb.logs_tail()


def _serving(lb: Balancer) -> int:
    code, body = http_get(lb.admin_url("/status"))
    return int(json.loads(body)["workers"]["serving"]) if code == 200 else -1


UNRESPONSIVE_AFTER = 10.0  # the product's bound on a worker that sends its owner nothing


async def test_a_stopped_worker_is_killed_and_replaced(ops: OpsStack) -> None:
    """A worker that stops answering (SIGSTOP here; a stuck event loop alike) takes its share of new
    clients and serves none: the owner notices its silence, kills it and starts another.  Both serve first:
    one paused while it still starts (an earlier test's kills restart both) is judged by another bound
    (test_workers_control's test_a_restarted_worker_stuck_before_it_listens_is_killed_and_replaced)."""
    before = await both_serving(ops.balancer)
    mark = ops.balancer.log_lines()
    with paused(before[0]):
        after = await wait_until(
            lambda: pids if len(pids := worker_pids(owner_pid(ops))) == 2 and before[0] not in pids else None,
            within=UNRESPONSIVE_AFTER + 10 * UNIT,
            what="a replacement for the stopped worker",
        )
    assert before[1] in after
    logged = "\n".join(ops.balancer.log_text().splitlines()[mark:])
    assert "has sent nothing for" in logged and "killing it" in logged, logged[-2000:]
    await asyncio.sleep(0.5 * UNIT)  # the replacement binds its listeners
    for _ in range(8):
        assert (await visit(ops.balancer.ws_url())).server_id in {g.id for g in ops.gateways}


async def test_an_owner_paused_past_the_watchdog_kills_no_worker(ops: OpsStack) -> None:
    """The owner stopped for longer than the watchdog's bound (Ctrl-Z, a frozen cgroup) has read nothing
    from its workers meanwhile: that silence is its own, so no worker is killed and no tunnel cut."""
    before = await two_workers(ops.balancer)
    owner = owner_pid(ops)
    mark = ops.balancer.log_lines()
    async with ws_connect(ops.balancer.ws_url()) as (ws, _):
        await recv_hello(ws)
        with paused(owner):
            await asyncio.sleep(UNRESPONSIVE_AFTER + 2.0)
        await asyncio.sleep(3.0)  # a few of the owner's looks for silent workers
        await assert_echo(ws, "still here")
    assert sorted(worker_pids(owner)) == sorted(before)
    assert "has sent nothing for" not in "\n".join(ops.balancer.log_text().splitlines()[mark:])


async def test_backend_states_reach_every_worker(ops: OpsStack) -> None:
    """A gateway the owner's health checks mark down gets no new clients from any worker."""
    victim = ops.gateways[0]
    victim.kill()
    try:
        await wait_until(
            lambda: any(
                b["id"] == victim.id and b["state"] == "down" for b in status(ops)["pools"]["gateways"]["backends"]
            ),  # type: ignore[index]
            within=10 * UNIT,
            what=f"{victim.id} down",
        )
        seen = {(await visit(ops.balancer.ws_url())).server_id for _ in range(16)}
        assert victim.id not in seen
    finally:
        victim.start()


async def test_sigterm_stops_owner_and_workers(tmp_path: Path) -> None:
    """SIGTERM to the owner stops every worker and exits 0."""
    with started_stack(tmp_path, gateways=1, overrides={"workers": 2}) as stack:
        workers = await two_workers(stack.balancer)
        assert stack.balancer.proc is not None
        stack.balancer.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(stack.balancer.proc.wait, 15 * UNIT)
        assert code == 0
        left = [pid for pid in workers if process_alive(pid)]
        assert not left, f"workers still running after the owner exited: {left}"


async def test_sigterm_with_a_stopped_worker_resumes_it_and_stops_it_gracefully(tmp_path: Path) -> None:
    """A SIGSTOPped worker held its SIGTERM (and its listening socket, where the kernel still queued new
    clients) until the owner killed it at the end of its wait: 10 s for a 1 s grace.  Now it is resumed,
    stops as the other does, and nothing is killed."""
    overrides = {"workers": 2, "timeouts": {"shutdown_delay": "0s", "shutdown_grace": "1s"}}
    with started_stack(tmp_path, gateways=1, overrides=overrides) as stack:
        workers = await two_workers(stack.balancer)
        assert stack.balancer.proc is not None
        with paused(workers[0]):
            stack.balancer.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(stack.balancer.proc.wait, 15 * UNIT)
        assert code == 0
        assert "did not stop in time" not in stack.balancer.log_text(), stack.balancer.logs_tail()
        assert not [pid for pid in workers if process_alive(pid)]


async def test_sigusr1_and_sigusr2_are_logged_not_fatal(ops: OpsStack) -> None:
    """A logrotate `postrotate kill -USR1` meant for another daemon (or `pkill -USR2 -f lb`) must not be
    an outage: owner and workers log a WARNING each and keep serving; their default action kills."""
    lb = ops.balancer
    workers = await two_workers(lb)
    # A worker just (re)started by an earlier test ignores them silently until it serves: wait for that.
    await wait_until(
        lambda: all(catches(pid, signal.SIGUSR2) for pid in workers), within=10 * UNIT, what="workers serving"
    )
    before = lb.log_text().count("ignored: it has no meaning here")
    for pid in (owner_pid(ops), *workers):
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGUSR2)
    await wait_until(
        lambda: lb.log_text().count("ignored: it has no meaning here") - before >= 6, within=5 * UNIT,
        what="a WARNING per signal",
    )
    lb.assert_alive()
    assert all(process_alive(pid) for pid in workers) and await two_workers(lb) == workers
    assert (await visit(lb.ws_url())).server_id


class _FromElsewhere(Balancer):
    """The balancer as an operator starts it: the `lb` command, from a directory of their own."""

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("lb")), "run", "--config", str(self.config_path)]


async def test_workers_never_import_from_the_working_directory(launcher: Launcher, tmp_path: Path) -> None:
    """A stray `dns.py` or `yaml.py` where `lb run` is started must not stand in for the real module in the
    workers: they serve, and the stray file never runs."""
    marker = tmp_path / "stray-module-ran"
    shadow = tmp_path / "cwd"
    shadow.mkdir()
    for name in ("dns", "yaml"):
        (shadow / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('stray {name}')\n")
    (gateway,) = launcher.gateways(1)
    balancer = _FromElsewhere(lb_config(pools={"gateways": [gateway]}, overrides={"workers": 2}), tmp_path)
    balancer.cwd = shadow
    launcher.adopt(balancer)
    await two_workers(balancer)
    assert (await visit(balancer.ws_url())).server_id == gateway.id
    assert not marker.exists(), f"a module from the working directory ran:\n{balancer.logs_tail()}"
