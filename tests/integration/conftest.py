"""Integration harness: real gateways and a real balancer on loopback, plus clients that talk to them.

What it owns:

- processes: `python -m backends_demo --id gw-N --port P` gateways and `python -m lb run --config F`
  balancers, started on ports from `bind(("127.0.0.1", 0))`, ready once `/health` or `/healthz`
  answers (against a deadline), stopped by PID with `terminate()`, `wait(timeout)`, then `kill()`;
- a *spy* backend (a threaded HTTP server in this process) that records every request the balancer
  forwards to it and echoes WebSocket frames, so a test can prove that a request never reached a
  backend, and read the exact forwarded head;
- clients: `ws_connect` (aiohttp, with an optional source address and cookie), `RawWs` (hand-made
  frames for fragmentation, ping and close reasons), `raw_exchange` (hostile bytes, status line back);
- admin helpers: `status`, `wait_for_state`.

Process fixtures are synchronous on purpose: a process outlives any event loop, so module- and
session-scoped stacks need no shared loop and every test keeps its own (pytest-asyncio's default).

Every wait is bounded by a deadline in units of `UNIT` seconds (`LB_TEST_UNIT=2` on a slow machine).
`LB_TEST_EVENT_LOOP=asyncio` sets `runtime.event_loop` in every generated config (default: the product's).
The tests themselves are written from SPEC.md only; nothing here imports `lb`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from bench.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = float(os.environ.get("LB_TEST_UNIT", "1"))  # seconds; every deadline is a multiple of it
HOST = "127.0.0.1"
COOKIE = "LB_AFFINITY"
APP_COOKIE = "APP_SID"  # the demo gateways' own session cookie in the shared stack
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

GATEWAY_READY = 10 * UNIT
BALANCER_READY = 15 * UNIT
STOP_WAIT = 5 * UNIT


# ---------------------------------------------------------------------------------------------------
# ports, environment, small sync HTTP


def child_env() -> dict[str, str]:
    """Environment for product processes: unbuffered output, no asyncio debug mode.

    `make test` sets PYTHONASYNCIODEBUG=1 for the test process; the product under test runs as
    an operator would run it.
    """
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_lb(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30 * UNIT
) -> subprocess.CompletedProcess[str]:
    """`python -m lb ARGS` to its end, as an operator runs it; the exit code is the caller's to check."""
    return subprocess.run(
        [sys.executable, "-m", "lb", *args], cwd=ROOT, env=child_env() if env is None else dict(env),
        capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
    )


def run_ctl(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30 * UNIT
) -> subprocess.CompletedProcess[str]:
    """`lb ctl ARGS` with only the admin address and token the test gives (none inherited)."""
    environment = child_env()
    environment.pop("LB_ADMIN_URL", None)
    environment.pop("LB_ADMIN_TOKEN", None)
    environment.update(env or {})
    return run_lb("ctl", *args, env=environment, timeout=timeout)


def lb_certs(out: Path) -> Path:
    """Development certificates from `lb certs --out OUT` (ca.crt, server.crt, server.key); returns OUT."""
    done = run_lb("certs", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("ca.crt", "server.crt", "server.key"):
        assert (out / name).is_file(), f"lb certs did not write {name}"
    return out


def http_get(url: str, *, timeout: float = 1.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """Blocking GET for fixtures (no event loop there); raises OSError when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------
# processes


class Backend(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...


@dataclass(frozen=True)
class DeadBackend:
    """A backend whose port nobody listens on."""

    id: str
    port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def stop_process(proc: subprocess.Popen[Any] | None, *, sig: int = signal.SIGTERM) -> int | None:
    """Stop one process by PID: signal, wait, then kill. Returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=STOP_WAIT)


class Gateway:
    """One demo gateway subprocess on a fixed port (restartable on the same port)."""

    def __init__(
        self,
        server_id: str,
        workdir: Path,
        *,
        app_cookie: str | None = None,
        host: str = HOST,
        port: int | None = None,
    ) -> None:
        self.id = server_id
        self.host = host  # another loopback address (127.0.0.2, ...) for tests of DNS discovery
        self.port = free_port(host) if port is None else port
        self.app_cookie = app_cookie
        self.log_path = workdir / f"{server_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def launch(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.id} already running"
        self._close_log()
        cmd = [sys.executable, "-m", "backends_demo", "--id", self.id, "--host", self.host, "--port", str(self.port)]
        if self.app_cookie:
            cmd += ["--app-cookie", self.app_cookie]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = GATEWAY_READY) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"gateway {self.id} exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/health", timeout=0.5)[0] == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"gateway {self.id} not healthy within {timeout}s:\n{log_tail(self.log_path)}")
            time.sleep(0.05)

    def start(self) -> Gateway:
        self.launch()
        self.wait_ready()
        return self

    def kill(self) -> None:
        """Crash it: SIGKILL, so nothing closes cleanly (its port is closed afterwards)."""
        stop_process(self.proc, sig=signal.SIGKILL)
        self._close_log()

    def stop(self) -> None:
        stop_process(self.proc)
        self._close_log()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def new_key() -> str:
    return secrets.token_urlsafe(32)


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


