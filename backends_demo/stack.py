"""`make run` and `make demo`: the demo gateways and the balancer as one foreground stack.

`python -m backends_demo.stack --config config.example.yaml --env-file .dev/secrets.env [--demo]`

This module owns process orchestration for the developer experience: it loads
dev secrets into the environment (variables already set win), reads the config
YAML only to learn which gateways to start and where the balancer listens,
starts one `python -m backends_demo` per loopback backend and then
`python -m lb run --config FILE`, and waits for each to answer its health
endpoint.  Without `--demo` it stays in the foreground until Ctrl-C/SIGTERM or
until the balancer dies; with `--demo` it runs the reconnect proof
(`backends_demo.client`) over the plain and the TLS listener.  Every child is
stopped by PID (terminate, wait, kill) on every way out.

Validating the config is the balancer's job: a config the balancer rejects
makes it exit, and the stack exits with the balancer's code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import errno
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from backends_demo.client import (
    Attempt,
    ProofFailed,
    is_sticky,
    make_ssl_context,
    prove_stickiness,
    render_table,
)

GATEWAY_DEADLINE = 10.0  # seconds for every gateway to answer /health
BALANCER_DEADLINE = 15.0  # seconds for the balancer's /healthz and its backends to come up
STOP_GRACE = 5.0  # seconds between terminate() and kill()
HURRY_AFTER = 0.5  # seconds between a balancer's first SIGINT (stop) and its second (stop now)
POLL_INTERVAL = 0.1
DEMO_RECONNECTS = 8
DEMO_SOURCE_IPS = tuple(f"127.0.0.{i}" for i in range(2, 10))
DEMO_TIMEOUT = 10.0
STORY_HEADER = "X-User-Id"
STORY_USER = "player-42"

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StackError(Exception):
    """The stack cannot start; the message says why."""


# --- plan (pure) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and port to connect to (a wildcard bind becomes loopback)."""

    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    server_id: str
    host: str  # the address it binds
    port: int
    app_cookie: str | None

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "backends_demo", "--id", self.server_id]
        args += ["--port", str(self.port), "--host", self.host]
        if self.app_cookie is not None:
            args += ["--app-cookie", self.app_cookie]
        return args


@dataclass(frozen=True, slots=True)
class StackPlan:
    """What to start and where to look, read from the config."""

    gateways: tuple[GatewaySpec, ...]
    skipped: tuple[str, ...]  # backends not started here, with the reason
    admin: Endpoint
    plain_listener: Endpoint | None
    tls_listener: Endpoint | None
    tls_cafile: Path | None  # the dev CA beside the listener's certificate
    binds: tuple[tuple[str, int, str], ...] = ()  # (host, port, owner) the children will listen on


