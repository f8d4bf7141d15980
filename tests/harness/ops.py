"""Helpers for the operations tests (drain, rewrite, reload, shutdown, redispatch, limits).

Beside `processes` and `clients`, reusing them; what it adds:

- `started_stack`: gateways plus one balancer for a module-scoped fixture, stopped by PID at the end;
- admin: `admin_post` (raw answer) and `set_state` (expects 200);
- process control: `signal_balancer`, `paused` (SIGSTOP for a block), `rewrite_config`, `reload_with`,
  `wait_for_log`;
- reload set-up: `start_two` (a balancer over two gateways, both up) and `backend_entry` (one backend
  as a config entry, to grow or shrink a pool);
- polling: `wait_until` (every wait bounded by a deadline in units of `UNIT`);
- clients: `visit_via` (the affinity token as cookie, X-LB-Affinity header or ?lb_affinity=),
  `token_of`, `wait_close` (the close frame a tunnel gets, and when);
- `BlackHole`: a backend that accepts TCP and never answers.

Written from SPEC.md and the product's documented admin/affinity contract; nothing here imports `lb`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.harness import COOKIE, UNIT
from tests.harness.clients import Visit, client_session, http_get_async, status, visit
from tests.harness.processes import Balancer, Gateway, Launcher, deep_merge, lb_config
from tests.harness.tcp import ThreadedServer

HEADER = "X-LB-Affinity"
QUERY = "lb_affinity"
CARRIERS = ("cookie", "header", "query")


# ---------------------------------------------------------------------------------------------------
# stacks


@dataclass
class OpsStack:
    launcher: Launcher
    gateways: list[Gateway]
    balancer: Balancer

    @property
    def ids(self) -> list[str]:
        return [g.id for g in self.gateways]


@contextlib.contextmanager
def launched(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Launcher]:
    """A Launcher in a fresh directory; every process it started is stopped by PID on the way out."""
    with contextlib.closing(Launcher(tmp_path_factory.mktemp(name))) as started:
        yield started


@contextlib.contextmanager
def started_stack(
    workdir: Path,
    *,
    gateways: int = 3,
    app_cookie: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pool: str = "gateways",
) -> Iterator[OpsStack]:
    """`gateways` demo gateways and a balancer routing every path to them; all stopped at the end.

    Per-IP handshake limiting is off unless `overrides` sets it: these tests open many connections from
    127.0.0.1 and are not about the limiter (test_limits is).  The token's header (`affinity.header`, off
    by default) is named: these stacks try every carrier (`visit_via`).
    """
    with contextlib.closing(Launcher(workdir)) as launcher:
        started = launcher.gateways(gateways, app_cookie=app_cookie)
        base = {"limits": {"handshake_rate_per_ip": 0}, "affinity": {"header": HEADER}}
        config = lb_config(pools={pool: started}, overrides=deep_merge(base, overrides or {}))
        balancer = launcher.balancer(config)
        balancer.wait_states({(pool, g.id): "up" for g in started})
        yield OpsStack(launcher, started, balancer)


# ---------------------------------------------------------------------------------------------------
# admin


_OWN_TOKEN = object()


@dataclass(frozen=True)
class AdminReply:
    """One admin API answer: `body` is the parsed JSON, or `{"_text": text}` when it is not JSON."""

    status: int
    body: Any
    headers: Mapping[str, str]
    text: str
    content_type: str


async def admin_request(
    lb: Balancer,
    method: str,
    path: str,
    *,
    token: str | object | None = _OWN_TOKEN,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    within: float = 5 * UNIT,
) -> AdminReply:
    """Any request to the admin API, with the balancer's own bearer token unless `token` says otherwise
    (None: no Authorization header).  The one way tests talk to the admin API by hand."""
    sent = dict(headers or {})
    if token is _OWN_TOKEN:
        token = lb.token
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with (
        client_session() as session,
        asyncio.timeout(within),
        session.request(method, lb.admin_url(path), headers=sent, params=params, json=json_body, data=data) as reply,
    ):
        text = await reply.text()
        try:
            body = json.loads(text) if text else {}
        except ValueError:
            body = {"_text": text}
        return AdminReply(reply.status, body, dict(reply.headers), text, reply.content_type)


async def admin_post(
    lb: Balancer,
    path: str,
    *,
    token: str | object | None = _OWN_TOKEN,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
    within: float = 5 * UNIT,
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    """POST to the admin API; `token` None sends no Authorization header. Returns status, JSON, headers."""
    reply = await admin_request(lb, "POST", path, token=token, params=params, json_body=json_body, within=within)
    return reply.status, reply.body, reply.headers


async def set_state(
    lb: Balancer, backend_id: str, action: str, *, pool: str = "gateways", params: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """drain | disable | enable, expecting 200 and the pool/id/state answer."""
    code, body, _ = await admin_post(lb, f"/pools/{pool}/backends/{backend_id}/{action}", params=params)
    assert code == 200, f"{action} {pool}/{backend_id}: {code} {body}"
    assert body.get("pool") == pool and body.get("id") == backend_id, body
    return body


# ---------------------------------------------------------------------------------------------------
# processes


def signal_balancer(lb: Balancer, sig: int) -> None:
    assert lb.proc is not None and lb.proc.poll() is None, f"balancer {lb.name} is not running"
    os.kill(lb.proc.pid, sig)


@contextlib.contextmanager
def paused(*pids: int) -> Iterator[None]:
    """Stop these processes (SIGSTOP: a paused VM, a starved container, a stuck loop) for the block, and
    let each go on (SIGCONT) on the way out, unless it is gone by then."""
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def worker_pids(owner_pid: int) -> list[int]:
    """The owner's `lb worker` children, from ps."""
    out = subprocess.run(["ps", "--ppid", str(owner_pid), "-o", "pid=,args="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines() if " lb worker " in line]


async def two_workers(lb: Balancer) -> list[int]:
    """The PIDs of a `workers: 2` balancer's two workers, once both are there."""
    assert lb.proc is not None
    pid = lb.proc.pid
    found: list[int] = await wait_until(
        lambda: p if len(p := worker_pids(pid)) == 2 else None, within=10 * UNIT, what="two workers"
    )
    return found


async def both_serving(lb: Balancer) -> list[int]:
    """The two workers' PIDs, once the owner counts both as serving (a replacement may still be starting)."""

    async def counted() -> bool:
        return (await status(lb)).get("workers") == {"count": 2, "serving": 2}

    await wait_until(counted, within=10 * UNIT, every=0.1, what="both workers serving")
    return await two_workers(lb)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (`SigCgt` in /proc): a worker still starting has
    SIGUSR1/2 ignored without a word (lb.startup_signals) until its event loop takes them over."""
    try:
        caught = signal_set(Path(f"/proc/{pid}/status"), "SigCgt")
    except OSError:
        return False
    return bool(caught & (1 << (signum - 1)))


def signal_set(status: Path, field: str) -> int:
    """A signal mask of a process or thread (`SigCgt`, `SigBlk`...) from its /proc `status` file: bit
    `signum - 1` is that signal.  Raises OSError once it is gone."""
    text = status.read_text()
    return int(next((line.split()[1] for line in text.splitlines() if line.startswith(f"{field}:")), "0"), 16)


def process_alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        return "Z (zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def rewrite_config(lb: Balancer, config: Mapping[str, Any] | str) -> None:
    """Replace the balancer's config file (a mapping, or raw text for broken configs); SIGHUP applies it."""
    text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(lb.config_path)  # atomic: a reload never reads half a file


def backend_entry(gateway: Gateway) -> dict[str, object]:
    """A gateway as one `pools.<pool>.backends` entry, for configs grown or shrunk before a reload."""
    return {"id": gateway.id, "address": gateway.address, "weight": 1}


def start_two(launcher: Launcher, pool: str, gw1: Gateway, gw2: Gateway) -> tuple[Balancer, dict[str, Any]]:
    """A balancer over gw1 and gw2 (no per-IP handshake limit), both `up`; returns it and its config,
    which reload tests copy and change."""
    config = lb_config(pools={pool: [gw1, gw2]}, overrides={"limits": {"handshake_rate_per_ip": 0}})
    lb = launcher.balancer(config)
    lb.wait_states({(pool, gw1.id): "up", (pool, gw2.id): "up"})
    return lb, config


async def reload_with(
    lb: Balancer, config: Mapping[str, Any] | str | None = None, *, expect: str = "reloaded", within: float = 5 * UNIT
) -> str:
    """Write `config` (if given) as the balancer's file, SIGHUP it, and wait for the log line containing
    `expect` ("reloaded", or "reload failed" for a broken file); returns that line."""
    if config is not None:
        rewrite_config(lb, config)
    mark = lb.log_lines()
    signal_balancer(lb, signal.SIGHUP)
    return await wait_for_log(lb, expect, after=mark, within=within)


async def metrics_text(lb: Balancer) -> str:
    """The balancer's /metrics exposition."""
    code, _, body = await http_get_async(lb.admin_url("/metrics"))
    assert code == 200, body[:200]
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The first sample of `name` in an exposition whose labels include `labels`; None if there is none."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()) and (head == name or head.startswith(name + "{")):
            return float(value)
    return None


async def wait_for_log(lb: Balancer, text: str, *, after: int = 0, within: float = 5 * UNIT) -> str:
    """Poll the balancer's stdout+stderr until a line after line number `after` contains `text`."""
    deadline = time.monotonic() + within
    while True:
        lines = lb.log_text().splitlines()[after:]
        for line in lines:
            if text in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r} within {within}s:\n{lb.logs_tail()}")
        await asyncio.sleep(0.05)


async def wait_exit(lb: Balancer, within: float) -> int:
    """Wait for the balancer process to exit on its own; returns its exit code."""
    assert lb.proc is not None
    deadline = time.monotonic() + within
    while lb.proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"balancer {lb.name} still running after {within}s:\n{lb.logs_tail()}")
        await asyncio.sleep(0.05)
    return lb.proc.returncode


