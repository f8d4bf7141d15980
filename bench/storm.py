"""The reconnect storm, the paced drain and the large idle population: `python -m bench.storm [--quick]`.

`make bench` runs it after the main table (`python -m bench` calls `main`).

**Storm.** N clients (5,000, or as many as RLIMIT_NOFILE allows) hold
WebSocket tunnels over 3 echo gateways from 127.x source addresses.  One
gateway is SIGKILLed; every client that was on it reconnects at once with its
cookie.  Side by side: the balancer, HAProxy (`cookie insert`, `option
redispatch`, `retries 3`) and `direct` (clients that already know the
survivors).  Reported: time from the kill until the last client is back (its
hello from a survivor), p50/p99 per-client reconnect time (loss seen → hello),
failed attempts (refused, 5xx, reset, timeout; each retried after
RETRY_DELAY), listen-queue overflows (`ListenOverflows` delta from
/proc/net/netstat: machine-wide, so other load on the machine shows too) and
proxy CPU seconds.

**Paced drain.** The same population through the balancer; `POST
/pools/gateways/backends/gw-1/drain?close_after=0s&rate=R` closes gw-1's
tunnels with 1012 at R per second (R = 100, then 400); the reconnects per
second follow R.

**Idle population.** As many tunnels as the limits allow (up to 50,000):
RSS per tunnel, and the handshake latency of new clients while they are held
(against the same latency with nothing held).

The fleet (`Fleet`) is also what the integration suite's small storm uses.
Every wait has a deadline; every child is stopped by PID in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import procs
from bench.haproxy import find_haproxy, render_config
from bench.procs import HOST, BenchError, Child
from bench.wire import HEAD_END, OP_CLOSE, client_request, first_frame, set_cookies, status_code

RETRY_DELAY = 0.05  # seconds a client waits after a failed attempt (a real client backs off more)
ATTEMPT_TIMEOUT = 10.0  # one connect + upgrade + hello; covers SYN retransmits after an overflow (1 s, 3 s)
OPEN_CONCURRENCY = 200  # handshakes in flight while the population is built (not during the storm)
STORM_DEADLINE = 60.0
READY_TIMEOUT = 20.0
MAX_IDLE = 50_000
LATENCY_SAMPLES = 200
DRAIN_RATES = (100.0, 400.0)  # two paces: the reconnects per second should follow each
DIRECT, BALANCER, HAPROXY = "direct", "balancer", "haproxy"


# -- pure parts -------------------------------------------------------------------------------------


def source_ip(index: int, spread: int = 200) -> str:
    """The loopback address client `index` binds: `spread` addresses from 127.0.1.1, in turn."""
    k = index % spread
    return f"127.0.{1 + k // 250}.{k % 250 + 1}"


def listen_overflows(netstat: str) -> int:
    """TcpExt ListenOverflows from the text of /proc/net/netstat (0 when absent)."""
    lines = netstat.splitlines()
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def read_overflows() -> int:
    try:
        return listen_overflows(Path("/proc/net/netstat").read_text())
    except OSError:
        return 0


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def per_second(times: Sequence[float], start: float) -> list[int]:
    """How many of `times` fall in each whole second after `start`."""
    counts = Counter(int(t - start) for t in times if t >= start)
    return [counts.get(second, 0) for second in range(max(counts, default=-1) + 1)]


def haproxy_storm_config(listen: tuple[str, int], backends: Sequence[tuple[str, str, int]], maxconn: int) -> str:
    """HAProxy as an operator would set it up for sticky WebSockets that survive a gateway loss."""
    return render_config(
        listen, backends, maxconn, redispatch=True, idle_timeout="1h", backlog=4096, name="storm"
    )


# -- the fleet --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Client:
    """One player: where it is, its cookies, and what its reconnects cost."""

    index: int
    source_ip: str
    cookies: dict[str, str] = field(default_factory=dict)
    server_id: str | None = None
    connected: bool = False
    lost_at: float | None = None
    established_at: float | None = None
    reconnect_times: list[float] = field(default_factory=list)
    failures: int = 0
    reconnects: int = 0
    writer: asyncio.StreamWriter | None = None


class Fleet:
    """N clients that connect, hold their tunnel, and reconnect at once (with their cookies) when it ends."""

    def __init__(
        self,
        count: int,
        address: Callable[[Client], tuple[str, int]],
        *,
        spread: int = 200,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        self.clients = [Client(i, source_ip(i, spread)) for i in range(count)]
        self.address = address
        self.retry_delay = retry_delay
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._opening: asyncio.Semaphore | None = None

    async def open(self, within: float) -> None:
        """Connect every client (OPEN_CONCURRENCY at a time); BenchError if they are not all up in time."""
        self._opening = asyncio.Semaphore(OPEN_CONCURRENCY)
        self._tasks = [asyncio.create_task(self._life(client)) for client in self.clients]
        deadline = time.monotonic() + within
        while not all(c.connected for c in self.clients):
            if time.monotonic() > deadline:
                up = sum(c.connected for c in self.clients)
                raise BenchError(f"only {up} of {len(self.clients)} clients connected within {within:g} s")
            await asyncio.sleep(0.05)
        self._opening = None  # from here on reconnects go at once: the herd

    def on(self, server_id: str) -> list[Client]:
        return [c for c in self.clients if c.server_id == server_id]

    async def wait_back(self, clients: Sequence[Client], since: float, avoid: str | None, within: float) -> bool:
        """Until every client in `clients` holds a tunnel opened after `since` (not to `avoid`)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(_back(c, since, avoid) for c in clients):
                return True
            await asyncio.sleep(0.01)
        return False

    async def close(self) -> None:
        self._closing = True
        for client in self.clients:
            if client.writer is not None:
                client.writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _life(self, client: Client) -> None:
        first = True
        while not self._closing:
            gate = self._opening if first else None
            try:
                if gate is not None:
                    async with gate:
                        reader = await self._connect(client)
                else:
                    reader = await self._connect(client)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                client.failures += 1
                await asyncio.sleep(self.retry_delay)
                continue
            now = time.monotonic()
            if not first and client.lost_at is not None:
                client.reconnect_times.append(now - client.lost_at)
                client.reconnects += 1
            first = False
            client.established_at = now
            client.connected = True
            await _hold(reader)
            client.connected = False
            client.lost_at = time.monotonic()
            if client.writer is not None:
                client.writer.close()
                client.writer = None

    async def _connect(self, client: Client) -> asyncio.StreamReader:
        host, port = self.address(client)
        async with asyncio.timeout(ATTEMPT_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(client.source_ip, 0))
            try:
                cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items()) or None
                writer.write(client_request(f"{host}:{port}", "/ws", cookie))
                head = await reader.readuntil(HEAD_END)
                if status_code(head) != 101:
                    raise ValueError(f"status {status_code(head)}")
                for pair in set_cookies(head):
                    name, _, value = pair.partition("=")
                    client.cookies[name] = value
                buffer = b""
                while (frame := first_frame(buffer)) is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ValueError("closed before the hello")
                    buffer += chunk
                client.server_id = str(json.loads(frame[1])["server_id"])
            except BaseException:
                writer.close()
                raise
        client.writer = writer
        return reader