def read_env_file(text: str) -> dict[str, str]:
    """Parse `KEY=VALUE` lines; blank lines and `#` comments are skipped, surrounding quotes removed."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def apply_env(values: Mapping[str, str], environ: MutableMapping[str, str]) -> list[str]:
    """Set each variable that `environ` does not have yet; return the names set."""
    applied = [key for key in values if key not in environ]
    for key in applied:
        environ[key] = values[key]
    return applied


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:9001` or `[::1]:9001` → (host, port); raises ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_host(bind_host: str) -> str:
    """Where to connect to reach a socket bound to `bind_host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_host, bind_host)


def plan_stack(raw: Any, config_dir: Path, environ: Mapping[str, str]) -> StackPlan:
    """Read the parts of the config YAML the stack needs.

    Args:
        raw: the `yaml.safe_load` result.
        config_dir: the config file's directory, for relative certificate paths.
        environ: for `${NAME}` references in the values read.

    Raises:
        StackError: the config lacks what the stack needs (the balancer reports the rest).
    """

    def expand(value: object) -> str:
        return _ENV_REF.sub(lambda m: environ.get(m.group(1), m.group(0)), str(value))

    binds: list[tuple[str, int, str]] = []

    def endpoint(value: object, where: str) -> Endpoint:
        try:
            host, port = split_host_port(expand(value))
        except ValueError as exc:
            raise StackError(f"{where}: {exc}") from None
        binds.append((host, port, where))
        return Endpoint(connect_host(host), port)

    if not isinstance(raw, dict):
        raise StackError("config: expected a mapping at the top level")
    affinity = raw.get("affinity") or {}
    rewrite = isinstance(affinity, dict) and affinity.get("mode") == "rewrite"
    app_cookie = expand(affinity.get("cookie")) if rewrite and affinity.get("cookie") else None

    gateways: list[GatewaySpec] = []
    skipped: list[str] = []
    pools = raw.get("pools") or {}
    if not isinstance(pools, dict):
        raise StackError("pools: expected a mapping of pool names")
    for pool_name, pool in pools.items():
        backends = pool.get("backends") if isinstance(pool, dict) else None
        for index, backend in enumerate(backends or []):
            where = f"pools.{pool_name}.backends[{index}]"
            if not isinstance(backend, dict) or "id" not in backend or "address" not in backend:
                raise StackError(f"{where}: expected {{id, address}}")
            server_id = expand(backend["id"])
            try:
                host, port = split_host_port(expand(backend["address"]))
            except ValueError as exc:
                raise StackError(f"{where}.address: {exc}") from None
            if not is_loopback(host):
                skipped.append(f"{server_id} at {host}:{port} (not a loopback address)")
            elif any(g.port == port and g.host == host for g in gateways):
                skipped.append(f"{server_id} at {host}:{port} (already started for another backend)")
            else:
                gateways.append(GatewaySpec(server_id, host, port, app_cookie))
                binds.append((host, port, f"gateway {server_id}"))

    admin_raw = raw.get("admin") or {}
    admin = endpoint(admin_raw.get("bind", "127.0.0.1:9000"), "admin.bind")

    plain: Endpoint | None = None
    tls: Endpoint | None = None
    cafile: Path | None = None
    for index, listener in enumerate(raw.get("listeners") or []):
        if not isinstance(listener, dict) or "bind" not in listener:
            raise StackError(f"listeners[{index}]: expected {{bind, tls?}}")
        where = f"listeners[{index}].bind"
        if listener.get("tls"):
            if tls is None:
                tls = endpoint(listener["bind"], where)
                cert = listener["tls"].get("cert") if isinstance(listener["tls"], dict) else None
                if cert:
                    # `lb certs --out DIR` writes ca.crt beside server.crt.
                    cafile = _resolve(Path(expand(cert)).parent / "ca.crt", config_dir)
        elif plain is None:
            plain = endpoint(listener["bind"], where)
    if plain is None and tls is None:
        raise StackError("listeners: no listener to start")
    return StackPlan(tuple(gateways), tuple(skipped), admin, plain, tls, cafile, tuple(binds))


def _resolve(path: Path, config_dir: Path) -> Path:
    """A relative path is tried against the config's directory, then the working directory."""
    if path.is_absolute():
        return path
    beside_config = config_dir / path
    return beside_config if beside_config.exists() else path


def ws_pool(raw: Mapping[str, Any], path: str = "/ws") -> str | None:
    """The pool the longest matching route prefix sends `path` to (as the balancer routes)."""
    best: tuple[int, str] | None = None
    for route in raw.get("routes") or []:
        if not isinstance(route, dict):
            continue
        prefix, pool = str(route.get("path_prefix", "")), route.get("pool")
        if pool is not None and path.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), str(pool))
    return best[1] if best else None


def story_config(raw: Mapping[str, Any], *, balance: str, listen_port: int, admin_port: int) -> dict[str, Any]:
    """A copy of the config for one story balancer: one plain loopback listener, every pool hashed.

    `sticky: false`, so the hash alone routes: run 1 shows what a layer-4 balancer does,
    run 3 that a computed user→gateway answer needs no table.
    """
    config: dict[str, Any] = copy.deepcopy(dict(raw))
    config["listeners"] = [{"bind": f"127.0.0.1:{listen_port}"}]
    config["admin"] = {**(config.get("admin") or {}), "bind": f"127.0.0.1:{admin_port}"}
    config.pop("workers", None)
    for pool in (config.get("pools") or {}).values():
        if isinstance(pool, dict):
            pool["balance"] = balance
            pool["sticky"] = False
            pool.pop("hash_key", None)
            if balance == "hash":
                pool["hash_key"] = f"header:{STORY_HEADER}"
    return config


@dataclass(frozen=True, slots=True)
class StoryBalancer:
    """An extra balancer the demo starts: where to connect and where to ask /route."""

    name: str
    config_path: Path
    url: str
    admin: Endpoint


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_story_configs(raw: Mapping[str, Any], directory: Path) -> list[StoryBalancer]:
    """The source balancer and the two hash instances, their configs written to `directory`."""
    stories = []
    for name, balance in (("source", "source"), ("hash-a", "hash"), ("hash-b", "hash")):
        listen, admin = _free_port(), _free_port()
        path = directory / f"demo-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config = story_config(raw, balance=balance, listen_port=listen, admin_port=admin)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        stories.append(StoryBalancer(name, path, f"ws://127.0.0.1:{listen}/ws", Endpoint("127.0.0.1", admin)))
    return stories


# --- processes ----------------------------------------------------------------


def check_ports_free(binds: Sequence[tuple[str, int, str]]) -> None:
    """Fail early if a port the stack needs is taken (a stale stack would answer our health checks).

    Raises:
        StackError: naming the first port in use.
    """
    for host, port, owner in binds:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            continue  # an unresolvable host is the child's error to report
        family, type_, proto, _, address = infos[0]
        with socket.socket(family, type_, proto) as probe:
            # SO_REUSEADDR: a port in TIME_WAIT is free for the child (aiohttp sets it too).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StackError(
                        f"{owner}: {host}:{port} is already in use (is another `make run` still running?)"
                    ) from None


class _Stop(Exception):
    """SIGTERM arrived: leave the foreground loop and stop the children."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let the children be stopped to the end even if Ctrl-C is pressed again."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Children:
    """The processes the stack started, stopped by PID: the balancers first, then the gateways."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes], bool]] = []  # (name, process, is a balancer)

    def start(
        self, name: str, argv: Sequence[str], log_file: Path | None = None, *, balancer: bool = False
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        output = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            output = log_file.open("wb")
        # A session of its own: Ctrl-C reaches only the stack, which then stops
        # the balancer before the gateways (tunnels close in order, no tracebacks).
        try:
            proc = subprocess.Popen(list(argv), env=env, start_new_session=True, stdout=output, stderr=output)
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor
        self._procs.append((name, proc, balancer))
        return proc

    def exited(self) -> list[tuple[str, int]]:
        return [(name, code) for name, proc, _ in self._procs if (code := proc.poll()) is not None]

    def stop(self) -> None:
        """Stop every child, the balancers first; kill what is left after STOP_GRACE. Idempotent.

        A balancer gets Ctrl-C twice, as at a terminal (`lb run` in a session of its own does not see
        ours): the first stops it, the second makes its live tunnels get their 1001 now rather than
        spread over `shutdown_grace` (10 s in the example, past STOP_GRACE: a SIGTERM alone got them
        killed before their 1001, and the players saw 1006).  The gateways get SIGTERM.
        """
        with _signals_ignored():
            balancers = [(name, proc) for name, proc, balancer in self._procs if balancer]
            gateways = [(name, proc) for name, proc, balancer in self._procs if not balancer]
            for group, sig in ((balancers, signal.SIGINT), (gateways, signal.SIGTERM)):
                for _, proc in group:
                    if proc.poll() is None:
                        proc.send_signal(sig)
                deadline = time.monotonic() + STOP_GRACE
                if sig == signal.SIGINT and group:
                    _wait_all(group, time.monotonic() + HURRY_AFTER)
                    for _, proc in group:
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGINT)  # the second Ctrl-C: stop now
                _wait_all(group, deadline)
                for name, proc in group:
                    if proc.poll() is None:
                        print(f"stack: {name} (pid {proc.pid}) did not stop in {STOP_GRACE:g}s; killing it")
                        proc.kill()
                        proc.wait()
            self._procs.clear()


def _wait_all(procs: Sequence[tuple[str, subprocess.Popen[bytes]]], deadline: float) -> None:
    """Wait until every process has exited or `deadline` (monotonic) has passed."""
    for _, proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route loopback via a proxy


def _http_get(url: str, timeout: float = 0.5) -> tuple[int, bytes] | None:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return None


def wait_until_healthy(
    name: str, proc: subprocess.Popen[bytes], url: str, deadline: float, expect_up: Sequence[str] = ()
) -> None:
    """Poll `url` until it answers 200 (and `/status` shows `expect_up` backends up, if any)."""
    status_url = url.rsplit("/", 1)[0] + "/status"
    healthy = False
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            raise StackError(f"{name} exited with code {code} before it was ready")
        if not healthy:
            answer = _http_get(url)
            healthy = answer is not None and answer[0] == 200
        if healthy and (not expect_up or _backends_up(_http_get(status_url), expect_up)):
            return
        time.sleep(POLL_INTERVAL)
    what = f"{url} answering 200" if not healthy else f"backends {', '.join(expect_up)} up in {status_url}"
    raise StackError(f"{name} not ready: no {what} within the deadline")


def _backends_up(answer: tuple[int, bytes] | None, expected: Sequence[str]) -> bool:
    """True once /status lists every expected backend as up; also when /status cannot tell us."""
    if answer is None or answer[0] >= 500:
        return False  # not serving yet: keep polling
    if answer[0] != 200:
        return True  # no /status, or it wants a token: /healthz is all we can check
    try:
        pools = json.loads(answer[1])["pools"]
        states = {b["id"]: b["state"] for pool in pools.values() for b in pool["backends"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return all(states.get(server_id, "up") == "up" for server_id in expected)


# --- the stack ----------------------------------------------------------------


DEMO_LOG = Path(".dev/demo-balancer.log")


def run_stack(config: Path, plan: StackPlan, demo: bool, raw: Mapping[str, Any] | None = None) -> int:
    """Start the gateways and the balancer, then serve in the foreground or run the demo.

    Returns:
        The process exit status; the children are stopped on every way out.
    """
    children = Children()
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        check_ports_free(plan.binds)
        deadline = time.monotonic() + GATEWAY_DEADLINE
        started = [
            (gateway, children.start(f"gateway {gateway.server_id}", gateway.argv()))
            for gateway in plan.gateways
        ]
        for gateway, proc in started:
            health = f"http://{Endpoint(connect_host(gateway.host), gateway.port).authority}/health"
            wait_until_healthy(f"gateway {gateway.server_id}", proc, health, deadline)

        # The demo's table should not drown in the balancer's access log: that goes to a file.
        log_file = DEMO_LOG if demo else None
        balancer = children.start(
            "balancer", [sys.executable, "-m", "lb", "run", "--config", str(config)], log_file=log_file,
            balancer=True,
        )
        if log_file is not None:
            print(f"stack: balancer log in {log_file}")
        try:
            wait_until_healthy(
                "balancer",
                balancer,
                f"http://{plan.admin.authority}/healthz",
                time.monotonic() + BALANCER_DEADLINE,
                expect_up=[g.server_id for g in plan.gateways],
            )
        except StackError:
            if (code := balancer.poll()) is not None:
                print(f"stack: the balancer exited with code {code}; stopping", file=sys.stderr)
                return _exit_status(code)
            raise

        print(_describe(plan), flush=True)
        if demo:
            stories = write_story_configs(raw or {}, DEMO_LOG.parent)
            procs = [
                children.start(
                    f"balancer {story.name}",
                    [sys.executable, "-m", "lb", "run", "--config", str(story.config_path)],
                    log_file=DEMO_LOG.parent / f"demo-{story.name}.log",
                    balancer=True,
                )
                for story in stories
            ]
            deadline = time.monotonic() + BALANCER_DEADLINE
            for story, proc in zip(stories, procs, strict=True):
                wait_until_healthy(
                    f"balancer {story.name}", proc, f"http://{story.admin.authority}/healthz", deadline,
                    expect_up=[g.server_id for g in plan.gateways],
                )
            sticky = _run_demo(plan, stories, ws_pool(raw or {}) or "")
            for name, code in children.exited():
                print(f"stack: {name} exited with code {code} during the demo", file=sys.stderr)
            return 0 if sticky else 1
        return _foreground(balancer, children)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("\nstack: interrupted; stopping", file=sys.stderr, flush=True)
        return 130
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, previous)


def _describe(plan: StackPlan) -> str:
    lines = [f"gateway {g.server_id:<10} http://{Endpoint(g.host, g.port).authority}" for g in plan.gateways]
    lines += [f"not started: {note}" for note in plan.skipped]
    if plan.plain_listener:
        lines.append(f"balancer           ws://{plan.plain_listener.authority}/ws")
    if plan.tls_listener:
        lines.append(f"balancer (TLS)     wss://{plan.tls_listener.authority}/ws")
    lines.append(f"admin              http://{plan.admin.authority}/status")
    return "\n".join(lines)


def _foreground(balancer: subprocess.Popen[bytes], children: Children) -> int:
    """Wait for Ctrl-C/SIGTERM (exit 0) or the balancer's death (exit with its code)."""
    print("stack: running; Ctrl-C stops everything", flush=True)
    reported: set[str] = set()
    try:
        while (code := balancer.poll()) is None:
            for name, exit_code in children.exited():
                if name not in reported:
                    reported.add(name)
                    print(f"stack: {name} exited with code {exit_code}", file=sys.stderr, flush=True)
            time.sleep(0.2)
    except (KeyboardInterrupt, _Stop):
        print("\nstack: stopping", flush=True)
        return 0
    print(f"stack: the balancer exited with code {code}; stopping the gateways", file=sys.stderr)
    return _exit_status(code)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N → 128+N, as a shell reports it


def _run_demo(plan: StackPlan, stories: Sequence[StoryBalancer], pool: str) -> bool:
    """The three runs; True only if run 1 moved, run 2 stuck (ws and wss), run 3 stuck and agreed."""
    by_name = {story.name: story for story in stories}
    moved = _run_source(by_name["source"])
    stuck = _run_cookie(plan)
    agreed = _run_hash(by_name["hash-a"], by_name["hash-b"], pool)
    print("\ndemo summary:")
    source = "moved (expected: the layer-4 failure)" if moved else "DID NOT MOVE"
    print(f"  1. source-IP hashing, IP changes:     {source}")
    print(f"  2. affinity cookie, IP changes:       {'stuck' if stuck else 'NOT every reconnect stuck'}")
    print(f"  3. hash of the user id, /route:       {'stuck and agreed' if agreed else 'DID NOT hold'}")
    ok = moved and stuck and agreed
    print("demo: " + ("the contrast is as expected" if ok else "the contrast is NOT as expected"), flush=True)
    return ok


def _attempts(
    url: str, *, first_number: int = 0, reconnects: int = DEMO_RECONNECTS, **kwargs: Any
) -> list[Attempt]:
    """One reconnect run without TLS; on failure the attempts so far are shown and [] returned."""
    try:
        return asyncio.run(
            prove_stickiness(
                url, reconnects, DEMO_SOURCE_IPS, None, DEMO_TIMEOUT, first_number=first_number, **kwargs
            )
        )
    except ProofFailed as exc:
        if exc.attempts:
            print(render_table(exc.attempts, include_verdict=False))
        print(f"FAILED: {exc}", flush=True)
        return []


def _run_source(story: StoryBalancer) -> bool:
    """Run 1: no cookie, balance: source; the client is expected to move as its IP changes."""
    print(
        f"\n1. before: a layer-4 balancer (balance: source, no cookie) at {story.url}\n"
        f"   the same client reconnects {DEMO_RECONNECTS} times, its IP changing each time (Wi-Fi, 4G, ...)"
    )
    attempts = _attempts(story.url, keep_cookies=False)
    if not attempts:
        return False
    print(render_table(attempts), flush=True)
    moved = not is_sticky(attempts)
    print(
        "   as expected: source-IP persistence sent the reconnects to other gateways; the session is lost"
        if moved
        else "   UNEXPECTED: every reconnect stayed on one gateway, so the contrast is not shown",
        flush=True,
    )
    return moved


def _run_hash(first: StoryBalancer, second: StoryBalancer, pool: str) -> bool:
    """Run 3: one user id through two instances from changing IPs, then both instances' /route."""
    print(
        f"\n3. user → gateway without a table: balance: hash on {STORY_HEADER}, two instances,"
        f" no cookie\n   {STORY_HEADER}: {STORY_USER} from changing IPs through {first.url} then {second.url}"
    )
    half = DEMO_RECONNECTS // 2
    headers = {STORY_HEADER: STORY_USER}
    attempts = _attempts(first.url, reconnects=half, keep_cookies=False, headers=headers)
    if attempts:
        attempts += _attempts(
            second.url, reconnects=half, first_number=len(attempts), keep_cookies=False, headers=headers
        )
    if not attempts:
        return False
    print(render_table(attempts), flush=True)
    answers = []
    for story in (first, second):
        url = f"http://{story.admin.authority}/pools/{pool}/route?key={STORY_USER}"
        answer = _http_get(url, timeout=2.0)
        try:
            backend = json.loads(answer[1])["backend"] if answer and answer[0] == 200 else None
        except (ValueError, KeyError, TypeError):
            backend = None
        answers.append(backend)
        print(f"   GET {url} -> {backend or 'no answer'}")
    agreed = is_sticky(attempts) and answers == [attempts[0].server_id] * 2
    print(
        f"   {'agreed' if agreed else 'DID NOT agree'}: both instances compute the same gateway for {STORY_USER},"
        " with no user→gateway table to keep in sync",
        flush=True,
    )
    return agreed


def _run_cookie(plan: StackPlan) -> bool:
    print("\n2. after: the affinity cookie, same reconnects, over ws and wss")
    runs: list[tuple[str, str | None]] = []
    if plan.plain_listener:
        runs.append((f"ws://{plan.plain_listener.authority}/ws", None))
    if plan.tls_listener:
        runs.append(
            (f"wss://{plan.tls_listener.authority}/ws", str(plan.tls_cafile) if plan.tls_cafile else None)
        )
    all_sticky = True
    for url, cafile in runs:
        print(f"\nreconnect proof: {url}, {DEMO_RECONNECTS} reconnects over {', '.join(DEMO_SOURCE_IPS)}")
        try:
            attempts = asyncio.run(
                prove_stickiness(
                    url, DEMO_RECONNECTS, DEMO_SOURCE_IPS, make_ssl_context(cafile), DEMO_TIMEOUT
                )
            )
        except ProofFailed as exc:
            if exc.attempts:
                print(render_table(exc.attempts, include_verdict=False))
            print(f"FAILED: {exc}", flush=True)
            all_sticky = False
            continue
        except (OSError, ValueError) as exc:  # the CA file cannot be read
            print(f"FAILED: cannot set up TLS with {cafile}: {exc}", flush=True)
            all_sticky = False
            continue
        print(render_table(attempts), flush=True)
        all_sticky = all_sticky and is_sticky(attempts)
    return all_sticky


# --- command line -------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m backends_demo.stack", description="Run the demo gateways and the balancer."
    )
    parser.add_argument("--config", required=True, type=Path, help="balancer config YAML")
    parser.add_argument("--env-file", type=Path, default=None, help="KEY=VALUE lines; the environment wins")
    parser.add_argument("--demo", action="store_true", help="run the reconnect proof, then stop")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.env_file is not None:
            apply_env(read_env_file(args.env_file.read_text()), os.environ)
        raw = yaml.safe_load(args.config.read_text())
        plan = plan_stack(raw, args.config.resolve().parent, os.environ)
    except OSError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"stack: {args.config}: not valid YAML: {exc}", file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"stack: {args.config}: {exc}", file=sys.stderr)
        return 2
    return run_stack(args.config, plan, args.demo, raw)


if __name__ == "__main__":
    raise SystemExit(main())