# ---------------------------------------------------------------------------------------------------
# polling


async def wait_until(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any],
    *,
    within: float = 5 * UNIT,
    what: str = "condition",
    every: float = 0.05,
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; returns that value."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            last = result
        except (aiohttp.ClientError, OSError, AssertionError, TimeoutError) as exc:
            last = exc
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s (last: {last!r})")
        await asyncio.sleep(every)


# ---------------------------------------------------------------------------------------------------
# clients


def token_of(v: Visit) -> str:
    """The affinity token a visit was given: Set-Cookie carries it, and X-LB-Affinity the same one where the
    stack names that header (`started_stack`)."""
    assert v.cookie is not None, f"no {COOKIE} Set-Cookie on the answer: {dict(v.headers)}"
    header = v.headers.get(HEADER)
    assert header in (None, v.cookie.value), f"{HEADER} header {header!r} differs from the cookie {v.cookie.value!r}"
    return v.cookie.value


async def visit_until(url: str, backend_id: str, *, tries: int) -> Visit:
    """The first of up to `tries` fresh visits that lands on `backend_id` (least_conn ties take turns,
    so a few visits reach every backend)."""
    for _ in range(tries):
        v = await visit(url)
        if v.server_id == backend_id:
            return v
    raise AssertionError(f"none of {tries} visits to {url} reached {backend_id}")