FAST_HEALTH = {
    "type": "http",
    "path": "/health",
    "interval": "200ms",
    "timeout": "200ms",
    "rise": 1,
    "fall": 2,
}
# For stacks where nothing is killed: a gateway must miss 3 checks of 1 s each to flap; closed ports
# still fail at once (connection refused), so dead backends are down within about a second.
STEADY_HEALTH = {"type": "http", "path": "/health", "interval": "300ms", "timeout": "1s", "rise": 1, "fall": 3}


def lb_config(
    *,
    pools: Mapping[str, Sequence[Backend]],
    routes: Mapping[str, str] | None = None,
    keys: Sequence[str] | None = None,
    tls: tuple[Path, Path] | None = None,
    overrides: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] = FAST_HEALTH,
) -> dict[str, Any]:
    """A balancer config in SPEC's YAML keys, on fresh ports; `overrides` deep-merges last.

    `health` is every pool's health_check: FAST_HEALTH for tests that kill gateways,
    STEADY_HEALTH for stacks that must not flap on a busy machine.
    """
    listeners: list[dict[str, Any]] = [{"bind": f"{HOST}:{free_port()}"}]
    if tls is not None:
        listeners.append({"bind": f"{HOST}:{free_port()}", "tls": {"cert": str(tls[0]), "key": str(tls[1])}})
    config: dict[str, Any] = {
        "listeners": listeners,
        "admin": {"bind": f"{HOST}:{free_port()}", "token": secrets.token_urlsafe(16)},
        "affinity": {
            "mode": "insert",
            "cookie": COOKIE,
            "max_age": "1h",
            "secret_keys": list(keys) if keys is not None else [new_key(), new_key()],
            "same_site": "Lax",
            "http_only": True,
            "secure": "auto",
        },
        "routes": [{"path_prefix": p, "pool": pool} for p, pool in (routes or {"/": next(iter(pools))}).items()],
        "pools": {
            name: {
                "balance": "least_conn",
                "health_check": dict(health),
                "backends": [{"id": b.id, "address": b.address, "weight": 1} for b in backends],
            }
            for name, backends in pools.items()
        },
        "timeouts": {"handshake": "5s", "backend_connect": "2s", "shutdown_grace": "500ms"},
        "limits": {"max_header_bytes": 16384},
    }
    loop = os.environ.get("LB_TEST_EVENT_LOOP")  # e.g. "asyncio" to tell loop-specific bugs apart
    if loop:
        config["runtime"] = {"event_loop": loop}
    return deep_merge(config, overrides or {})


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


