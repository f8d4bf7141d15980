"""SPEC part 2, the operator's console: GET /lookup, `lb ctl`, latency histograms and error counters,
and the monitoring starting points in deploy/observability/ (promtool, metric names against a live scrape).

One module stack: gateways gw-1..3 and a black hole (accepts TCP, never answers) behind balancers A and B
that share their keys, and F with keys of its own and `max_age: 1s` (foreign and expiring tokens).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.procs import free_port
from tests.harness import HOST, ROOT, UNIT
from tests.harness.clients import http_get_async, recv_hello, visit, wait_for_state, ws_connect
from tests.harness.ops import BlackHole, admin_request, launched, token_of, visit_until, wait_until
from tests.harness.processes import Balancer, Gateway, lb_config, new_key, run_ctl

OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "alerts.yaml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"

# Metrics the control-plane engineer adds in parallel (lb_config_reloads_total, lb_build_info{config_hash}).
# The coordinator empties this list once their branch is merged: then every name must be in a live scrape.
CTL_TIMEOUT = 20 * UNIT


@dataclass
class ConsoleStack:
    gateways: list[Gateway]
    hole: BlackHole
    a: Balancer
    b: Balancer
    foreign: Balancer


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    with launched(tmp_path_factory, "console") as launcher:
        gateways = launcher.gateways(3)
        hole = BlackHole("hole-1")
        try:
            keys = [new_key(), new_key()]
            pools = {"gateways": gateways, "hole": [hole]}
            routes = {"/ws": "gateways", "/whoami": "gateways", "/hole": "hole"}
            overrides = {
                "limits": {"handshake_rate_per_ip": 0},
                "timeouts": {"backend_connect": "500ms"},
                "pools": {"hole": {"health_check": {"type": "tcp", "interval": "300ms", "timeout": "1s",
                                                    "rise": 1, "fall": 3}}},
            }
            a = lb_config(pools=pools, routes=routes, keys=keys, overrides=overrides)
            b = lb_config(pools=pools, routes=routes, keys=keys, overrides=overrides)
            foreign = lb_config(
                pools=pools, routes=routes, keys=[new_key()],
                overrides={**overrides, "affinity": {"max_age": "1s"}},
            )
            started = launcher.balancers(a, b, foreign, names=["a", "b", "foreign"])
            for balancer in started:
                balancer.wait_states({("gateways", g.id): "up" for g in gateways} | {("hole", "hole-1"): "up"})
            yield ConsoleStack(gateways, hole, *started)
        finally:
            hole.close()


async def admin_get(lb: Balancer, path: str, *, token: str | None = None) -> tuple[int, Any]:
    reply = await admin_request(lb, "GET", path, token=token)
    return reply.status, reply.body


async def lookup(lb: Balancer, token: str, *, bearer: str | None = "own") -> tuple[int, Any]:
    return await admin_get(
        lb, "/lookup?" + urllib.parse.urlencode({"token": token}), token=lb.token if bearer == "own" else bearer
    )


# ---------------------------------------------------------------------------------------------------
# GET /lookup


async def test_lookup_valid_token(console: ConsoleStack) -> None:
    """A fresh token names its pool and backend, routes there, with ISO-8601 UTC issue and expiry times."""
    v = await visit(console.a.ws_url())
    code, answer = await lookup(console.a, token_of(v))
    assert code == 200, answer
    assert answer["valid"] is True
    assert answer["pool"] == "gateways"
    assert answer["backend"] == v.server_id
    assert answer["routes_to"] == v.server_id
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(pattern, answer["issued_at"]) and re.fullmatch(pattern, answer["expires_at"]), answer
    # max_age 1h: expiry is issue time + 3600 s.
    from datetime import datetime

    issued, expires = (datetime.fromisoformat(answer[k].replace("Z", "+00:00")) for k in ("issued_at", "expires_at"))
    assert (expires - issued).total_seconds() == 3600


async def test_lookup_issue_time_is_not_after_the_cookie_was_set(console: ConsoleStack) -> None:
    """A fresh cookie was issued at or before the moment its answer arrived, and is valid now:
    issued_at <= then <= now < expires_at.  Tokens carry their issue second rounded up, and /lookup
    showed that second, up to 1 s in the future (the answer's Date said :49, issued_at :50)."""
    from datetime import UTC, datetime

    for _ in range(3):  # a second's boundary between the handshake and `arrived` would hide it once
        v = await visit(console.a.ws_url())
        arrived = datetime.now(UTC)
        code, answer = await lookup(console.a, token_of(v))
        now = datetime.now(UTC)
        assert code == 200 and answer["valid"] is True, answer
        issued, expires = (datetime.fromisoformat(answer[k]) for k in ("issued_at", "expires_at"))
        assert issued <= arrived <= now < expires, (answer, arrived.isoformat())
        assert (expires - issued).total_seconds() == 3600
        assert (arrived - issued).total_seconds() < 5


async def test_every_instance_sharing_the_keys_answers_the_same(console: ConsoleStack) -> None:
    """B shares A's keys: the same answer for A's token."""
    token = token_of(await visit(console.a.ws_url()))
    _, from_a = await lookup(console.a, token)
    _, from_b = await lookup(console.b, token)
    assert from_a == from_b and from_a["valid"] is True


async def test_lookup_needs_the_bearer_token(console: ConsoleStack) -> None:
    """No bearer, or a wrong one: 401, and nothing about the token."""
    token = token_of(await visit(console.a.ws_url()))
    code, answer = await lookup(console.a, token, bearer=None)
    assert code == 401
    assert "valid" not in json.dumps(answer)
    code, _ = await lookup(console.a, token, bearer="not-the-token")
    assert code == 401


async def test_lookup_in_a_pool_that_does_not_exist_is_404(console: ConsoleStack) -> None:
    """`?pool=` names a pool the configuration lacks: 404 with a fixed reason, as /pools/{pool}/... answers,
    not an answer about the token; the pool's name is not echoed."""
    token = token_of(await visit(console.a.ws_url()))
    query = urllib.parse.urlencode({"token": token, "pool": "no-such-pool"})
    code, answer = await admin_get(console.a, f"/lookup?{query}", token=console.a.token)
    assert code == 404 and answer["error"] == "unknown pool" and "no-such-pool" not in json.dumps(answer)
    code, answer = await admin_get(console.a, f"/lookup?{query.replace('no-such-pool', 'gateways')}",
                                   token=console.a.token)
    assert code == 200 and answer["valid"] is True


async def test_lookup_with_the_token_given_twice_is_400(console: ConsoleStack) -> None:
    """Which of two tokens was meant is not the balancer's to guess (as `drain?rate=1&rate=2`)."""
    token = token_of(await visit(console.a.ws_url()))
    query = urllib.parse.urlencode([("token", token), ("token", "other")])
    code, answer = await admin_get(console.a, f"/lookup?{query}", token=console.a.token)
    assert code == 400 and answer["error"] == "parameter given twice", answer


async def test_lookup_without_token_parameter_is_400(console: ConsoleStack) -> None:
    """SPEC /lookup: without a `token` parameter the answer is 400 saying so."""
    code, answer = await admin_get(console.a, "/lookup", token=console.a.token)
    assert code == 400 and "token" in answer["error"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [("not a token", "malformed"), ("A" * 5000, "malformed"), ("AAAA", "malformed")],
)
async def test_lookup_garbage_is_an_answer_not_an_error(console: ConsoleStack, token: str, reason: str) -> None:
    """SPEC /lookup: a malformed token is a 200 `{"valid": false, "reason": "malformed"}`, not an error."""
    code, answer = await lookup(console.a, token)
    assert code == 200
    assert answer == {"valid": False, "reason": reason}


async def test_lookup_foreign_key_token(console: ConsoleStack) -> None:
    """A token sealed with a key this instance does not hold is not valid (unknown_key; bad_mac on a key id clash)."""
    token = token_of(await visit(console.foreign.ws_url()))
    code, answer = await lookup(console.a, token)
    assert code == 200
    assert answer["valid"] is False and answer["reason"] in ("unknown_key", "bad_mac"), answer


async def test_lookup_tampered_token(console: ConsoleStack) -> None:
    """SPEC /lookup: a token with one character changed is `{"valid": false, "reason": "bad_mac"}`."""
    token = token_of(await visit(console.a.ws_url()))
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    _, answer = await lookup(console.a, tampered)
    assert answer == {"valid": False, "reason": "bad_mac"}


async def test_lookup_expired_token(console: ConsoleStack) -> None:
    """F's tokens live 1 s: after that, F answers "expired"."""
    token = token_of(await visit(console.foreign.ws_url()))

    async def expired() -> bool:
        _, answer = await lookup(console.foreign, token)
        assert answer["valid"] is True or answer["reason"] == "expired", answer
        return answer["valid"] is False

    await wait_until(expired, within=5 * UNIT, what="the 1s token to expire")


async def test_lookup_token_whose_backend_died(console: ConsoleStack) -> None:
    """The backend is down: the token still names it, routes_to is where redispatch sends it, on every instance."""
    victim = console.gateways[2]
    token = token_of(await visit_until(console.a.ws_url(), victim.id, tries=12))
    victim.kill()
    try:
        for lb in (console.a, console.b):
            await wait_for_state(lb, "gateways", victim.id, "down", within=10 * UNIT)
        _, from_a = await lookup(console.a, token)
        _, from_b = await lookup(console.b, token)
        assert from_a["valid"] is True and from_a["backend"] == victim.id and from_a["state"] == "down", from_a
        assert from_a["routes_to"] in {g.id for g in console.gateways[:2]}, from_a
        assert from_b["routes_to"] == from_a["routes_to"]
        # ...and that is where a handshake carrying the token goes now.
        again = await visit(console.a.ws_url(), cookie=token)
        assert again.server_id == from_a["routes_to"]
    finally:
        victim.launch()
        victim.wait_ready()
        for lb in (console.a, console.b, console.foreign):
            await wait_for_state(lb, "gateways", victim.id, "up", within=10 * UNIT)


# ---------------------------------------------------------------------------------------------------
# lb ctl


def ctl(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_ctl(*args, env=env, timeout=CTL_TIMEOUT)


def admin_args(lb: Balancer, *, token: bool = True) -> list[str]:
    return ["--admin", lb.admin_url("")] + (["--token", lb.token] if token else [])


def test_ctl_status_table(console: ConsoleStack) -> None:
    """`lb ctl status`: a table with every backend and its state; exit 0."""
    done = ctl(*admin_args(console.a, token=False), "status")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["POOL", "BACKEND", "ADDRESS", "STATE"]
    for gateway in console.gateways:
        line = next(r for r in rows if f" {gateway.id} " in r)
        assert line.split()[:4] == ["gateways", gateway.id, gateway.address, "up"]


def test_ctl_status_json(console: ConsoleStack) -> None:
    """SPEC `lb ctl status --json`: exit 0 and the /status document, every backend of the pool in order."""
    done = ctl(*admin_args(console.a), "status", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert [b["id"] for b in document["pools"]["gateways"]["backends"]] == [g.id for g in console.gateways]


async def test_ctl_drain_disable_enable(console: ConsoleStack) -> None:
    """drain (with close_after and rate), disable, enable: exit 0, the new state printed and shown in /status."""
    target = console.gateways[0].id
    try:
        done = ctl(*admin_args(console.b), "drain", "gateways", target, "--close-after", "1h", "--rate", "5")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"gateways/{target}: draining"), done.stdout
        await wait_for_state(console.b, "gateways", target, "draining")
        done = ctl(*admin_args(console.b), "disable", "gateways", target, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"pool": "gateways", "id": target, "state": "disabled"}
        await wait_for_state(console.b, "gateways", target, "disabled")
    finally:
        done = ctl(*admin_args(console.b), "enable", "gateways", target)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"gateways/{target}: up"
    await wait_for_state(console.b, "gateways", target, "up")


def test_ctl_exit_codes_on_errors(console: ConsoleStack) -> None:
    """1 with the server's message for API errors; 2 for usage and connection errors."""
    lb = console.a
    no_token = ctl(*admin_args(lb, token=False), "drain", "gateways", "gw-1")
    assert no_token.returncode == 1 and "401" in no_token.stderr and "bearer" in no_token.stderr
    wrong = ctl("--admin", lb.admin_url(""), "--token", "wrong", "enable", "gateways", "gw-1")
    assert wrong.returncode == 1 and "401" in wrong.stderr
    unknown = ctl(*admin_args(lb), "disable", "gateways", "no-such-backend")
    assert unknown.returncode == 1 and "404" in unknown.stderr and "unknown pool or backend" in unknown.stderr
    said = re.search(r"\(request id (\S+)\)", unknown.stderr)  # the id the balancer's log line carries
    assert said is not None and said.group(1) in lb.log_text(), unknown.stderr
    bad_rate = ctl(*admin_args(lb), "drain", "gateways", "gw-1", "--rate", "0")
    assert bad_rate.returncode == 1 and "rate" in bad_rate.stderr
    nothing_there = ctl("--admin", f"http://127.0.0.1:{free_port()}", "status")
    assert nothing_there.returncode == 1 and "cannot reach the admin API" in nothing_there.stderr
    usage = ctl("drain", "gateways")
    assert usage.returncode == 2
    bad_url = ctl("--admin", "ftp://x", "status")
    assert bad_url.returncode == 2




def test_ctl_url_and_token_from_environment(console: ConsoleStack) -> None:
    """SPEC `lb ctl`: the admin URL and token default from LB_ADMIN_URL / LB_ADMIN_TOKEN (an action succeeds with
    neither flag)."""
    lb = console.a
    env = {"LB_ADMIN_URL": lb.admin_url(""), "LB_ADMIN_TOKEN": lb.token}
    done = ctl("enable", "gateways", console.gateways[1].id, env=env)
    assert done.returncode == 0, done.stderr


def test_ctl_url_and_token_from_config(console: ConsoleStack, tmp_path: Path) -> None:
    """--config reads admin.bind and admin.token, ${VAR} expanded as `lb run` does."""
    config = dict(console.a.config)
    config["admin"] = {"bind": config["admin"]["bind"], "token": "${CONSOLE_TEST_TOKEN}"}
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(config))
    done = ctl("--config", str(path), "enable", "gateways", console.gateways[1].id,
               env={"CONSOLE_TEST_TOKEN": console.a.token})
    assert done.returncode == 0, done.stderr
    unset = ctl("--config", str(path), "disable", "gateways", console.gateways[1].id)
    assert unset.returncode == 2 and "CONSOLE_TEST_TOKEN" in unset.stderr
    status = ctl("--config", str(path), "status")  # sends no token, so needs none
    assert status.returncode == 0 and console.gateways[1].id in status.stdout, status.stderr


async def test_ctl_lookup(console: ConsoleStack) -> None:
    """SPEC `lb ctl lookup TOKEN`: the /lookup answer (exit 0, also for an invalid token); without the admin
    token, exit 1 with the 401."""
    v = await visit(console.a.ws_url())
    token = token_of(v)
    done = ctl(*admin_args(console.a), "lookup", token, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == (await lookup(console.a, token))[1]
    plain = ctl(*admin_args(console.a), "lookup", token)
    assert plain.returncode == 0 and json.loads(plain.stdout)["routes_to"] == v.server_id, plain.stdout
    invalid = ctl(*admin_args(console.a), "lookup", "garbage")
    assert invalid.returncode == 0 and json.loads(invalid.stdout) == {"valid": False, "reason": "malformed"}
    denied = ctl(*admin_args(console.a, token=False), "lookup", token)
    assert denied.returncode == 1 and "401" in denied.stderr


# ---------------------------------------------------------------------------------------------------
# metrics


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text → {sample name: [(labels, value)]}."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)(?: \d+)?", line)
        assert match, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return samples


async def scrape(lb: Balancer) -> dict[str, list[tuple[dict[str, str], float]]]:
    code, _, body = await http_get_async(lb.admin_url("/metrics"))
    assert code == 200
    return parse_metrics(body.decode())


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == want for k, want in match.items()))