async def _hold(reader: asyncio.StreamReader) -> None:
    """Until the tunnel ends: EOF, a reset, or a close frame (1012 on backend loss or migration)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(4096):
            if data[0] & 0x0F == OP_CLOSE:
                return


def _back(client: Client, since: float, avoid: str | None) -> bool:
    return (
        client.connected and client.established_at is not None and client.established_at > since
        and client.server_id != avoid
    )


# -- processes --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    """Three echo gateways and, unless direct, the proxy in front of them."""

    kind: str
    log_dir: Path
    gateways: list[Child] = field(default_factory=list)
    addresses: list[tuple[str, str, int]] = field(default_factory=list)  # (id, host, port)
    proxy: Child | None = None
    listen: tuple[str, int] | None = None
    admin_port: int | None = None
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    backlog: int | None = None  # listeners[].backlog; None: the balancer's default

    def start(self, pinning: procs.Pinning) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        ids = [f"gw-{i}" for i in range(1, 4)]
        for sid in ids:
            child = procs.start(
                f"{self.kind}-{sid}", procs.python_module("bench.echo_server", "--port", "0", "--id", sid),
                self.log_dir, cpus=pinning.load, stdout_pipe=True,
            )
            self.gateways.append(child)
        for sid, child in zip(ids, self.gateways, strict=True):
            self.addresses.append((sid, *procs.read_address(child, deadline)))
        if self.kind == BALANCER:
            self._start_balancer(pinning)
        elif self.kind == HAPROXY:
            self._start_haproxy(pinning)

    def _start_balancer(self, pinning: procs.Pinning) -> None:
        port, self.admin_port = procs.free_port(), procs.free_port()
        config = {
            "listeners": [{"bind": f"{HOST}:{port}", **({"backlog": self.backlog} if self.backlog else {})}],
            "admin": {"bind": f"{HOST}:{self.admin_port}", "token": self.admin_token},
            "affinity": {"mode": "insert", "cookie": "LB_AFFINITY", "secret_keys": [secrets.token_urlsafe(32)]},
            "routes": [{"path_prefix": "/", "pool": "gateways"}],
            "pools": {"gateways": {
                "balance": "least_conn",
                "health_check": {"type": "http", "path": "/health", "interval": "1s", "timeout": "500ms",
                                 "rise": 2, "fall": 2},
                "backends": [{"id": sid, "address": f"{host}:{p}"} for sid, host, p in self.addresses],
            }},
            "limits": {"handshake_rate_per_ip": 0, "max_connections": 200_000},
            "logging": {"level": "WARNING", "access_log": False},
        }
        path = self.log_dir / f"{self.kind}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proxy = procs.start(
            self.kind, procs.python_module("lb", "run", "--config", str(path)), self.log_dir, cpus=pinning.proxy
        )
        self.listen = (HOST, port)
        self._wait_ready()

    def _start_haproxy(self, pinning: procs.Pinning) -> None:
        path = find_haproxy()
        if path is None:
            raise BenchError("haproxy not found")
        port = procs.free_port()
        maxconn = max(1000, min(60_000, (procs.raise_nofile() - 200) // 2))
        cfg = self.log_dir / "haproxy-storm.cfg"
        cfg.write_text(haproxy_storm_config((HOST, port), self.addresses, maxconn))
        self.proxy = procs.start(self.kind, [path, "-db", "-f", str(cfg)], self.log_dir, cpus=pinning.proxy)
        self.listen = (HOST, port)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from bench.runner import probe  # the runner's blocking handshake probe

        assert self.proxy is not None and self.listen is not None
        deadline = time.monotonic() + READY_TIMEOUT
        seen: set[str] = set()
        last = "no attempt yet"
        # Ready when handshakes reach every gateway (health checks have passed for all three).
        while time.monotonic() < deadline:
            if not self.proxy.alive():
                raise BenchError(f"{self.proxy.name} exited\n{self.proxy.log_tail()}")
            try:
                status, hello, _ = probe(self.listen)
                if status == 101:
                    seen.add(json.loads(hello)["server_id"])
                    if len(seen) == len(self.addresses):
                        return
                last = f"status {status}, reached {sorted(seen)}"
            except (OSError, ValueError, KeyError) as exc:
                last = str(exc)
            time.sleep(0.02)
        raise BenchError(f"{self.proxy.name} not ready within {READY_TIMEOUT:g} s ({last})\n{self.proxy.log_tail()}")

    def address_for(self, survivors: list[tuple[str, int]]) -> Callable[[Client], tuple[str, int]]:
        """Where each client connects: the proxy, or (direct) one of `survivors`, chosen by index."""
        if self.listen is not None:
            listen = self.listen
            return lambda _client: listen
        return lambda client: survivors[client.index % len(survivors)]

    def proxy_pids(self) -> list[int]:
        return self.proxy.pids() if self.proxy is not None else []

    def gateway(self, server_id: str) -> Child:
        return next(child for child, (sid, _, _) in zip(self.gateways, self.addresses, strict=True) if sid == server_id)

    def stop(self) -> None:
        for child in ([self.proxy] if self.proxy else []) + self.gateways:
            procs.stop(child)


def _admin_post(port: int, path: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5.0) as reply:
        answer: dict[str, Any] = json.load(reply)
        return answer


# -- scenarios --------------------------------------------------------------------------------------


async def storm(
    kind: str, clients: int, log_dir: Path, pinning: procs.Pinning, backlog: int | None = None
) -> dict[str, Any]:
    """One storm against one target; the result's keys are the table's rows."""
    stack = Stack(kind, log_dir, backlog=backlog)
    try:
        stack.start(pinning)
        everyone = [(host, port) for _, host, port in stack.addresses]
        survivors = list(everyone)
        fleet = Fleet(clients, stack.address_for(survivors))
        try:
            await fleet.open(within=120.0)
            victim = "gw-1"
            on_victim = fleet.on(victim)
            # direct: the survivors are known before the kill (the ideal client).
            survivors[:] = [(h, p) for sid, h, p in stack.addresses if sid != victim]
            others_lost = {c.index for c in fleet.clients if c.server_id != victim}
            overflows, cpu = read_overflows(), procs.cpu_seconds(stack.proxy_pids())
            killed_at = time.monotonic()
            os.kill(stack.gateway(victim).pid, signal.SIGKILL)
            back = await fleet.wait_back(on_victim, killed_at, victim, STORM_DEADLINE)
            last = max((c.established_at or killed_at) for c in on_victim) - killed_at if back else None
            cpu = procs.cpu_seconds(stack.proxy_pids()) - cpu
            overflows = read_overflows() - overflows
            times = [c.reconnect_times[-1] for c in on_victim if c.reconnect_times]
            return {
                "clients": clients,
                "on_victim": len(on_victim),
                "reestablished": sum(_back(c, killed_at, victim) for c in on_victim),
                "last_s": last,
                "p50_ms": _ms(percentile(times, 0.50)),
                "p99_ms": _ms(percentile(times, 0.99)),
                "failed_attempts": sum(c.failures for c in fleet.clients),
                "listen_overflows": overflows,
                "proxy_cpu_s": cpu if stack.proxy is not None else None,
                "others_disturbed": sum(1 for c in fleet.clients if c.index in others_lost and c.reconnects),
            }
        finally:
            await fleet.close()
    finally:
        stack.stop()


async def paced_drain(clients: int, rate: float, log_dir: Path, pinning: procs.Pinning) -> dict[str, Any]:
    """gw-1 drained with close_after=0s at `rate`: reconnects per second should follow the rate."""
    stack = Stack(BALANCER, log_dir)
    try:
        stack.start(pinning)
        fleet = Fleet(clients, stack.address_for([]))
        try:
            await fleet.open(within=120.0)
            on_victim = fleet.on("gw-1")
            assert stack.admin_port is not None
            started = time.monotonic()
            await asyncio.to_thread(
                _admin_post, stack.admin_port, f"/pools/gateways/backends/gw-1/drain?close_after=0s&rate={rate:g}",
                stack.admin_token,
            )
            within = len(on_victim) / rate + 20.0
            back = await fleet.wait_back(on_victim, started, "gw-1", within)
            done = [c.established_at for c in on_victim if _back(c, started, "gw-1") and c.established_at]
            series = per_second(done, started)
            span = (max(done) - min(done)) if len(done) > 1 else 0.0
            return {
                "clients": clients,
                "on_victim": len(on_victim),
                "reestablished": len(done),
                "all_back": back,
                "rate_asked": rate,
                "rate_seen": (len(done) - 1) / span if span > 0 else None,
                "peak_per_second": max(series, default=0),
                "per_second": series,
                "failed_attempts": sum(c.failures for c in fleet.clients),
            }
        finally:
            await fleet.close()
    finally:
        stack.stop()


async def idle_population(target: int, log_dir: Path, pinning: procs.Pinning) -> dict[str, Any]:
    """Hold `target` tunnels through the balancer: RSS per tunnel, new-client handshake latency."""
    stack = Stack(BALANCER, log_dir)
    try:
        stack.start(pinning)
        address = stack.address_for([])
        base = await _latencies(address)
        rss_before = procs.rss_kib(stack.proxy_pids())
        fleet = Fleet(target, address, spread=250)
        try:
            opened = time.monotonic()
            await fleet.open(within=300.0)
            opened = time.monotonic() - opened
            await asyncio.sleep(1.0)  # let the balancer's buffers settle before reading RSS
            rss_after = procs.rss_kib(stack.proxy_pids())
            held = await _latencies(address)
        finally:
            await fleet.close()
        return {
            "tunnels": target,
            "open_seconds": opened,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_per_tunnel_kib": (rss_after - rss_before) / target,
            "handshake_p50_ms_empty": _ms(percentile(base, 0.5)),
            "handshake_p99_ms_empty": _ms(percentile(base, 0.99)),
            "handshake_p50_ms_held": _ms(percentile(held, 0.5)),
            "handshake_p99_ms_held": _ms(percentile(held, 0.99)),
        }
    finally:
        stack.stop()


async def _latencies(address: Callable[[Client], tuple[str, int]]) -> list[float]:
    """LATENCY_SAMPLES fresh handshakes (no cookie) one after another: connect → hello."""
    fleet = Fleet(1, address, spread=1)
    out = []
    for i in range(LATENCY_SAMPLES):
        client = Client(i, "127.0.9.1")
        started = time.monotonic()
        with contextlib.suppress(OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            await fleet._connect(client)
            out.append(time.monotonic() - started)
        if client.writer is not None:
            client.writer.close()
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


# -- report -----------------------------------------------------------------------------------------

ROWS = (
    ("time until the last client is back", "last_s", "{:.2f} s"),
    ("p50 reconnect (loss seen → hello)", "p50_ms", "{:.0f} ms"),
    ("p99 reconnect", "p99_ms", "{:.0f} ms"),
    ("failed attempts", "failed_attempts", "{:d}"),
    ("listen overflows (machine-wide)", "listen_overflows", "{:d}"),
    ("proxy CPU during the storm", "proxy_cpu_s", "{:.2f} s"),
    ("clients on the killed gateway", "on_victim", "{:d}"),
    ("re-established", "reestablished", "{:d}"),
    ("clients elsewhere disturbed", "others_disturbed", "{:d}"),
)


def render_storm(results: dict[str, dict[str, Any] | str]) -> str:
    """The storm table: one column per target (or its error)."""
    kinds = list(results)
    width = max(len(label) for label, _, _ in ROWS) + 2
    lines = [" " * width + "".join(f"{kind:>14}" for kind in kinds)]
    for label, key, fmt in ROWS:
        cells = []
        for kind in kinds:
            result = results[kind]
            value = result.get(key) if isinstance(result, dict) else None
            cells.append(f"{(fmt.format(value) if value is not None else '-'):>14}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    for kind, result in results.items():
        if isinstance(result, str):
            lines.append(f"{kind}: {result}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 clients, 2,000 idle tunnels")
    parser.add_argument("--clients", type=int, help="storm population (default 5000, capped by RLIMIT_NOFILE)")
    parser.add_argument("--idle", type=int, help="idle tunnels to hold (default: as many as limits allow)")
    parser.add_argument(
        "--rate", type=float, action="append", dest="rates",
        help="paced drain: tunnels closed per second (repeatable; default 100 and 400)",
    )
    parser.add_argument("--backlog", type=int, help="the balancer's listeners[].backlog (default: its own)")
    parser.add_argument("--no-haproxy", action="store_true")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    nofile = procs.raise_nofile()
    # The proxy holds 2 descriptors per tunnel, this process 1 per client.
    room = max(100, (nofile - 1000) // 2)
    clients = min(args.clients or (1000 if args.quick else 5000), room)
    idle = min(args.idle or (2000 if args.quick else MAX_IDLE), room)
    pinning = procs.choose_pinning(not args.no_pin)
    if pinning.load is not None:
        procs.set_affinity(os.getpid(), {int(pinning.load)})  # the clients run here, beside the gateways
    kinds = [DIRECT, BALANCER] + ([] if args.no_haproxy or find_haproxy() is None else [HAPROXY])
    print(f"# storm: {clients} clients over 3 gateways, gw-1 SIGKILLed; RLIMIT_NOFILE {nofile}; "
          f"{pinning.note}", file=sys.stderr, flush=True)
    results: dict[str, Any] = {"storm": {}, "drain": None, "idle": None}
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="lb-storm-") as tmp:
            log_dir = Path(tmp)
            for kind in kinds:
                try:
                    results["storm"][kind] = run(storm(kind, clients, log_dir, pinning, args.backlog))
                except BenchError as exc:
                    results["storm"][kind] = f"failed: {str(exc).splitlines()[0]}"
            results["drain"] = []
            for rate in args.rates or DRAIN_RATES:
                try:
                    results["drain"].append(run(paced_drain(clients, rate, log_dir, pinning)))
                except BenchError as exc:
                    results["drain"].append(f"rate {rate:g}: failed: {str(exc).splitlines()[0]}")
            try:
                results["idle"] = run(idle_population(idle, log_dir, pinning))
            except BenchError as exc:
                results["idle"] = f"failed: {str(exc).splitlines()[0]}"
    except KeyboardInterrupt:
        print("\ninterrupted; every child process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render_report(results, clients))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def render_report(results: dict[str, Any], clients: int) -> str:
    lines = [f"\nreconnect storm: {clients} clients hold tunnels over 3 gateways; gw-1 is SIGKILLed and its "
             "clients reconnect at once with their cookies",
             render_storm(results["storm"])]
    for drain in results["drain"] or []:
        if not isinstance(drain, dict):
            lines.append(f"\npaced drain: {drain}")
            continue
        seen = drain["rate_seen"]
        lines.append(
            f"\npaced drain (balancer): gw-1 drained with close_after=0s, rate={drain['rate_asked']:g}/s: "
            f"{drain['reestablished']}/{drain['on_victim']} clients back, reconnects/s seen "
            f"{'-' if seen is None else f'{seen:.0f}'} (peak second {drain['peak_per_second']}), "
            f"failed attempts {drain['failed_attempts']}; per second: {drain['per_second']}"
        )
    idle = results["idle"]
    if isinstance(idle, dict):
        lines.append(
            f"\nidle population (balancer): {idle['tunnels']} tunnels opened in {idle['open_seconds']:.1f} s, "
            f"RSS {idle['rss_before_kib'] / 1024:.0f} → {idle['rss_after_kib'] / 1024:.0f} MiB = "
            f"{idle['rss_per_tunnel_kib']:.1f} KiB per tunnel; new-client handshake p50/p99 "
            f"{_fmt(idle['handshake_p50_ms_empty'])}/{_fmt(idle['handshake_p99_ms_empty'])} ms with nothing held, "
            f"{_fmt(idle['handshake_p50_ms_held'])}/{_fmt(idle['handshake_p99_ms_held'])} ms while they are held"
        )
    elif idle:
        lines.append(f"\nidle population: {idle}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