class Balancer:
    """One `python -m lb run --config F` subprocess; stdout and stderr go to files in its workdir."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "lb") -> None:
        self.config = config
        self.name = name
        self.cwd = ROOT
        self.config_path = workdir / f"{name}.yaml"
        self.out_path = workdir / f"{name}.stdout.log"
        self.err_path = workdir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[Any] = []
        plain = [item for item in config["listeners"] if "tls" not in item]
        secure = [item for item in config["listeners"] if "tls" in item]
        self.port = _port_of(plain[0]["bind"]) if plain else None
        self.tls_port = _port_of(secure[0]["bind"]) if secure else None
        self.admin_port = _port_of(config["admin"]["bind"])
        self.token: str = config["admin"]["token"]
        self.keys: list[str] = list(config["affinity"]["secret_keys"])

    # URLs -------------------------------------------------------------------------------------
    def ws_url(self, path: str = "/ws", *, tls: bool = False, host: str = HOST) -> str:
        return f"{'wss' if tls else 'ws'}://{host}:{self.tls_port if tls else self.port}{path}"

    def http_url(self, path: str = "/whoami", *, tls: bool = False, host: str = HOST) -> str:
        return f"{'https' if tls else 'http'}://{host}:{self.tls_port if tls else self.port}{path}"

    def admin_url(self, path: str = "/status") -> str:
        return f"http://{HOST}:{self.admin_port}{path}"

    # process ----------------------------------------------------------------------------------
    def launch(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._files = [open(self.out_path, "ab"), open(self.err_path, "ab")]  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "lb", "run", "--config", str(self.config_path)]

    def wait_ready(self, timeout: float = BALANCER_READY) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"balancer {self.name} exited with {self.proc.returncode}:\n{self.logs_tail()}")
            with contextlib.suppress(OSError):
                if http_get(self.admin_url("/healthz"), timeout=0.5)[0] == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"balancer {self.name}: /healthz not 200 within {timeout}s:\n{self.logs_tail()}")
            time.sleep(0.05)

    def wait_states(self, expected: Mapping[tuple[str, str], str], timeout: float = 10 * UNIT) -> None:
        """Wait until /status shows these (pool, id) → state; fail, with what it last showed, at `timeout`."""
        deadline = time.monotonic() + timeout
        got: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                _, body = http_get(self.admin_url("/status"), timeout=1.0)
                got = backend_states(json.loads(body))
                if all(got.get(key) == state for key, state in expected.items()):
                    return
            time.sleep(0.05)
        wanted = {key: (got.get(key), state) for key, state in expected.items() if got.get(key) != state}
        pytest.fail(
            f"balancer {self.name}: /status never showed {expected} within {timeout}s "
            f"((pool, id): (shown, wanted) {wanted}):\n{self.logs_tail()}"
        )

    def stop(self) -> int | None:
        code = stop_process(self.proc)
        for handle in self._files:
            handle.close()
        self._files = []
        return code

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"balancer {self.name} is not running (exit {self.proc and self.proc.returncode}):\n{self.logs_tail()}"
        )

    # logs -------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in (self.out_path, self.err_path) if path.exists())

    def log_lines(self) -> int:
        return len(self.log_text().splitlines())

    def logs_tail(self, lines: int = 40) -> str:
        return f"--- stdout\n{log_tail(self.out_path, lines)}\n--- stderr\n{log_tail(self.err_path, lines)}"


class Launcher:
    """Starts gateways and balancers for one scope and stops every one of them, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._gateways: list[Gateway] = []
        self._balancers: list[Balancer] = []
        self._spies: list[SpyBackend] = []

    def gateways(self, n: int, *, prefix: str = "gw", app_cookie: str | None = None) -> list[Gateway]:
        """Start n gateways `gw-1..gw-n` at once, then wait for all of them."""
        started = [Gateway(f"{prefix}-{i}", self.workdir, app_cookie=app_cookie) for i in range(1, n + 1)]
        self._gateways.extend(started)
        for gateway in started:
            gateway.launch()
        for gateway in started:
            gateway.wait_ready()
        return started

    def spy(self, server_id: str = "spy-1") -> SpyBackend:
        spy = SpyBackend(server_id)
        self._spies.append(spy)
        return spy

    def balancers(self, *configs: dict[str, Any], names: Sequence[str] | None = None) -> list[Balancer]:
        """Start balancers at once, then wait for each one's /healthz."""
        names = list(names or [f"lb{len(self._balancers) + i}" for i in range(len(configs))])
        started = [Balancer(config, self.workdir, name) for config, name in zip(configs, names, strict=True)]
        self._balancers.extend(started)
        for balancer in started:
            balancer.launch()
        for balancer in started:
            balancer.wait_ready()
        return started

    def balancer(self, config: dict[str, Any], name: str | None = None) -> Balancer:
        return self.balancers(config, names=[name] if name else None)[0]

    def starting_balancer(self, config: dict[str, Any], name: str = "lb-starting") -> Balancer:
        """Launch a balancer without waiting for it: for what it answers while it starts."""
        balancer = Balancer(config, self.workdir, name)
        self._balancers.append(balancer)
        balancer.launch()
        return balancer

    def adopt(self, process: Gateway | Balancer) -> None:
        """Start a process built by the test (a subclass with its own command line); stopped with the rest."""
        if isinstance(process, Gateway):
            self._gateways.append(process)
        else:
            self._balancers.append(process)
        process.launch()
        process.wait_ready()

    def close(self) -> None:
        for balancer in reversed(self._balancers):
            balancer.stop()
        for gateway in reversed(self._gateways):
            gateway.stop()
        for spy in self._spies:
            spy.close()