def present(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> bool:
    return any(all(labels.get(k) == want for k, want in match.items()) for labels, _ in samples.get(name, []))


async def test_handshake_histogram_counts_every_handshake(console: ConsoleStack) -> None:
    """lb_handshake_duration_seconds{pool} counts exactly the handshakes answered by a backend; buckets add up."""
    lb = console.b
    for _ in range(5):
        await visit(lb.ws_url())
    samples = await scrape(lb)
    answered = sum(
        total(samples, "lb_handshakes_total", pool="gateways", outcome=outcome)
        for outcome in ("switched", "refused", "answered")
    )
    assert answered >= 5
    count = total(samples, "lb_handshake_duration_seconds_count", pool="gateways")
    assert count == answered
    buckets = [(labels["le"], v) for labels, v in samples["lb_handshake_duration_seconds_bucket"]
               if labels["pool"] == "gateways"]
    assert buckets[0][0] == "0.0001" and buckets[-2][0] == "10.0" and buckets[-1] == ("+Inf", count)
    values = [v for _, v in buckets]
    assert values == sorted(values), "cumulative buckets never decrease"
    latency = total(samples, "lb_handshake_duration_seconds_sum", pool="gateways")
    assert 0 < latency / count < 5, "mean handshake time on loopback is small and positive"
    connects = total(samples, "lb_backend_connect_duration_seconds_count", pool="gateways")
    assert connects == answered, "one successful backend attempt per answered handshake"


async def test_backend_error_and_health_check_counters(console: ConsoleStack) -> None:
    """A backend that never answers counts as kind="timeout"; health checks count per backend and result."""
    lb = console.a
    before = total(await scrape(lb), "lb_backend_errors_total", pool="hole", backend="hole-1", kind="timeout")
    code, _, _ = await http_get_async(lb.http_url("/hole"), timeout=10 * UNIT)
    assert code in (502, 503)
    samples = await scrape(lb)
    assert total(samples, "lb_backend_errors_total", pool="hole", backend="hole-1", kind="timeout") == before + 1
    for gateway in console.gateways:
        assert total(samples, "lb_health_checks_total", pool="gateways", backend=gateway.id, result="success") > 0


async def test_status_counters_are_metrics(console: ConsoleStack) -> None:
    """Every per-backend counter /status shows is in /metrics with the same value."""
    lb = console.b
    pinned = await visit(lb.ws_url())
    await visit(lb.ws_url(), cookie=token_of(pinned))  # an affinity hit: not every counter is 0
    async with ws_connect(lb.ws_url(), cookie=token_of(pinned)) as (ws, _):
        await recv_hello(ws)  # one live tunnel while both are read
        await asyncio.sleep(0)  # no traffic between the two reads below
        _, document = await admin_get(lb, "/status")
        samples = await scrape(lb)
    backends = document["pools"]["gateways"]["backends"]
    assert {backend["id"] for backend in backends} == {g.id for g in console.gateways}, backends
    home = next(backend for backend in backends if backend["id"] == pinned.server_id)
    assert home["handshakes"] >= 3 and home["affinity_hits"] >= 2 and home["connections"] >= 1, home
    for backend in backends:
        labels = {"pool": "gateways", "backend": backend["id"]}
        for name, key in (("lb_backend_handshakes_total", "handshakes"),
                          ("lb_backend_affinity_hits_total", "affinity_hits"),
                          ("lb_backend_redispatches_total", "redispatches"),
                          ("lb_active_connections", "connections")):
            # In /metrics, not only equal: a missing series would read as 0 and match a 0 in /status.
            assert present(samples, name, **labels), f"{name} {labels} is not in /metrics"
            assert total(samples, name, **labels) == backend[key], (name, labels, backend)


# ---------------------------------------------------------------------------------------------------
# deploy/observability


def names_in_rules_and_dashboard() -> set[str]:
    expressions = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = {name for expr in expressions for name in re.findall(r"\blb_[a-z_]+", expr)}
    # A histogram is used through its series; the scrape has them under the same suffixes.
    return names


def matchers_in_rules_and_dashboard() -> set[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher the rules and the dashboard put on an lb_* name;
    the scrape's own labels (job, instance) and Grafana's variables left out."""
    expressions = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found = set()
    for expr in expressions:
        for selector in re.finditer(r"\b(lb_[a-z_]+)\{([^}]*)\}", expr):
            for label, operator, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector[2]):
                if label not in ("job", "instance") and "$" not in value:
                    found.add((selector[1], label, operator, value))
    return found


def unmatched(samples: dict[str, list[tuple[dict[str, str], float]]], metric: str, label: str, operator: str,
              value: str) -> str | None:
    """Why a matcher finds nothing in `samples` (None: it does).  A positive one that is an alternation of plain
    values (`hit|redispatch`) needs each value, since the others would still match if one were renamed; a
    negative one only needs the label (its values may not have happened yet)."""
    values = {labels[label] for labels, _ in samples.get(metric, []) if label in labels}
    if not values:
        return f"{metric} has no label {label}"
    if operator in ("!~", "!="):
        return None
    if operator == "=":
        return None if value in values else f'{metric}{{{label}="{value}"}}: the scrape has {sorted(values)}'
    alternatives = value.split("|")
    if all(re.fullmatch(r"[A-Za-z0-9_]+", alternative) for alternative in alternatives):
        missing = [alternative for alternative in alternatives if alternative not in values]
        return f"{metric}{{{label}=~{value!r}}}: no {missing} in {sorted(values)}" if missing else None
    if any(re.fullmatch(value, v) for v in values):
        return None
    return f"{metric}{{{label}=~{value!r}}}: none of {sorted(values)}"


async def test_every_metric_in_rules_and_dashboard_exists(console: ConsoleStack) -> None:
    """Scrape a live balancer: every lb_* name the alert rules and the Grafana dashboard use is exported."""
    # Labelled counters appear with their first count: a handshake and a refusal of our own, so that the
    # test holds alone (pytest-xdist may run it on a worker where no other test of this module visited).
    await visit(console.a.ws_url())
    assert console.a.port is not None
    reader, writer = await asyncio.open_connection(HOST, console.a.port)
    writer.write(b"NOT HTTP\r\n\r\n")
    assert (await reader.read(12)).startswith(b"HTTP/1.1 400")
    writer.close()
    samples = await scrape(console.a)
    used = names_in_rules_and_dashboard()
    assert {"lb_backend_state", "lb_handshake_duration_seconds_bucket", "lb_backend_errors_total"} <= used
    # A pool with DNS discovery exports these; this stack has none (test_discovery scrapes them live).
    discovery = {"lb_discovery_backends", "lb_discovery_errors_total", "lb_discovery_last_success_timestamp_seconds"}
    # The owner of `workers: N` exports these; this stack runs one process (test_workers scrapes them live).
    workers = {"lb_worker_restarts_total", "lb_workers"}
    missing = sorted(name for name in used - discovery - workers if name not in samples)
    assert not missing, f"used by deploy/observability but not exported: {missing}"
    # And the labels and values they select by (a value renamed in the product left a panel empty, the names fine).
    matchers = matchers_in_rules_and_dashboard()
    assert {("lb_health_checks_total", "result"), ("lb_backend_state", "state")} <= {m[:2] for m in matchers}
    wrong = [why for matcher in sorted(matchers) if matcher[0] in samples and (why := unmatched(samples, *matcher))]
    assert not wrong, f"deploy/observability selects what a live scrape does not have: {wrong}"
    assert {name for name in used if name.startswith("lb_discovery_")} <= discovery


def test_grafana_dashboard_panels() -> None:
    """The dashboard has the panels an operator starts from, each with a query."""
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Backends by state", "Tunnels per backend", "Sticky hit ratio", "Redispatch rate",
                   "Handshake latency", "Backend errors"):
        assert wanted in titles
    assert all(panel["targets"] for panel in dashboard["panels"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_alert_rules_cover_the_incidents() -> None:
    """The shipped Prometheus rules alert on each incident an operator must hear of (backend down, no healthy backend,
    redispatch spike, error ratio, failed reload, drift, stale discovery)."""
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert {"LbBackendDown", "LbPoolNoHealthyBackend", "LbRedispatchSpike", "LbHandshakeErrorRatio",
            "LbConfigReloadFailed", "LbConfigDrift", "LbDiscoveryStale"} <= alerts


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` accepts the shipped alert rules."""
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stdout + done.stderr


# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$job": ".*", "$pool": ".*"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """The rules went through promtool and the dashboard's queries did not: a typo in a panel's PromQL only showed
    as an error in Grafana.  Each query, its variables filled in as Grafana does, is a recording rule here."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = []
    for panel in dashboard["panels"]:
        for index, target in enumerate(panel["targets"]):
            expr = target["expr"]
            for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
            assert "$" not in expr, f"panel {panel['title']!r} uses a variable this test does not know: {expr}"
            rules.append({"record": f"dashboard:panel_{panel['id']}_{index}", "expr": expr})
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_the_error_ratio_alert_fires_before_every_kind_of_error_has_happened(tmp_path: Path) -> None:
    """Counters have no series before their first event, and `a + b` with either missing is empty: the
    alert must still fire for 5xx answers on a balancer where no connect has failed yet.  It counts clients
    answered 5xx, once each, against the requests that reached a pool: neither a flood of 4xx junk nor
    attempts retried elsewhere move it."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "LbHandshakeErrorRatio")
    series = [
        # Instance a: 98 of every 100 handshakes answered 503, none failed to connect (no such series).
        ('lb_build_info{job="lb", instance="a", version="1", config_hash="x"}', "1x30"),
        ('lb_handshakes_total{job="lb", instance="a", pool="p", backend="b", outcome="ok"}', "0+2x30"),
        ('lb_rejected_requests_total{job="lb", instance="a", status="503"}', "0+98x30"),
        # Instance b, healthy beside it: no alert.
        ('lb_build_info{job="lb", instance="b", version="1", config_hash="x"}', "1x30"),
        ('lb_handshakes_total{job="lb", instance="b", pool="p", backend="b", outcome="switched"}', "0+100x30"),
        # Instance c: every client gets 502 (3 attempts each: refused, or answered with junk), under a flood
        # of 400s from anyone: still 100% of the clients that reached a pool; the flood counted did keep it
        # at 3%.
        ('lb_build_info{job="lb", instance="c", version="1", config_hash="x"}', "1x30"),
        ('lb_handshakes_total{job="lb", instance="c", pool="p", backend="b", outcome="connect_failed"}', "0+15x30"),
        ('lb_handshakes_total{job="lb", instance="c", pool="p", backend="b", outcome="bad_answer"}', "0+15x30"),
        ('lb_rejected_requests_total{job="lb", instance="c", status="502"}', "0+10x30"),
        ('lb_rejected_requests_total{job="lb", instance="c", status="400"}', "0+600x30"),
        # Instance d: a third of the attempts fail and are retried elsewhere, every client served: no alert
        # here (LbBackendErrors' business).
        ('lb_build_info{job="lb", instance="d", version="1", config_hash="x"}', "1x30"),
        ('lb_handshakes_total{job="lb", instance="d", pool="p", backend="b", outcome="connect_failed"}', "0+50x30"),
        ('lb_handshakes_total{job="lb", instance="d", pool="p", backend="c", outcome="switched"}', "0+100x30"),
    ]
    expected = [
        {
            "exp_labels": {"severity": "critical", "job": "lb", "instance": instance},
            "exp_annotations": {
                "summary": f"{share} of handshakes fail on {instance}",
                "description": rule["annotations"]["description"],
            },
        }
        for instance, share in (("a", "98%"), ("c", "100%"))
    ]
    promtool_test(tmp_path, series, "LbHandshakeErrorRatio", expected)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_the_reload_alert_fires_on_a_failed_reload_and_clears_on_the_one_that_fixes_it(tmp_path: Path) -> None:
    """A window over the failure counter kept it firing for 15 minutes after the operator's fix."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "LbConfigReloadFailed")
    # Minute 5: a reload fails; minute 7: the fixed file reloads.
    series = [('lb_config_last_reload_successful{job="lb", instance="a"}', "1 1 1 1 1 0 0 1 1 1 1 1")]
    fired = [{
        "exp_labels": {"severity": "warning", "job": "lb", "instance": "a"},
        "exp_annotations": {
            "summary": "Configuration reload failed on a", "description": rule["annotations"]["description"],
        },
    }]
    promtool_test(tmp_path, series, "LbConfigReloadFailed", fired, at="6m")
    promtool_test(tmp_path, series, "LbConfigReloadFailed", [], at="8m")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_the_redispatch_alert_is_the_share_of_pinned_clients(tmp_path: Path) -> None:
    """A third of the pinned clients lose their gateway while a flood of new clients (a launch, or anyone
    sending no cookie) comes in beside them: the alert fires; it read 0.6 % of all decisions."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "LbRedispatchSpike")
    decisions = 'lb_affinity_decisions_total{{job="lb", pool="{pool}", result="{result}"}}'
    series = [
        (decisions.format(pool="lost", result="hit"), "0+120x20"),
        (decisions.format(pool="lost", result="redispatch"), "0+60x20"),
        (decisions.format(pool="lost", result="new"), "0+10000x20"),
        (decisions.format(pool="fine", result="hit"), "0+120x20"),
        (decisions.format(pool="fine", result="new"), "0+10000x20"),
    ]
    expected = [{
        "exp_labels": {"severity": "warning", "job": "lb", "pool": "lost"},
        "exp_annotations": {
            "summary": "33.33% of pinned clients of lost are redispatched",
            "description": rule["annotations"]["description"],
        },
    }]
    promtool_test(tmp_path, series, "LbRedispatchSpike", expected)


def promtool_test(
    tmp_path: Path, series: list[tuple[str, str]], alertname: str, expected: list[dict[str, Any]], at: str = "15m"
) -> None:
    """`promtool test rules`: `series` (a sample a minute) make exactly the `expected` alerts of `alertname` at `at`."""
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": name, "values": values} for name, values in series],
            "alert_rule_test": [{"eval_time": at, "alertname": alertname, "exp_alerts": expected}],
        }],
    }
    path = tmp_path / f"{alertname}_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_a_pool_that_discovered_nothing_has_no_healthy_backend(tmp_path: Path) -> None:
    """A discovery-only pool whose lookups found nothing exports no lb_backend_state at all: the alert
    for a pool answering 503 must still fire (a reviewer's case), and not for a pool with static
    backends up beside an empty discovery."""
    series = [
        ('lb_discovery_backends{job="lb", instance="a", pool="empty"}', "0x20"),
        ('lb_discovery_backends{job="lb", instance="a", pool="mixed"}', "0x20"),
        ('lb_backend_state{job="lb", instance="a", pool="mixed", backend="s1", state="up"}', "1x20"),
        ('lb_backend_state{job="lb", instance="a", pool="down", backend="d1", state="up"}', "0x20"),
    ]
    expected = firing("LbPoolNoHealthyBackend", "critical", "down", "empty")
    promtool_test(tmp_path, series, "LbPoolNoHealthyBackend", expected)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_discovery_that_has_not_succeeded_for_minutes_is_alerted(tmp_path: Path) -> None:
    """Failing and never succeeded (timestamp 0), or failing since long ago: alert.  A pool whose lookups
    succeed, or that looks up rarely (`interval: 30m`) without failing: none."""
    last_success, errors = "lb_discovery_last_success_timestamp_seconds", "lb_discovery_errors_total"
    series = [
        (f'{last_success}{{job="lb", instance="a", pool="never"}}', "0x20"),
        (f'{errors}{{job="lb", instance="a", pool="never"}}', "0+1x20"),
        (f'{last_success}{{job="lb", instance="a", pool="stuck"}}', "60x20"),
        (f'{errors}{{job="lb", instance="a", pool="stuck"}}', "0+1x20"),
        # Succeeds every minute (promtool's clock starts at 0: minute m is m*60 seconds).
        (f'{last_success}{{job="lb", instance="a", pool="fine"}}', "0+60x20"),
        (f'{errors}{{job="lb", instance="a", pool="fine"}}', "0x20"),
        (f'{last_success}{{job="lb", instance="a", pool="rare"}}', "60x20"),
        (f'{errors}{{job="lb", instance="a", pool="rare"}}', "0x20"),
    ]
    promtool_test(tmp_path, series, "LbDiscoveryStale", firing("LbDiscoveryStale", "warning", "never", "stuck"))


def firing(alertname: str, severity: str, *pools: str) -> list[dict[str, Any]]:
    """The alerts `alertname` makes for `pools` of instance `a`, its annotations filled in (`{{ $labels.X }}`;
    the alerts tested this way use no `$value`)."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == alertname)
    alerts = []
    for pool in pools:
        labels = {"severity": severity, "job": "lb", "instance": "a", "pool": pool}
        annotations = {}
        for key, text in rule["annotations"].items():
            for name, value in labels.items():
                text = text.replace(f"{{{{ $labels.{name} }}}}", value)
            annotations[key] = text
        alerts.append({"exp_labels": labels, "exp_annotations": annotations})
    return alerts


async def test_histograms_and_errors_sum_over_workers(tmp_path: Path) -> None:
    """workers: 2: the owner's /metrics sums the workers' histograms; count still equals handshakes."""
    from tests.harness.ops import started_stack

    with started_stack(tmp_path, gateways=2, overrides={"workers": 2}) as stack:
        lb = stack.balancer
        visits = 8
        for _ in range(visits):
            await visit(lb.ws_url())

        async def reported() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            samples = await scrape(lb)
            count = total(samples, "lb_handshake_duration_seconds_count", pool="gateways")
            switched = total(samples, "lb_handshakes_total", pool="gateways", outcome="switched")
            return samples if count == switched == visits else None

        samples = await wait_until(reported, within=10 * UNIT, what="both workers' handshakes in the owner's metrics")
        assert total(samples, "lb_backend_connect_duration_seconds_count", pool="gateways") == visits
        inf = total(samples, "lb_handshake_duration_seconds_bucket", pool="gateways", le="+Inf")
        assert inf == visits
        # Health checks run in the owner: its own counts are there too, not overwritten by the workers'.
        for gateway in stack.gateways:
            assert total(samples, "lb_health_checks_total", pool="gateways", backend=gateway.id, result="success") > 0


def documented_metrics() -> set[str]:
    """Every lb_* family README's "Metrics" section names (its table and the lines around it), `_total` cut."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Metrics\n"):readme.index("### Log fields\n")]
    return {name.removesuffix("_total") for name in re.findall(r"\blb_[a-z_]+", section)}


async def test_every_exported_metric_is_in_the_readme(tmp_path: Path) -> None:
    """workers: 2, the most families a scrape has: every lb_* family of the owner's /metrics is in README."""
    from tests.harness.ops import started_stack

    with started_stack(tmp_path, gateways=1, overrides={"workers": 2}) as stack:
        lb = stack.balancer
        await visit(lb.ws_url())

        async def both_workers() -> set[str] | None:
            families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in await scrape(lb)}
            return families if "lb_worker_cpu_seconds" in families else None

        families = await wait_until(both_workers, within=10 * UNIT, what="the workers' series in the owner's metrics")
    undocumented = sorted(name for name in families if name.startswith("lb_") and name not in documented_metrics())
    assert not undocumented, f"exported but not in README's Metrics: {undocumented}"


async def test_dashboard_html_lists_backends_without_javascript(console: ConsoleStack) -> None:
    """GET / is HTML naming every pool, backend and state before any script runs."""
    code, headers, body = await http_get_async(console.a.admin_url("/"))
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for gateway in console.gateways:
        assert f"<td>{gateway.id}</td><td>{gateway.address}</td><td>up</td>" in page
    assert "<h2>hole</h2>" in page


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_promtool_accepts_the_example_prometheus_config() -> None:
    """deploy/observability/prometheus.yml loads the rules beside it and is a valid Prometheus config."""
    done = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=OBSERVABILITY, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_a_worker_that_keeps_dying_is_alerted_and_one_restart_is_not(tmp_path: Path) -> None:
    """Four restarts in 15 minutes fire LbWorkerCrashLoop; the one restart of a worker killed once does not."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "LbWorkerCrashLoop")
    looping = [('lb_worker_restarts_total{job="lb", instance="a"}', "0 0 1 2 3 4 5 5 5")]
    fired = [{
        "exp_labels": {"severity": "warning", "job": "lb", "instance": "a"},
        "exp_annotations": {"summary": "Workers of a restarted 5 times in 15 minutes",
                            "description": rule["annotations"]["description"]},
    }]
    promtool_test(tmp_path, looping, "LbWorkerCrashLoop", fired, at="7m")
    once = [('lb_worker_restarts_total{job="lb", instance="a"}', "0 0 1 1 1 1 1 1 1")]
    promtool_test(tmp_path, once, "LbWorkerCrashLoop", [], at="7m")
