"""Product processes on loopback: demo gateways, balancers, and the configurations they run.

- `Gateway`: `python -m backends_demo --id gw-N --port P`, ready once `/health` answers;
- `Balancer`: `python -m lb run --config F`, ready once `/healthz` answers (against a deadline);
  `wait_logged` for a line in its log;
- `poll_while_running`: a check polled against a deadline while a process runs (it answers, it listens,
  it catches a signal), failing at once if the process exits;
- `Launcher`: starts them on free ports (`bench.procs.free_port`: below the kernel's ephemeral range,
  else from `bind(("127.0.0.1", 0))`) and stops every one by PID at the end (`terminate()`,
  `wait(timeout)`, then `kill()`);
- `lb_config`: a configuration document over given pools and routes; `run_lb`/`run_ctl`: one command;
- `Stack`: the shared stack (3 gateways, a spy and dead backends behind one balancer).

Process fixtures are synchronous on purpose: a process outlives any event loop, so module- and
session-scoped stacks need no shared loop and every test keeps its own (pytest-asyncio's default).
`LB_TEST_EVENT_LOOP=asyncio` sets `runtime.event_loop` in every generated config (default: the product's).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import yaml

from bench.procs import free_port
from tests.harness import BALANCER_READY, COOKIE, GATEWAY_READY, HOST, ROOT, STOP_WAIT, UNIT
from tests.harness.spy import SpyBackend

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


def connects(port: int, *, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on 127.0.0.1:`port`; raises OSError when nothing does
    (`poll_while_running` takes that for a no)."""
    socket.create_connection((HOST, port), timeout=timeout).close()
    return True


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


def backend_states(status_json: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(pool, id) → state, as `lb ctl status` shows it: `removed` for one gone from its pool, whose tunnels
    still run (/status: state `disabled`, `removed: true`)."""
    return {
        (pool, backend["id"]): "removed" if backend["removed"] else backend["state"]
        for pool, body in status_json["pools"].items()
        for backend in body["backends"]
    }


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


def poll_while_running(
    proc: subprocess.Popen[Any] | None, check: Callable[[], bool], *, within: float, who: str, what: str,
    tail: Callable[[], str], every: float = 0.05,
) -> None:
    """Poll `check()` every `every` seconds (an OSError is a no) until it says yes: a process starting
    (it answers, it listens, it catches a signal).  Fail, with `tail()`, as soon as `proc` exits, or
    saying `what` once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        assert proc is not None
        if proc.poll() is not None:
            pytest.fail(f"{who} exited with {proc.returncode}:\n{tail()}")
        with contextlib.suppress(OSError):
            if check():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{who}: {what} within {within}s:\n{tail()}")
        time.sleep(every)


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
        poll_while_running(
            self.proc, lambda: http_get(f"{self.url}/health", timeout=0.5)[0] == 200, within=timeout,
            who=f"gateway {self.id}", what="not healthy", tail=lambda: log_tail(self.log_path),
        )

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
        poll_while_running(
            self.proc, lambda: http_get(self.admin_url("/healthz"), timeout=0.5)[0] == 200, within=timeout,
            who=f"balancer {self.name}", what="/healthz not 200", tail=self.logs_tail,
        )

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

    def wait_logged(self, logged: Callable[[str], bool], *, within: float, what: str) -> None:
        """Until `logged(the log's text)` says yes, every 50 ms; fail, saying `what` with the log's tail, once
        `within` seconds have passed (at once if the balancer exits).  For blocking tests: the async ones
        have `tests.harness.ops.wait_for_log`."""
        poll_while_running(
            self.proc, lambda: logged(self.log_text()), within=within, who=f"balancer {self.name}", what=what,
            tail=self.logs_tail,
        )

    def logs_tail(self, lines: int = 40) -> str:
        return f"--- stdout\n{log_tail(self.out_path, lines)}\n--- stderr\n{log_tail(self.err_path, lines)}"


_P = TypeVar("_P", Gateway, Balancer)


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
        return self._start(started, self._gateways)

    def spy(self, server_id: str = "spy-1") -> SpyBackend:
        spy = SpyBackend(server_id)
        self._spies.append(spy)
        return spy

    def balancers(self, *configs: dict[str, Any], names: Sequence[str] | None = None) -> list[Balancer]:
        """Start balancers at once, then wait for each one's /healthz."""
        names = list(names or [f"lb{len(self._balancers) + i}" for i in range(len(configs))])
        started = [Balancer(config, self.workdir, name) for config, name in zip(configs, names, strict=True)]
        return self._start(started, self._balancers)

    @staticmethod
    def _start(started: list[_P], kept: list[_P]) -> list[_P]:
        """Launch them all (they start side by side), then wait for each; kept to be stopped with the rest."""
        kept.extend(started)
        for process in started:
            process.launch()
        for process in started:
            process.wait_ready()
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


# ---------------------------------------------------------------------------------------------------
# the shared stack: 3 gateways + a spy + a balancer, for every test that leaves it as it found it


@dataclass
class Stack:
    """What the session-scoped `stack` fixture started; tests that use it leave it as they found it."""

    balancer: Balancer
    gateways: list[Gateway]
    spy: SpyBackend
    dead: list[DeadBackend]

    @property
    def ids(self) -> set[str]:
        return {g.id for g in self.gateways}


SHARED_ROUTES = {"/ws": "gateways", "/whoami": "gateways", "/dead": "dead", "/spy": "spy"}
SHARED_HANDSHAKE = 1.0  # seconds: timeouts.handshake of the shared balancer