@pytest.fixture(scope="module")
def gateways(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    """Gateways `gw-1..gw-n` shared by one module whose tests leave them running; n is the module's
    `GATEWAYS` (default 2).  Each test starts its own balancer in front of them with `launcher`."""
    count = int(getattr(request.module, "GATEWAYS", 2))
    started = Launcher(tmp_path_factory.mktemp(f"{request.module.__name__}-gateways"))
    try:
        yield started.gateways(count)
    finally:
        started.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Processes for one test (destructive tests: killing gateways, odd configs)."""
    started = Launcher(tmp_path)
    try:
        yield started
    finally:
        started.close()


# ---------------------------------------------------------------------------------------------------
# the shared stack: 3 gateways + a spy + a balancer, for every test that leaves it as it found it


@dataclass
class Stack:
    balancer: Balancer
    gateways: list[Gateway]
    spy: SpyBackend
    dead: list[DeadBackend]

    @property
    def ids(self) -> set[str]:
        return {g.id for g in self.gateways}


SHARED_ROUTES = {"/ws": "gateways", "/whoami": "gateways", "/dead": "dead", "/spy": "spy"}
SHARED_HANDSHAKE = 1.0  # seconds: timeouts.handshake of the shared balancer


@pytest.fixture(scope="session")
def _shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("shared")
    started = Launcher(workdir)
    try:
        gateways = started.gateways(3, app_cookie=APP_COOKIE)
        spy = started.spy()
        dead = [DeadBackend("dead-1"), DeadBackend("dead-2")]
        config = lb_config(
            pools={"gateways": gateways, "dead": dead, "spy": [spy]},
            routes=SHARED_ROUTES,
            health=STEADY_HEALTH,
            overrides={"timeouts": {"handshake": f"{int(SHARED_HANDSHAKE * 1000)}ms"}},
        )
        balancer = started.balancer(config, name="shared")
        expected = {("gateways", g.id): "up" for g in gateways}
        expected |= {("dead", d.id): "down" for d in dead} | {("spy", spy.id): "up"}
        balancer.wait_states(expected)
        yield Stack(balancer=balancer, gateways=gateways, spy=spy, dead=dead)
    finally:
        started.close()


@pytest.fixture
def stack(_shared_stack: Stack) -> Stack:
    """The shared stack, checked alive before each test so a crash shows where it happened."""
    _shared_stack.balancer.assert_alive()
    for gateway in _shared_stack.gateways:
        assert gateway.running, f"shared gateway {gateway.id} died:\n{log_tail(gateway.log_path)}"
    return _shared_stack


@pytest.fixture
def lb(stack: Stack) -> Balancer:
    return stack.balancer


# ---------------------------------------------------------------------------------------------------
# the spy backend


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


class _SpyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SpyServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, json.dumps({"status": "ok", "server_id": self.server.spy.id}).encode())
            return
        self.server.spy.record(SeenRequest(self.command, self.path, list(self.headers.items())))
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade") or "").lower() == "websocket" and key:
            self._websocket(key)
        else:
            self._answer(404, b"spy: no such page\n")

    def do_POST(self) -> None:
        self.server.spy.record(SeenRequest(self.command, self.path, list(self.headers.items())))
        self._answer(404, b"spy: no such page\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _websocket(self, key: str) -> None:
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.server.spy.track(self.connection)
        # Echo every frame back (unmasked), answer ping with pong and close with the same close.
        with contextlib.suppress(OSError, ValueError):
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                fin_op, length = head[0], head[1] & 0x7F
                masked = head[1] & 0x80
                if length == 126:
                    length = struct.unpack("!H", self.rfile.read(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", self.rfile.read(8))[0]
                mask = self.rfile.read(4) if masked else b""
                payload = self.rfile.read(length)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                opcode = fin_op & 0x0F
                if opcode == 0x9:
                    fin_op = 0x80 | 0xA
                self.wfile.write(encode_frame(fin_op & 0x0F, payload, fin=bool(fin_op & 0x80), mask=False))
                self.wfile.flush()
                if opcode == 0x8:
                    return


class _SpyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    spy: SpyBackend


class SpyBackend:
    """A backend in this process that records each forwarded request (health probes excepted)."""

    def __init__(self, server_id: str) -> None:
        self.id = server_id
        self._server = _SpyServer((HOST, 0), _SpyHandler)
        self._server.spy = self
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._requests: list[SeenRequest] = []
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"spy {server_id}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        self._server.shutdown()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=STOP_WAIT)


# ---------------------------------------------------------------------------------------------------
# aiohttp clients


def handshake_headers(ws: aiohttp.ClientWebSocketResponse) -> CIMultiDictProxy[str]:
    """The 101 response's headers.

    aiohttp 3.15 adds the public `ClientWebSocketResponse.response` (aio-libs/aiohttp#12903);
    before that the response is only reachable as `_response`.
    """
    response = getattr(ws, "response", None) or ws._response
    return response.headers


class _TrackingConnector(aiohttp.TCPConnector):
    """Remembers every connection it made, so the session can wait until each is really closed.

    aiohttp closes a released TLS connection without waiting for its asynchronous shutdown
    (aio-libs/aiohttp#1925); a test's event loop may then end first and leak the socket, which
    `filterwarnings = error` turns into a failure of whatever test runs next.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.made: list[Any] = []

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        protocol = await super()._create_connection(*args, **kwargs)
        self.made.append(protocol)
        return protocol


@contextlib.asynccontextmanager
async def client_session(*, source_ip: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """A session with no cookie jar (the test holds cookies itself) bound to `source_ip` if given."""
    connector = _TrackingConnector(local_addr=(source_ip, 0) if source_ip else None, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            yield session
    finally:
        closing = [closed for protocol in connector.made if (closed := protocol.closed) is not None]
        if closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 1 * UNIT)
            for protocol in connector.made:
                if protocol.closed is not None:  # TLS peer never finished the shutdown
                    protocol.abort()


def cookie_header(cookie: str | Mapping[str, str]) -> str:
    if isinstance(cookie, str):
        return cookie if "=" in cookie else f"{COOKIE}={cookie}"
    return "; ".join(f"{k}={v}" for k, v in cookie.items())


@contextlib.asynccontextmanager
async def ws_connect(
    url: str,
    *,
    cookie: str | Mapping[str, str] | None = None,
    source_ip: str | None = None,
    headers: Mapping[str, str] | None = None,
    within: float = 5 * UNIT,
    **kwargs: Any,
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, CIMultiDictProxy[str]]]:
    """Open a WebSocket through aiohttp; yields the ws and the 101 response headers.

    `cookie` is a token (sent as `LB_AFFINITY=<token>`), a full Cookie header value, or a mapping.
    Extra keyword arguments go to `ClientSession.ws_connect` (protocols, compress, ssl, ...).
    """
    request_headers = dict(headers or {})
    if cookie is not None:
        request_headers["Cookie"] = cookie_header(cookie)
    async with client_session(source_ip=source_ip) as session:
        ws = await asyncio.wait_for(
            session.ws_connect(
                url,
                headers=request_headers,
                timeout=aiohttp.ClientWSTimeout(ws_receive=within, ws_close=within),
                **kwargs,
            ),
            within,
        )
        try:
            yield ws, handshake_headers(ws)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), within)


async def recv_json(ws: aiohttp.ClientWebSocketResponse, within: float = 5 * UNIT) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), within)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text message, got {msg.type!r} {msg.data!r}"
    data = json.loads(msg.data)
    assert isinstance(data, dict)
    return data


