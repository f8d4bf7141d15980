"""The orchestration behind `python -m bench [--quick] [--json FILE]`: scenarios by targets, one table.

Starts 3 echo backends, the balancer, (when installed) HAProxy and the floor
relay, then runs each scenario against each target in turn: `direct` (the load
generator straight to the backends, round robin), `balancer`, `haproxy`,
`floor` (`bench.floor`: the cheapest uvloop relay that inserts a fixed cookie).
The balancer runs on its shipped defaults plus the pool: no limit, timeout or
logging setting is overridden, so what is measured is what operators get.  The proxy
under test runs on CPU 0, everything else on CPU 1 (taskset), unless taskset
is missing.  The echo and stream scenarios run in `rounds` rounds, the handshakes in
`handshake_rounds`.  In each round direct has a window of its own, then the proxies take
turns within one window, `phase` seconds at a time (balancer, floor, HAProxy, again and
again, reversed every other round; `bench.loadgen.in_turns`): a neighbour's burst then falls
on each proxy alike, where windows seconds apart each caught their own (single windows of
one tree ranged 306-544 µs per handshake on a shared VM, and one round's lb/floor
0.99-1.34x).  Each cell reads the target's round of median CPU per unit, and the CPU rows'
lb/haproxy and lb/floor are the median of per-round ratios.
Last, without pinning, the echo scenario through a balancer with
`workers: 1` and with `workers: 2`, if the configuration accepts `workers`.

Every child is stopped by PID in a `finally` (terminate, wait, kill), Ctrl-C
included; every wait has a deadline; a scenario that fails leaves its cells
empty and says why in the notes, and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from bench import procs
from bench.haproxy import find_haproxy, haproxy_version, render_config
from bench.loadgen import Spec, Turn
from bench.procs import HOST, BenchError, Child, Pinning
from bench.report import Kind, Row, render_table, to_document
from bench.wire import HEAD_END, client_request, first_frame, set_cookies, status_code
from lb.compiled import compiled_state

BACKENDS = 3
READY_TIMEOUT = 20.0
PROBE_TIMEOUT = 2.0
SOURCE_IPS = tuple(f"127.0.0.{i}" for i in range(2, 42))  # client side of handshakes and idle tunnels
DIRECT, BALANCER, HAPROXY, FLOOR = "direct", "balancer", "haproxy", "floor"


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and durations of one run."""

    name: str
    warmup: float
    window: float
    echo_connections: int = 50
    echo_payload: int = 64
    stream_connections: int = 4
    stream_payload: int = 4096
    handshake_workers: int = 20
    rounds: int = 3  # of the echo and stream scenarios; a cell is the median round
    # Of the handshake scenarios: a handshake's CPU moves most with a shared machine's noise (single
    # windows 0.7-1.4x their neighbours'), and with three rounds two slow ones set the median.
    handshake_rounds: int = 5
    # Within a round the proxies take turns this many seconds at a time, so that a burst of the
    # machine's falls on each alike (`bench.loadgen.in_turns`).
    phase: float = 0.5
    idle_connections: int = 5000
    idle_concurrency: int = 100
    idle_settle: float = 1.0

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls("quick", warmup=0.5, window=1.5, idle_settle=0.5, rounds=1, handshake_rounds=1)
        return cls("full", warmup=2.0, window=5.0)


@dataclass(slots=True)
class Target:
    name: str
    addresses: tuple[tuple[str, int], ...]
    child: Child | None = None  # the proxy process; None for direct

    def proxy_pids(self) -> tuple[int, ...]:
        return tuple(self.child.pids()) if self.child is not None else ()


@dataclass(slots=True)
class Run:
    """Everything one benchmark run learns: raw results by scenario and target, and notes."""

    plan: Plan
    pinning: Pinning
    log_dir: Path
    backends: list[Child] = field(default_factory=list)
    backend_addresses: list[tuple[str, str, int]] = field(default_factory=list)  # (id, host, port)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", file=sys.stderr, flush=True)