def with_query(url: str, token: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{QUERY}={token}"


async def visit_via(url: str, token: str, via: str, **kwargs: Any) -> Visit:
    """Connect presenting `token` as cookie, header or query parameter (see CARRIERS)."""
    if via == "cookie":
        return await visit(url, cookie=token, **kwargs)
    if via == "header":
        headers = dict(kwargs.pop("headers", None) or {})
        headers[HEADER] = token
        return await visit(url, headers=headers, **kwargs)
    if via == "query":
        return await visit(with_query(url, token), **kwargs)
    raise ValueError(via)


@dataclass(frozen=True)
class Closed:
    code: int | None
    reason: str
    at: float  # time.monotonic() when the close frame arrived


async def wait_close(ws: aiohttp.ClientWebSocketResponse, within: float) -> Closed:
    """Read until the close frame (data messages in between are ignored); fail if none comes in time."""
    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive(timeout=within)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return Closed(msg.data, msg.extra or "", time.monotonic())
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return Closed(ws.close_code, "", time.monotonic())


# ---------------------------------------------------------------------------------------------------
# a backend that accepts and never answers


class BlackHole:
    """Accepts TCP connections, reads nothing, answers nothing (a hung gateway); passes TCP health checks."""

    def __init__(self, backend_id: str) -> None:
        self.id = backend_id
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._hold, name=f"black hole {backend_id}", backlog=128)
        self.port = self._server.port

    @property
    def address(self) -> str:
        return self._server.address

    def _hold(self, conn: socket.socket) -> None:
        with self._lock:
            self._held.append(conn)

    def requests_seen(self) -> int:
        """Connections on which a request head began to arrive (health checks send nothing)."""
        seen = 0
        with self._lock:
            for conn in self._held:
                with contextlib.suppress(OSError):
                    if conn.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT).startswith(b"GET"):
                        seen += 1
        return seen

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()