async def recv_hello(ws: aiohttp.ClientWebSocketResponse, within: float = 5 * UNIT) -> dict[str, Any]:
    hello = await recv_json(ws, within)
    assert hello.get("type") == "hello", hello
    return hello


async def assert_echo(ws: aiohttp.ClientWebSocketResponse, payload: str | bytes, within: float = 5 * UNIT) -> None:
    if isinstance(payload, str):
        await ws.send_str(payload)
    else:
        await ws.send_bytes(payload)
    msg = await asyncio.wait_for(ws.receive(), within)
    expected = aiohttp.WSMsgType.TEXT if isinstance(payload, str) else aiohttp.WSMsgType.BINARY
    assert msg.type is expected, f"expected {expected!r} echo, got {msg.type!r} {str(msg.data)[:200]!r}"
    assert msg.data == payload, "echo differs from what was sent"


@dataclass
class Visit:
    """What one WebSocket connection through the balancer showed."""

    server_id: str
    hello: dict[str, Any]
    headers: CIMultiDictProxy[str]
    cookie: SetCookie | None  # our affinity Set-Cookie on the 101, if any


async def visit(url: str, **kwargs: Any) -> Visit:
    """Connect, read the hello, check one echo, close."""
    async with ws_connect(url, **kwargs) as (ws, headers):
        hello = await recv_hello(ws)
        await assert_echo(ws, "ping-" + secrets.token_hex(4))
    return Visit(hello["server_id"], hello, headers, affinity_cookie(headers))