# -- entry point ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="benchmark: direct vs balancer vs haproxy")
    parser.add_argument("--quick", action="store_true", help="short windows (whole run under a minute)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy even if installed")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor relay column")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--idle", type=int, metavar="N", help="idle tunnels to open (default 5000)")
    parser.add_argument("--no-storm", action="store_true", help="skip the reconnect storm (bench/storm.py)")
    args = parser.parse_args(argv)

    plan = Plan.make(args.quick)
    if args.idle is not None:
        plan = replace(plan, idle_connections=max(1, args.idle))
    nofile = procs.raise_nofile()
    # The proxy holds two descriptors per tunnel; keep headroom for everything else.
    if plan.idle_connections * 2 + 500 > nofile:
        plan = replace(plan, idle_connections=max(100, (nofile - 500) // 2))
    haproxy_path = None if args.no_haproxy else find_haproxy()
    pinning = procs.choose_pinning(not args.no_pin)
    header = _header(plan, pinning, haproxy_path, nofile, argv, skipped=args.no_haproxy)
    print("\n".join(f"# {k}: {v}" for k, v in header.items()), file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmp:
            run = Run(plan, pinning, Path(tmp))
            try:
                rows = _run_all(run, haproxy_path, floor=not args.no_floor)
            except BenchError as exc:
                print(f"benchmark failed: {exc}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every child process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    header["duration"] = f"{time.monotonic() - run.started:.0f} s"
    print()
    for key, value in header.items():
        print(f"{key + ':':<11} {value}")
    print()
    print(render_table(rows, haproxy=haproxy_path is not None, floor=not args.no_floor))
    print()
    for text in run.notes:
        print(f"- {text}")
    if args.json is not None:
        args.json.write_text(json.dumps(to_document(header, rows, run.notes, run.raw), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if not args.no_storm:
        from bench import storm  # the reconnect storm, paced drain and idle population

        flags = [f for f, on in (("--quick", args.quick), ("--no-haproxy", args.no_haproxy),
                                 ("--no-pin", args.no_pin)) if on]
        if args.json is not None:
            flags += ["--json", str(args.json.with_suffix(".storm.json"))]
        return storm.main(flags)
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _header(
    plan: Plan, pinning: Pinning, haproxy_path: str | None, nofile: int, argv: list[str] | None, *, skipped: bool
) -> dict[str, Any]:
    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    ha = "not found on PATH: column omitted" if not skipped else "skipped (--no-haproxy): column omitted"
    if haproxy_path is not None:
        ha = (f"{haproxy_path} {haproxy_version(haproxy_path)} "
              "(nbthread 1, balance leastconn, cookie insert indirect nocache, option httplog to stderr)")
    return {
        "benchmark": f"{plan.name}: warm-up {plan.warmup:g} s, then a {plan.window:g} s window per run; "
                     f"echo and stream: median of {plan.rounds} rounds, handshakes: median of "
                     f"{plan.handshake_rounds}; in each, the proxies take turns {plan.phase:g} s at a time",
        "command": command,
        "machine": (
            f"nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, event loop {loop} (balancer: runtime.event_loop auto)"
        ),
        "data plane": compiled_state().describe() + " (build_native.py; `make native PURE=1` for pure Python)",
        "pinning": pinning.note,
        "haproxy": ha,
        "limits": f"RLIMIT_NOFILE {nofile}; {plan.idle_connections} idle tunnels",
    }


# -- the run --------------------------------------------------------------------------------------


def _run_all(run: Run, haproxy_path: str | None, *, floor: bool = True) -> list[Row]:
    plan = run.plan
    children: list[Child] = []
    idle_busy = _machine_busy()
    run.raw["machine_busy_before"] = idle_busy
    if idle_busy > 0.2:
        run.note(f"the machine was not idle before the run: {100 * idle_busy:.0f}% of a core busy "
                 "(other processes); throughput numbers will be noisy, CPU-per-unit numbers less so")
    try:
        _start_backends(run, children)
        direct = Target(DIRECT, tuple((h, p) for _, h, p in run.backend_addresses))
        targets = [direct]
        balancer = _start_balancer(run, children, "balancer", cpus=run.pinning.proxy)
        targets.append(balancer)
        if haproxy_path is not None:
            try:
                targets.append(_start_haproxy(run, children, haproxy_path))
            except BenchError as exc:
                run.note(f"haproxy did not start, column empty: {str(exc).splitlines()[0]}")
        if floor:
            try:
                targets.append(_start_floor(run, children))
            except BenchError as exc:
                run.note(f"floor relay did not start, column empty: {str(exc).splitlines()[0]}")
        load_pids = tuple(b.pid for b in run.backends)
        rss_start = procs.rss_kib(balancer.proxy_pids())

        proxies = [target for target in floor_beside_balancer(targets) if target is not direct]
        for round_index in range(plan.rounds):
            in_turn = proxies if round_index % 2 == 0 else proxies[::-1]
            for scenario, connections, payload in (("echo", plan.echo_connections, plan.echo_payload),
                                                   ("stream", plan.stream_connections, plan.stream_payload)):
                spec = Spec(scenario, direct.addresses, connections, payload, plan.warmup, plan.window,
                            load_pids=load_pids)
                _scenario(run, scenario, [direct], spec)
                _scenario(run, scenario, in_turn, taking_turns(spec, in_turn, plan.phase))
        for round_index in range(plan.handshake_rounds):
            in_turn = proxies if round_index % 2 == 0 else proxies[::-1]
            for check in (False, True):
                name = "handshake_check" if check else "handshake_issue"
                if not check:  # direct checks no cookie: its check row repeats this one
                    _scenario(run, name, [direct], handshake_spec(plan, direct, plan.window, check, load_pids))
                _scenario(run, name, in_turn, turns_spec(plan, in_turn, check, load_pids))
        for target in targets[1:]:
            _scenario(run, "idle", [target], Spec(
                "idle", target.addresses, plan.idle_connections, source_ips=SOURCE_IPS,
                concurrency=plan.idle_concurrency, settle=plan.idle_settle, proxy_pids=target.proxy_pids()))
            if target is balancer:
                _check_tunnels_closed(run, balancer)
        rss_end = procs.rss_kib(balancer.proxy_pids())
        run.raw["balancer_rss_kib"] = {"start": rss_start, "end": rss_end}
        run.note(f"balancer RSS {rss_start / 1024:.1f} MiB before the scenarios, {rss_end / 1024:.1f} MiB after")

        for target in targets[1:]:
            if target.child is not None:
                procs.stop(target.child)
        _workers_variant(run, children)
    finally:
        procs.stop_all(children)
        for child in children:
            if child.name.startswith(("balancer", "haproxy")):
                _scan_log(run, child)
    return _rows(run, haproxy_path is not None)


def floor_beside_balancer(targets: Sequence[Target]) -> list[Target]:
    """The targets in the handshake rounds' order: the floor moved to just after the balancer."""
    floor = [target for target in targets if target.name == FLOOR]
    rest = [target for target in targets if target.name != FLOOR]
    at = next((i + 1 for i, target in enumerate(rest) if target.name == BALANCER), len(rest))
    return [*rest[:at], *floor, *rest[at:]]


def _machine_busy(seconds: float = 1.0) -> float:
    """Cores' worth of CPU busy (0..nproc) over `seconds` while the benchmark itself is idle."""
    before = procs.cpu_times()
    time.sleep(seconds)
    return sum(procs.cpu_busy(before, procs.cpu_times()).values())


def _foreign_load(result: dict[str, Any]) -> float:
    """Cores' worth of CPU used during the window by processes that are not ours (plus softirq we cause)."""
    elapsed = result.get("elapsed") or 0.0
    if elapsed <= 0:
        return 0.0
    ours = (result.get("proxy_cpu", 0.0) + result.get("load_cpu", 0.0)) / elapsed
    return float(max(0.0, sum(result.get("cpu_busy", {}).values()) - ours))


def _scan_log(run: Run, child: Child) -> None:
    """Count WARNING/ERROR lines and tracebacks in a proxy's log; quote the first few."""
    try:
        lines = child.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    bad = [line for line in lines if any(word in line for word in ("ERROR", "WARNING", "Traceback", "[ALERT]"))]
    if bad:
        first = " | ".join(line.strip()[:160] for line in bad[:3])
        run.note(f"{child.name} log: {len(bad)} warning/error lines of {len(lines)}; first: {first}")


def _scenario(run: Run, name: str, targets: Sequence[Target], spec: Spec) -> None:
    """Run one load generator process (on the load CPU) and keep its result under raw[name][target]
    for each of `targets` (one, or those that took turns: `spec.turns`)."""
    label = f"{name} → {' / '.join(target.name for target in targets)}"
    print(f"running {label} ...", file=sys.stderr, flush=True)
    cpus = run.pinning.load
    timeout = spec.warmup + spec.window * len(targets) + 30 + spec.connections / 200
    result = _loadgen(run, spec, cpus, timeout, label)
    by_target = ((result or {}).get("turns") or {}) if spec.turns else {targets[0].name: result}
    for target in targets:
        _keep(run, name, target.name, by_target.get(target.name))
    if result is None:
        return
    errors = result.get("errors") or {}
    if errors:
        run.note(f"{label}: client-side errors {errors}")
    for target in targets:
        opened = (by_target.get(target.name) or {}).get("opened")
        if opened is not None and opened < spec.connections:
            run.note(f"{name} → {target.name}: only {opened} of {spec.connections} connections opened")
    for target in targets:
        if target.child is not None and not target.child.alive():
            raise BenchError(f"{target.name} died during {name}\n{target.child.log_tail()}")
    time.sleep(0.3)  # let the closes settle before the next run


def _keep(run: Run, name: str, target: str, result: dict[str, Any] | None) -> None:
    """Keep one round's result (None: its load generator failed); the cell reads the round of
    median CPU per unit (rate for direct).

    Every round stays under "rounds", a failed one as None so that round r of each target is
    still at index r (`_paired` pairs by index); the correctness counts (cookies issued, changes
    of server) are summed over all of them under "all_rounds".
    """
    kept = run.raw.setdefault(name, {}).get(target) or {}
    rounds = [*kept.get("rounds", []), None if result is None else {k: v for k, v in result.items() if k != "rounds"}]
    done = [one for one in rounds if one is not None]
    if not done:
        run.raw[name][target] = {"rounds": rounds}
        return

    def cost(one: dict[str, Any]) -> float:
        if one.get("proxy_cpu") is not None:  # a round that counted nothing is the costliest
            return float(one["proxy_cpu"]) / float(one["count"]) if one.get("count") else float("inf")
        return -float(one.get("rate") or 0.0)

    median = sorted(done, key=cost)[len(done) // 2]
    totals = {key: sum(int(one.get(key) or 0) for one in done) for key in ("count", "cookies_issued", "server_changes")}
    run.raw[name][target] = {**median, "rounds": rounds, "all_rounds": totals}


def handshake_spec(
    plan: Plan, target: Target, window: float, check: bool, load_pids: tuple[int, ...] = ()
) -> Spec:
    """The handshake scenario against `target` as the benchmark loads it.

    Direct sends no cookie.  The floor is sent back the cookie it set, as the balancer and HAProxy are:
    it checks none, but reads the same requests, next to the balancer's check rounds.
    """
    return Spec("handshake", target.addresses, plan.handshake_workers, 0, plan.warmup, window,
                check_cookie=check and target.name != DIRECT, source_ips=SOURCE_IPS,
                proxy_pids=target.proxy_pids(), load_pids=load_pids)


def turns_spec(plan: Plan, proxies: Sequence[Target], check: bool, load_pids: tuple[int, ...] = ()) -> Spec:
    """The handshake scenario through `proxies` taking turns (`taking_turns`)."""
    return taking_turns(handshake_spec(plan, proxies[0], plan.window, check, load_pids), proxies, plan.phase)


def taking_turns(spec: Spec, proxies: Sequence[Target], phase: float) -> Spec:
    """`spec` through `proxies` taking turns, `phase` seconds at a time, `spec.window` seconds each
    (`bench.loadgen.in_turns` says why)."""
    return replace(spec, targets=(), proxy_pids=(), turns=tuple(Turn(t.name, t.addresses, t.proxy_pids())
                                                                for t in proxies), phase=phase)


def cpu_per_unit_us(result: dict[str, Any] | None) -> float:
    """A load generator window's proxy CPU per unit (handshake, message) in µs; 0.0 when nothing was counted."""
    count = (result or {}).get("count") or 0
    return 1e6 * result["proxy_cpu"] / count if result and count else 0.0


def _loadgen(run: Run, spec: Spec, cpus: str | None, timeout: float, label: str) -> dict[str, Any] | None:
    child = procs.start("loadgen", procs.python_module("bench.loadgen", "--spec", spec.to_json()),
                        run.log_dir, cpus=cpus, stdout_pipe=True)
    try:
        assert child.proc.stdout is not None
        try:
            out, _ = child.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.note(f"{label}: load generator did not finish within {timeout:.0f} s")
            return None
        if child.proc.returncode != 0:
            run.note(f"{label}: load generator failed ({child.proc.returncode}): {child.log_tail(3)}")
            return None
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result
    finally:
        procs.stop(child)


# -- starting things ------------------------------------------------------------------------------------


def _start_backends(run: Run, children: list[Child]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    for i in range(1, BACKENDS + 1):
        sid = f"gw-{i}"
        child = procs.start(sid, procs.python_module("bench.echo_server", "--port", "0", "--id", sid),
                            run.log_dir, cpus=run.pinning.load, stdout_pipe=True)
        children.append(child)
        run.backends.append(child)
    for child in run.backends:
        run.backend_addresses.append((child.name, *procs.read_address(child, deadline)))


def balancer_config(backends: Sequence[tuple[str, str, int]], port: int, admin_port: int,
                    workers: int | None = None) -> dict[str, Any]:
    """The balancer's benchmark configuration (as a YAML-ready mapping)."""
    config: dict[str, Any] = {
        "listeners": [{"bind": f"{HOST}:{port}"}],
        "admin": {"bind": f"{HOST}:{admin_port}"},
        "affinity": {"mode": "insert", "cookie": "LB_AFFINITY", "secret_keys": [secrets.token_urlsafe(32)]},
        "routes": [{"path_prefix": "/", "pool": "gateways"}],
        "pools": {
            "gateways": {
                "balance": "least_conn",
                "health_check": {"type": "http", "path": "/health", "interval": "1s", "timeout": "500ms",
                                 "rise": 2, "fall": 2},
                "backends": [{"id": sid, "address": f"{host}:{p}"} for sid, host, p in backends],
            }
        },
        # Nothing else: limits, timeouts and logging are the shipped defaults (issue 7: the benchmark
        # measures what operators run; a default that caps it is a default to fix, not to override).
    }
    if workers is not None:
        config["workers"] = workers
    return config


def _write_config(run: Run, name: str, workers: int | None) -> tuple[Path, int, int]:
    port, admin_port = procs.free_port(), procs.free_port()
    path = run.log_dir / f"{name}.yaml"
    config = balancer_config(run.backend_addresses, port, admin_port, workers)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, port, admin_port


def _start_balancer(run: Run, children: list[Child], name: str, *, cpus: str | None,
                    workers: int | None = None) -> Target:
    path, port, admin_port = _write_config(run, name, workers)
    child = procs.start(name, procs.python_module("lb", "run", "--config", str(path)), run.log_dir, cpus=cpus)
    children.append(child)
    target = Target(BALANCER, ((HOST, port),), child)
    _wait_ready(child, (HOST, port), admin_port)
    return target


def _start_haproxy(run: Run, children: list[Child], path: str) -> Target:
    port = procs.free_port()
    nofile = procs.raise_nofile()
    maxconn = max(1000, min(30000, (nofile - 200) // 2))
    cfg = run.log_dir / "haproxy.cfg"
    # Logging as the balancer's shipped default does (a line per request, to stderr): the same work.
    cfg.write_text(render_config((HOST, port), run.backend_addresses, maxconn, log=True))
    child = procs.start("haproxy", [path, "-db", "-f", str(cfg)], run.log_dir, cpus=run.pinning.proxy)
    children.append(child)
    _wait_ready(child, (HOST, port), None)
    return Target(HAPROXY, ((HOST, port),), child)


def _start_floor(run: Run, children: list[Child]) -> Target:
    backends = ",".join(f"{host}:{port}" for _, host, port in run.backend_addresses)
    child = procs.start("floor", procs.python_module("bench.floor", "--port", "0", "--backends", backends),
                        run.log_dir, cpus=run.pinning.proxy, stdout_pipe=True)
    children.append(child)
    address = procs.read_address(child, time.monotonic() + READY_TIMEOUT)
    _wait_ready(child, address, None)
    return Target(FLOOR, (address,), child)


def _wait_ready(child: Child, address: tuple[str, int], admin_port: int | None) -> None:
    """Until every backend is up (balancer /status, when there is one) and a handshake gets the hello."""
    deadline = time.monotonic() + READY_TIMEOUT
    backends_up = admin_port is None
    last = "no attempt yet"
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.proc.returncode}\n{child.log_tail()}")
        if not backends_up and admin_port is not None:
            backends_up, last = _all_up(admin_port)
        if backends_up:
            try:
                status, _, _ = probe(address)
                if status == 101:
                    return
                last = f"handshake answered {status}"
            except OSError as exc:
                last = f"handshake: {exc}"
        time.sleep(0.1)
    raise BenchError(f"{child.name} not ready within {READY_TIMEOUT:g} s ({last})\n{child.log_tail()}")


def _all_up(admin_port: int) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=PROBE_TIMEOUT) as reply:
            document = json.load(reply)
    except (OSError, ValueError) as exc:
        return False, f"/status: {exc}"
    states = [b.get("state") for pool in document.get("pools", {}).values() for b in pool.get("backends", [])]
    return bool(states) and all(s == "up" for s in states), f"backend states {states}"


def probe(address: tuple[str, int], cookie: str | None = None) -> tuple[int, bytes, list[str]]:
    """One blocking handshake: (status, hello payload, cookies set)."""
    with socket.create_connection(address, timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(client_request(f"{address[0]}:{address[1]}", "/ws", cookie))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return (status_code(data) if data else 0), b"", []
            data += chunk
            end = data.find(HEAD_END)
            if end < 0:
                continue
            head = data[:end]
            if status_code(head) != 101:
                return status_code(head), b"", set_cookies(head)
            frame = first_frame(data[end + len(HEAD_END) :])
            if frame is not None:
                return 101, frame[1], set_cookies(head)


def _admin_status(admin_port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=PROBE_TIMEOUT) as reply:
            document: dict[str, Any] = json.load(reply)
            return document
    except (OSError, ValueError):
        return None


def _check_tunnels_closed(run: Run, balancer: Target) -> None:
    """After the idle tunnels are closed by the clients, the balancer should hold none within a few seconds."""
    assert balancer.child is not None
    config = yaml.safe_load((run.log_dir / "balancer.yaml").read_text())
    admin_port = int(config["admin"]["bind"].rpartition(":")[2])
    deadline = time.monotonic() + 5.0
    document = None
    while time.monotonic() < deadline:
        document = _admin_status(admin_port)
        if document is not None and document.get("tunnels") == 0:
            return
        time.sleep(0.2)
    tunnels = None if document is None else document.get("tunnels")
    run.note(f"balancer still reports {tunnels} tunnels 5 s after every client hung up")


# -- workers: 2 ----------------------------------------------------------------------------------------


def _workers_variant(run: Run, children: list[Child]) -> None:
    """Echo through `workers: 1` and `workers: 2`, nothing pinned (if the config accepts `workers`)."""
    path, _, _ = _write_config(run, "workers-validate", 2)
    check = subprocess.run(procs.python_module("lb", "validate", "--config", str(path)), capture_output=True,
                           text=True, env=procs.child_env(), timeout=30, check=False)
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or ["?"])[0]
        run.note(f"workers variant skipped: `lb validate` rejects `workers: 2` ({reason})")
        return
    everywhere = os.sched_getaffinity(0)
    for backend in run.backends:
        procs.set_affinity(backend.pid, everywhere)
    plan = run.plan
    load_pids = tuple(b.pid for b in run.backends)
    for workers in (1, 2):
        name = f"balancer-workers-{workers}"
        try:
            target = _start_balancer(run, children, name, cpus=None, workers=workers)
        except BenchError as exc:
            run.note(f"workers {workers}: balancer did not start: {str(exc).splitlines()[0]}")
            continue
        spec = Spec("echo", target.addresses, plan.echo_connections, plan.echo_payload, plan.warmup, plan.window,
                    proxy_pids=target.proxy_pids(), load_pids=load_pids)
        print(f"running echo → balancer workers {workers} (unpinned) ...", file=sys.stderr, flush=True)
        result = _loadgen(run, spec, None, spec.warmup + spec.window + 30, f"echo workers {workers}")
        run.raw.setdefault("echo_workers", {})[str(workers)] = result
        if result and result.get("errors"):
            run.note(f"echo workers {workers}: client-side errors {result['errors']}")
        assert target.child is not None
        procs.stop(target.child)


# -- the table ----------------------------------------------------------------------------------------


def _get(run: Run, scenario: str, target: str, key: str) -> float | None:
    result = (run.raw.get(scenario) or {}).get(target)
    if not result or result.get(key) is None:
        return None
    value = result[key]
    return float(value)


def _per(run: Run, scenario: str, target: str, unit: float = 1.0) -> float | None:
    """Proxy CPU seconds per counted item (scaled: `unit` items per count)."""
    cpu = _get(run, scenario, target, "proxy_cpu")
    count = _get(run, scenario, target, "count")
    if cpu is None or not count:
        return None
    return cpu / (count * unit)


def _paired(run: Run, scenario: str, other: str, unit: float = 1.0) -> float | None:
    """Median over rounds of (balancer's CPU per unit / `other`'s) in the same round, or None.

    Round r of every target ran next to the others' round r (interleaved), so each pair shares
    the machine's state of that moment.
    """
    ratios = sorted(_round_ratios(run, scenario, other, unit))
    if not ratios:
        return None
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def _round_ratios(run: Run, scenario: str, other: str, unit: float = 1.0) -> list[float]:
    """The balancer's CPU per unit over `other`'s, round by round (those both counted)."""
    mine = _round_costs(run, scenario, BALANCER, unit)
    theirs = _round_costs(run, scenario, other, unit)
    return [a / b for a, b in zip(mine, theirs, strict=False) if a is not None and b is not None]


def _round_costs(run: Run, scenario: str, target: str, unit: float) -> list[float | None]:
    """CPU per unit of each round, by round index; None for a round that failed or counted nothing."""
    result = (run.raw.get(scenario) or {}).get(target) or {}
    return [
        one["proxy_cpu"] / (one["count"] * unit)
        if one is not None and one.get("proxy_cpu") is not None and one.get("count") else None
        for one in result.get("rounds", [])
    ]


def _rows(run: Run, haproxy: bool) -> list[Row]:
    plan = run.plan
    mb = plan.stream_payload / 1e6  # MB per echoed stream message

    def three(scenario: str, key: str, scale: float = 1.0) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for target in (DIRECT, BALANCER, HAPROXY, FLOOR):
            value = _get(run, scenario, target, key)
            out[target] = None if value is None else value * scale
        return out

    def proxies(values: dict[str, float | None]) -> dict[str, float | None]:
        return {BALANCER: values.get(BALANCER), HAPROXY: values.get(HAPROXY), FLOOR: values.get(FLOOR)}

    measured = (BALANCER, HAPROXY, FLOOR)

    echo = three("echo", "rate")
    stream = three("stream", "rate", mb)
    issue = three("handshake_issue", "rate")
    check = three("handshake_check", "rate")
    check[DIRECT] = issue[DIRECT]
    idle = {t: _get(run, "idle", t, "rss_per_tunnel_kib") for t in measured}

    def pairs(scenario: str, unit: float = 1.0) -> dict[str, float | None]:
        return {"paired_haproxy": _paired(run, scenario, HAPROXY, unit),
                "paired_floor": _paired(run, scenario, FLOOR, unit)}

    rows = [
        Row(f"echo msg/s ({plan.echo_connections} conns, {plan.echo_payload} B)", Kind.RATE, **echo),
        Row("proxy CPU per echoed message", Kind.CPU_US,
            **proxies({t: _per(run, "echo", t) for t in measured}), **pairs("echo")),
        Row(f"stream MB/s ({plan.stream_connections} x {plan.stream_payload // 1024} KiB)", Kind.MBPS, **stream),
        Row("proxy CPU per MB", Kind.CPU_MS, **proxies({t: _per(run, "stream", t, mb) for t in measured}),
            **pairs("stream", mb)),
        Row(f"handshakes/s (issue cookie, {plan.handshake_workers} workers)", Kind.RATE, **issue),
        Row(f"handshakes/s (check cookie, {plan.handshake_workers} workers)", Kind.RATE, **check),
        Row("proxy CPU per handshake (issue)", Kind.CPU_US,
            **proxies({t: _per(run, "handshake_issue", t) for t in measured}), **pairs("handshake_issue")),
        Row("proxy CPU per handshake (check)", Kind.CPU_US,
            **proxies({t: _per(run, "handshake_check", t) for t in measured}), **pairs("handshake_check")),
        Row(f"proxy RSS per idle tunnel ({plan.idle_connections})", Kind.KIB, **proxies(idle)),
    ]
    workers = run.raw.get("echo_workers") or {}
    w1 = (workers.get("1") or {}).get("rate")
    w2 = (workers.get("2") or {}).get("rate")
    if w1 is not None or w2 is not None:
        rows.append(Row("echo msg/s unpinned, workers 1", Kind.RATE, balancer=w1))
        rows.append(Row("echo msg/s unpinned, workers 2", Kind.RATE, balancer=w2, ratio_base=w1))
    _explain(run, haproxy, w1 is not None and w2 is not None)
    return rows


def _explain(run: Run, haproxy: bool, workers: bool) -> None:
    """Notes under the table: what the columns mean, how busy each side was, correctness checks."""
    notes = [
        "direct = load generator straight to the 3 echo backends (round robin); ratio = column / direct; "
        "lb/haproxy = balancer / haproxy (for CPU and RSS rows: >1 means the balancer costs more)",
        "stream MB/s counts echoed payload; each byte crosses the proxy twice (client→backend, backend→client)",
        "handshake = connect, upgrade, read the backend's hello, close; direct has no cookie, so its check row "
        "repeats the issue row",
        "floor = bench.floor, the cheapest uvloop relay that inserts a fixed cookie (one Protocol per client, "
        "head end found, backend round robin, Set-Cookie into the 101, then protocol pairs; no parsing, no "
        "routing, no cookie check, no logs); lb/floor = balancer / floor: >1 is the balancer's own work. "
        "The floor checks no cookie: in the check rounds it is sent back the one it set and answers as in the "
        "issue rounds, next to the balancer's check rounds",
    ]
    if run.plan.rounds > 1 or run.plan.handshake_rounds > 1:
        notes.append(f"echo and stream ran in {run.plan.rounds} rounds, handshakes in {run.plan.handshake_rounds} "
                     f"(direct's window, then one window in which balancer, floor and haproxy took turns "
                     f"{run.plan.phase:g} s at a time, reversed every other round): "
                     "each cell is a target's round of median CPU per unit, and lb/haproxy and lb/floor on the CPU "
                     "rows are the median of the per-round ratios (each pair ran in the same round), not the ratio "
                     "of two cells")
    rounds = [
        f"{scenario} lb/{other} " + " ".join(f"{ratio:.2f}" for ratio in ratios)
        for scenario in ("echo", "stream", "handshake_issue", "handshake_check")
        for other in (HAPROXY, FLOOR)
        if len(ratios := _round_ratios(run, scenario, other)) > 1
    ]
    if rounds:
        notes.append("the CPU rows' ratios round by round, in the order the rounds ran (the row shows their "
                     "median): " + "; ".join(rounds))
    if workers:
        notes.append("workers rows: balancer with `workers: 1` / `workers: 2`, nothing pinned; "
                     "the ratio on the workers 2 row is workers 2 / workers 1")
    busy = []
    for scenario in ("echo", "stream", "handshake_issue", "handshake_check"):
        for target, result in (run.raw.get(scenario) or {}).items():
            if not result or not result.get("elapsed"):
                continue
            elapsed = result["elapsed"]
            proxy = f"proxy {100 * result['proxy_cpu'] / elapsed:.0f}%, " if target != DIRECT else ""
            cores = " ".join(f"{name} {100 * value:.0f}%" for name, value in sorted(result.get("cpu_busy", {}).items()))
            busy.append(f"{scenario}/{target}: {proxy}load side {100 * result['load_cpu'] / elapsed:.0f}% ({cores})")
    for count, result in (run.raw.get("echo_workers") or {}).items():
        if isinstance(result, dict) and result.get("elapsed"):
            elapsed = result["elapsed"]
            split = "+".join(f"{100 * v / elapsed:.0f}%" for v in result.get("proxy_cpu_by_pid", {}).values())
            cores = " ".join(f"{name} {100 * value:.0f}%" for name, value in sorted(result.get("cpu_busy", {}).items()))
            busy.append(f"echo/workers {count}: balancer processes {split}, "
                        f"load side {100 * result['load_cpu'] / elapsed:.0f}% ({cores})")
    foreign = [
        f"{scenario}/{target} {100 * _foreign_load(result):.0f}%"
        for scenario in ("echo", "stream", "handshake_issue", "handshake_check")
        for target, result in (run.raw.get(scenario) or {}).items()
        if result and _foreign_load(result) > 0.15
    ]
    if foreign:
        notes.append("CPU used by other processes (or kernel softirq) during windows, in % of a core: "
                     + ", ".join(foreign) + " — those throughput numbers are noisy")
    if busy:
        notes.append("CPU busy during the window (process: 100% = one core; load side = load generator + "
                     "backends; cpuN = whole core, from /proc/stat): " + "; ".join(busy))
    for target in (BALANCER, HAPROXY, FLOOR):
        # Correctness counts over every round, not only the median one.  The floor re-issues its cookie
        # and round-robins by design: its check counts say nothing.
        result = ((run.raw.get("handshake_check") or {}).get(target) or {}).get("all_rounds")
        if result and target != FLOOR:
            notes.append(f"check cookie through {target}: {result['cookies_issued']} cookies re-issued and "
                         f"{result['server_changes']} changes of server in {result['count']} handshakes "
                         "(both should be 0)")
        result = ((run.raw.get("handshake_issue") or {}).get(target) or {}).get("all_rounds")
        if result and result["count"] and result["cookies_issued"] < result["count"]:
            notes.append(f"issue cookie through {target}: only {result['cookies_issued']} of {result['count']} "
                         "handshakes got a cookie")
        result = (run.raw.get("idle") or {}).get(target)
        if result and "opened" in result:  # not a run whose load generator failed
            before, after = result.get("rss_before_kib", 0) / 1024, result.get("rss_after_kib", 0) / 1024
            notes.append(f"idle through {target}: {result.get('opened')} tunnels opened in "
                         f"{result.get('open_seconds', 0):.1f} s, RSS {before:.1f} → {after:.1f} MiB, "
                         f"{result.get('still_open')} still open after the settle time")
    run.notes[:0] = notes
