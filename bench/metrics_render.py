"""What a `/metrics` scrape costs a balancer with many backends: `python -m bench.metrics_render --backends 1500`.

Starts the real balancer (`python -m lb run`) with one pool of N backends on 127.255.x.y:9 (nothing
listens there: connects are refused; TCP health checks hourly, so they stay out of the way), then:

1. **CPU per scrape.**  Scrapes one at a time, nothing else running, far enough apart that none is
   served from the reuse of a costly render; CPU is utime+stime from /proc/PID/stat around each.
2. **Event-loop lag during a scrape.**  A probe thread opens a connection to the balancer's
   listener every PROBE_INTERVAL, sends a plain request and times the first byte of the answer
   (a 502/503: the backends are unreachable, which costs the loop a refused connect or nothing).
   An answer needs the loop, so its time is how long the loop kept that client waiting.  Reported:
   the probes' median and worst while idle, and the worst answer that overlapped each scrape.
3. **Two scrapes at once**: the CPU they cost together (one render shared, or two).

With `--workers N` the scrapes run on the owner's loop, which serves the admin port, not the
listener: the probe then asks the admin port's `/livez`.

Every wait has a deadline; the balancer is stopped by PID in a `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import procs
from bench.procs import HOST, BenchError, Child

PROBE_INTERVAL = 0.002  # seconds between one probe's answer and the next probe
PROBE_TIMEOUT = 10.0
READY_TIMEOUT = 60.0
SCRAPE_TIMEOUT = 60.0
SETTLE = 2.0  # seconds after start: the first health checks (one per backend) go out in slices


def balancer_config(backends: int, port: int, admin_port: int, workers: int) -> dict[str, object]:
    """N backends that refuse connections (127.255.0.0/16 is loopback on Linux; port 9, discard, has no listener)."""
    addresses = [f"127.255.{i // 250}.{i % 250 + 1}:9" for i in range(backends)]
    return {
        "listeners": [{"bind": f"{HOST}:{port}"}],
        "admin": {"bind": f"{HOST}:{admin_port}"},
        "affinity": {"secret_keys": ["k" * 43]},
        "routes": [{"path_prefix": "/", "pool": "gateways"}],
        "pools": {
            "gateways": {
                "balance": "least_conn",
                "health_check": {"type": "tcp", "interval": "1h"},
                "backends": [{"id": f"gw-{i}", "address": address} for i, address in enumerate(addresses)],
            }
        },
        "workers": workers,
    }


@dataclass(slots=True)
class Probe:
    """Times answers from the balancer's loop, one connection at a time, until stopped."""

    address: tuple[str, int]
    request: bytes
    answers: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered), perf_counter
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, deadline: float) -> None:
        while not self.stop.is_set() and time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                with socket.create_connection(self.address, timeout=PROBE_TIMEOUT) as sock:
                    sock.sendall(self.request)
                    if not sock.recv(1):
                        raise ConnectionError("closed without an answer")
                self.answers.append((sent, time.perf_counter()))
            except OSError:
                self.failures += 1
            time.sleep(PROBE_INTERVAL)

    def worst_within(self, start: float, end: float) -> float:
        """The longest answer that overlapped [start, end]: the loop held that client this long."""
        return max((done - sent for sent, done in self.answers if done >= start and sent <= end), default=0.0)


def scrape(admin_port: int) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=SCRAPE_TIMEOUT) as reply:
        body: bytes = reply.read()
        return body


def wait_ready(child: Child, admin_port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"balancer exited with {child.proc.returncode}\n{child.log_tail()}")
        url = f"http://{HOST}:{admin_port}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"balancer not ready within {READY_TIMEOUT:g} s\n{child.log_tail()}")


def measure(backends: int, scrapes: int, workers: int, log_dir: Path) -> dict[str, float]:
    port, admin_port = procs.free_port(), procs.free_port()
    path = log_dir / "balancer.yaml"
    path.write_text(yaml.safe_dump(balancer_config(backends, port, admin_port, workers), sort_keys=False))
    child = procs.start("balancer", procs.python_module("lb", "run", "--config", str(path)), log_dir)
    try:
        wait_ready(child, admin_port)
        time.sleep(SETTLE)
        pids = child.pids()  # the owner renders; its workers do not (with workers: N)
        owner = [child.pid]
        body = scrape(admin_port)  # warm-up (imports, first allocations), not counted
        results: dict[str, float] = {"lines": body.count(b"\n"), "bytes": len(body), "processes": len(pids)}

        # 1. CPU per scrape, alone.  The next scrape waits past the reuse window (10x the render).
        cpu, wall = [], []
        for _ in range(scrapes):
            time.sleep(max(1.0, 12 * (wall[-1] if wall else 0.5)))
            before, started = procs.cpu_seconds(owner), time.perf_counter()
            scrape(admin_port)
            wall.append(time.perf_counter() - started)
            cpu.append(procs.cpu_seconds(owner) - before)
        results |= {"cpu_median_ms": 1000 * statistics.median(cpu), "wall_median_ms": 1000 * statistics.median(wall)}

        # 2. Loop lag while scraping, seen by a client of the same loop.
        target, request = (
            ((HOST, port), b"GET /probe HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n") if workers == 1
            else ((HOST, admin_port), b"GET /livez HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        )
        probe = Probe(target, request)
        thread = threading.Thread(target=probe.run, args=(time.perf_counter() + 600,), daemon=True)
        thread.start()
        try:
            time.sleep(1.0)  # the first requests on a fresh listener are slower (first use of its code paths)
            idle_from = time.perf_counter()
            time.sleep(2.0)
            idle = [done - sent for sent, done in probe.answers if sent >= idle_from]
            worst = []
            for _ in range(scrapes):
                time.sleep(max(1.0, 12 * statistics.median(wall)))
                started = time.perf_counter()
                scrape(admin_port)
                ended = time.perf_counter()
                # The probe waiting on the loop is answered after the scrape: let it report before looking.
                time.sleep(0.2)
                worst.append(probe.worst_within(started, ended))
        finally:
            probe.stop.set()
            thread.join(PROBE_TIMEOUT + 1)
        results |= {
            "idle_probe_median_ms": 1000 * statistics.median(idle) if idle else float("nan"),
            "idle_probe_max_ms": 1000 * max(idle, default=float("nan")),
            "scrape_lag_median_ms": 1000 * statistics.median(worst),
            "scrape_lag_max_ms": 1000 * max(worst),
            "probe_failures": probe.failures,
        }

        # 3. Two scrapes at once: shared, they cost one render.
        time.sleep(max(1.0, 12 * statistics.median(wall)))
        before = procs.cpu_seconds(owner)
        pair = [threading.Thread(target=scrape, args=(admin_port,)) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(SCRAPE_TIMEOUT)
        results["two_at_once_cpu_ms"] = 1000 * (procs.cpu_seconds(owner) - before)
        return results
    finally:
        procs.stop(child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_render", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1500)
    parser.add_argument("--scrapes", type=int, default=3, help="scrapes per measurement (default 3)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lb-metrics-bench-") as tmp:
        results = measure(args.backends, args.scrapes, args.workers, Path(tmp))
    print(f"backends={args.backends} workers={args.workers} scrapes={args.scrapes}")
    for key, value in results.items():
        print(f"  {key:24} {value:.1f}" if isinstance(value, float) else f"  {key:24} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