@contextlib.asynccontextmanager
async def tunnel(url: str, *, hello: bool = True, **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A live tunnel for 'other connections are untouched' checks; echo-checked on entry.

    `hello=False` for the spy backend, which only echoes.
    """
    async with ws_connect(url, **kwargs) as (ws, _):
        if hello:
            await recv_hello(ws)
        await assert_echo(ws, "before")
        yield ws


async def http_get_async(
    url: str, *, cookie: str | Mapping[str, str] | None = None, source_ip: str | None = None, **kwargs: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    headers = dict(kwargs.pop("headers", None) or {})
    if cookie is not None:
        headers["Cookie"] = cookie_header(cookie)
    async with client_session(source_ip=source_ip) as session:
        async with asyncio.timeout(5 * UNIT):
            async with session.get(url, headers=headers, allow_redirects=False, **kwargs) as response:
                return response.status, response.headers, await response.read()


# ---------------------------------------------------------------------------------------------------
# cookies


@dataclass(frozen=True)
class SetCookie:
    name: str
    value: str
    attrs: tuple[str, ...]  # as sent, e.g. ("Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax")

    @property
    def attr_names(self) -> set[str]:
        return {a.split("=", 1)[0].strip().lower() for a in self.attrs}

    def normalized_attrs(self) -> set[str]:
        """Attributes with case-folded names (RFC 6265 §5.2: names are case-insensitive)."""
        out = set()
        for attr in self.attrs:
            name, eq, value = attr.partition("=")
            out.add(f"{name.strip().lower()}{eq}{value.strip()}")
        return out


def set_cookies(
    headers: CIMultiDictProxy[str] | CIMultiDict[str] | Iterable[tuple[str, str]],
) -> list[SetCookie]:
    items = headers.items() if hasattr(headers, "items") else headers
    out = []
    for name, value in items:
        if name.lower() != "set-cookie":
            continue
        first, *attrs = [part.strip() for part in value.split(";")]
        cname, _, cvalue = first.partition("=")
        out.append(SetCookie(cname.strip(), cvalue.strip(), tuple(a for a in attrs if a)))
    return out


def affinity_cookie(headers: Any, name: str = COOKIE) -> SetCookie | None:
    found = [c for c in set_cookies(headers) if c.name == name]
    assert len(found) <= 1, f"more than one {name} Set-Cookie: {found}"
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# admin


def backend_states(status_json: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(pool, id) → state, as `lb ctl status` shows it: `removed` for one gone from its pool, whose tunnels
    still run (/status: state `disabled`, `removed: true`)."""
    return {
        (pool, backend["id"]): "removed" if backend["removed"] else backend["state"]
        for pool, body in status_json["pools"].items()
        for backend in body["backends"]
    }


async def status(balancer: Balancer) -> dict[str, Any]:
    """GET /status on the admin listener, as JSON."""
    code, _, body = await http_get_async(balancer.admin_url("/status"))
    assert code == 200, f"/status answered {code}: {body[:200]!r}"
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def find_backend(status_json: Mapping[str, Any], pool: str, backend_id: str) -> dict[str, Any]:
    for backend in status_json["pools"][pool]["backends"]:
        if backend["id"] == backend_id:
            return dict(backend)
    raise AssertionError(f"no backend {backend_id} in pool {pool}: {status_json}")


async def wait_for_state(balancer: Balancer, pool: str, backend_id: str, state: str, within: float = 5 * UNIT) -> float:
    """Poll /status until the backend shows `state`; returns the seconds it took."""
    start = time.monotonic()
    last: Any = None
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            last = find_backend(await status(balancer), pool, backend_id)["state"]
            if last == state:
                return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{pool}/{backend_id} is {last!r}, not {state!r} after {within}s")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------------
# raw sockets: hostile input and hand-made frames


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_head(raw: bytes) -> RawResponse:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    assert version.startswith("HTTP/1."), f"not an HTTP status line: {lines[0]!r}"
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return RawResponse(int(code), reason, headers, b"")


async def open_raw(
    port: int, *, source_ip: str | None = None, host: str = HOST, within: float = 5 * UNIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source_ip, 0) if source_ip else None, limit=2**20),
        within,
    )


async def close_raw(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2 * UNIT)


async def read_response(reader: asyncio.StreamReader, *, within: float = 5 * UNIT, body: bool = True) -> RawResponse:
    """Read one response head (and its body by Content-Length, or to EOF when it has none)."""
    async with asyncio.timeout(within):
        raw = await reader.readuntil(b"\r\n\r\n")
        response = parse_head(raw[:-4])
        if body and response.status != 101:
            length = response.get("Content-Length")
            if length is not None:
                response.body = await reader.readexactly(int(length))
            elif response.status not in (204, 304):
                response.body = await reader.read(2**20)
    return response


async def raw_exchange(
    port: int, data: bytes, *, within: float = 5 * UNIT, source_ip: str | None = None
) -> RawResponse | None:
    """Send raw bytes, read the answer; None when the connection closes without any."""
    reader, writer = await open_raw(port, source_ip=source_ip)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await read_response(reader, within=within)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    finally:
        await close_raw(writer)


async def wait_closed_by_peer(reader: asyncio.StreamReader, within: float) -> bytes:
    """Read until EOF (or reset); returns what came before it. Fails if the peer keeps it open."""
    received = bytearray()
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def ws_key() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode()


def upgrade_request(
    path: str = "/ws",
    *,
    host: str = HOST,
    key: str | None = "auto",
    version: str | None = "13",
    extra: Sequence[tuple[str, str]] = (),
    method: str = "GET",
) -> bytes:
    """A WebSocket upgrade head; pass key/version None to leave the header out."""
    headers = [("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if key is not None:
        headers.append(("Sec-WebSocket-Key", ws_key() if key == "auto" else key))
    if version is not None:
        headers.append(("Sec-WebSocket-Version", version))
    headers.extend(extra)
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """One RFC 6455 §5.2 frame; clients mask, servers don't."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if len(payload) < 126:
        head.append(mask_bit | len(payload))
    elif len(payload) < 2**16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", len(payload))
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", len(payload))
    if not mask:
        return bytes(head) + payload
    key = secrets.token_bytes(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class RawWs:
    """A WebSocket client made by hand: exact frames on the wire, every frame seen on the way back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: RawResponse) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, port: int, path: str = "/ws", *, extra: Sequence[tuple[str, str]] = (), within: float = 5 * UNIT
    ) -> AsyncIterator[RawWs]:
        reader, writer = await open_raw(port)
        try:
            key = ws_key()
            writer.write(upgrade_request(path, host=f"{HOST}:{port}", key=key, extra=extra))
            await writer.drain()
            response = await read_response(reader, within=within)
            assert response.status == 101, f"expected 101, got {response.status} {response.body[:200]!r}"
            expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert response.get("Sec-WebSocket-Accept") == expected, "bad Sec-WebSocket-Accept"
            yield cls(reader, writer, response)
        finally:
            await close_raw(writer)

    async def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.writer.write(encode_frame(opcode, payload, fin=fin))
        await self.writer.drain()

    async def recv_frame(self, within: float = 5 * UNIT) -> Frame:
        async with asyncio.timeout(within):
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            key = await self.reader.readexactly(4) if head[1] & 0x80 else b""
            payload = await self.reader.readexactly(length)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return Frame(bool(head[0] & 0x80), head[0] & 0x0F, payload)

    async def recv_message(self, within: float = 5 * UNIT) -> tuple[int, bytes, list[Frame]]:
        """The next data message, reassembled; also returns the control frames seen meanwhile."""
        controls: list[Frame] = []
        opcode = None
        data = bytearray()
        while True:
            frame = await self.recv_frame(within)
            if frame.opcode >= 0x8:
                controls.append(frame)
                if frame.opcode == OP_CLOSE:
                    raise AssertionError(f"closed while waiting for a message: {frame}")
                continue
            if opcode is None:
                opcode = frame.opcode
            data += frame.payload
            if frame.fin:
                return opcode, bytes(data), controls


# ---------------------------------------------------------------------------------------------------
# misc


def source_ips(n: int, *, start: int = 2) -> list[str]:
    """n distinct loopback addresses (all of 127.0.0.0/8 reaches lo on Linux)."""
    return [f"127.0.{k // 250}.{k % 250 + 1}" for k in range(start - 1, start - 1 + n)]
