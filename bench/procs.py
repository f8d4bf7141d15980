"""Child processes of the benchmark: start (optionally pinned with taskset), wait for readiness, stop.

Also the /proc readers the load generator samples: CPU seconds (utime+stime
from /proc/PID/stat) and resident memory (VmRSS from /proc/PID/status).  The
parsers take text, so they are pure; the readers around them do one read each.

Every wait has a deadline.  Stopping is by PID only: terminate, wait, kill;
for a process that forked workers, its children (listed before it is
signalled) get the same treatment.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
HOST = "127.0.0.1"


class BenchError(Exception):
    """A benchmark step that cannot go on (a child that does not start, a proxy that never gets ready)."""


# -- /proc ----------------------------------------------------------------------------------------


def parse_stat_user_system(stat: str) -> tuple[float, float]:
    """User and system CPU seconds (utime, stime) from the text of /proc/PID/stat (proc(5): fields 14 and 15)."""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def parse_stat_cpu(stat: str) -> float:
    """CPU seconds (utime + stime) from the text of /proc/PID/stat."""
    user, system = parse_stat_user_system(stat)
    return user + system


def parse_status_rss(status: str) -> int:
    """VmRSS in KiB from the text of /proc/PID/status; 0 if absent (a zombie)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def user_system_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User and system CPU seconds so far of `pids`, summed (0 for one that has gone)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            one_user, one_system = parse_stat_user_system(Path(f"/proc/{pid}/stat").read_text())
            user, system = user + one_user, system + one_system
    return user, system


def cpu_seconds(pids: Sequence[int]) -> float:
    """Total CPU seconds so far of `pids` (0 for one that has gone)."""
    return sum(user_system_seconds(pids))


def rss_kib(pids: Sequence[int]) -> int:
    """Total VmRSS of `pids` in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += parse_status_rss(Path(f"/proc/{pid}/status").read_text())
    return total


def parse_cpu_times(stat: str) -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from the text of /proc/stat (proc(5): the `cpuN` lines).

    Busy is user+nice+system+irq+softirq+steal; total adds idle and iowait.
    """
    out: dict[str, tuple[int, int]] = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        values = [int(v) for v in rest.split()[:8]]
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        busy = user + nice + system + irq + softirq + steal
        out[name] = (busy, busy + idle + iowait)
    return out


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies now; empty where /proc/stat is unreadable."""
    try:
        return parse_cpu_times(Path("/proc/stat").read_text())
    except OSError:
        return {}


def cpu_busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Fraction of each CPU that was busy between two `cpu_times()` samples."""
    out: dict[str, float] = {}
    for name, (busy1, total1) in after.items():
        busy0, total0 = before.get(name, (busy1, total1))
        if total1 > total0:
            out[name] = round((busy1 - busy0) / (total1 - total0), 3)
    return out


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc/PID/task/*/children."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of `pid` to `cpus` (os.sched_setaffinity acts on one thread id)."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


# -- machine ----------------------------------------------------------------------------------------


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True, slots=True)
class Pinning:
    """Where processes run: `proxy` / `load` are taskset CPU lists, or None when unpinned."""

    proxy: str | None
    load: str | None
    note: str

    @property
    def pinned(self) -> bool:
        return self.proxy is not None

    def prefix(self, cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus] if cpus is not None else []


def choose_pinning(enabled: bool = True) -> Pinning:
    """Proxy on CPU 0, everything else on CPU 1, when taskset exists and both CPUs are ours."""
    if not enabled:
        return Pinning(None, None, "unpinned (--no-pin)")
    if shutil.which("taskset") is None:
        return Pinning(None, None, "unpinned: taskset not found")
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    if not {0, 1} <= allowed:
        return Pinning(None, None, f"unpinned: need CPUs 0 and 1, have {sorted(allowed)}")
    return Pinning("0", "1", "proxy under test on CPU 0; backends and load generator on CPU 1 (taskset)")


# -- ports ----------------------------------------------------------------------------------------


_HANDED_OUT: set[tuple[str, int]] = set()


def port_share(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(index, count): which share of the ports this process may hand out.

    Under pytest-xdist (`make test` runs the tests in parallel processes) each process takes the
    ports whose `port // 2` falls in its own residue class, so two of them never name the same
    port while it is free between our release and a child's bind. (`port // 2`: bind(0) gives
    Linux's odd ports only, leaving the even ones to connect().) Elsewhere one share: all ports.
    """
    worker, count = environ.get("PYTEST_XDIST_WORKER", ""), environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(worker[2:]) < int(count):
        return int(worker[2:]), int(count)
    return 0, 1


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now, one this process has not handed out before, in its share.

    Taken below the kernel's ephemeral range (`ip_local_port_range`) where there is room: ports there
    are only ever bound on purpose, whereas one from bind(0) is in the range every connect() draws its
    local port from, so between our release and a child's bind an outgoing connection (a balancer's to
    its backend, a test's client) could take it ("address already in use"; it happened once in 4,000
    tests).  A candidate counts as free when a plain bind (no SO_REUSEADDR) succeeds.  Elsewhere, bind
    port 0, read it, release it (uvicorn's trick).  Either way a port is handed out once per process
    (two calls in a row could otherwise name one port for a listener and the admin API, which the
    balancer refuses as overlapping), and parallel test processes keep to their own `port_share`.
    """
    index, count = port_share()
    below = _below_ephemeral()
    for _ in range(200 if below else 0):
        port = _RANDOM.choice(below)
        if (host, port) in _HANDED_OUT or (port // 2) % count != index:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add((host, port))
        return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if (host, port) not in _HANDED_OUT and (port // 2) % count == index:
            _HANDED_OUT.add((host, port))
            return port


_RANDOM = random.Random()
_LOWEST = 10000  # below: ports other software on a developer's machine tends to listen on
_ROOM = 4000  # fewer ports than this below the ephemeral range: use bind(0) instead


def _below_ephemeral(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range | None:
    """Ports from _LOWEST up to the kernel's ephemeral range (which connect() and bind(0) draw from), or None."""
    try:
        low = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_LOWEST, low) if low - _LOWEST >= _ROOM else None


# -- processes ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    """One started process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The process and its live children (a balancer with `workers: N` forks)."""
        return [self.pid, *children(self.pid)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)  # the product runs as an operator runs it
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start(
    name: str, argv: Sequence[str], log_dir: Path, *, cpus: str | None = None, stdout_pipe: bool = False
) -> Child:
    """Start `argv` (under `taskset -c cpus` if given; taskset execs, so the PID is the program's)."""
    log_path = log_dir / f"{name}.log"
    command = (["taskset", "-c", cpus] if cpus is not None else []) + list(argv)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            env=child_env(),
            start_new_session=True,  # Ctrl-C reaches the benchmark only; it stops the children itself
        )
    return Child(name, proc, log_path)


def read_address(child: Child, deadline: float) -> tuple[str, int]:
    """The (host, port) a child names on its first stdout line (`listening on HOST:PORT`, as
    `bench.echo_server` and `bench.floor` print it)."""
    host, _, port = read_line(child, deadline).rpartition(" ")[2].rpartition(":")
    return host, int(port)


def read_line(child: Child, deadline: float) -> str:
    """The next line on a child's stdout pipe, or BenchError at the deadline or if it exits."""
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{child.name}: no output within the deadline\n{child.log_tail()}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            raise BenchError(f"{child.name} exited with {child.proc.wait()}\n{child.log_tail()}")
        data += chunk
    return data.decode(errors="replace").strip()


def stop_all(children: Sequence[Child]) -> None:
    """Stop every child, the last started first (the load before the proxies before their backends)."""
    for child in reversed(children):
        stop(child)


def stop(child: Child, timeout: float = 5.0) -> None:
    """Terminate, wait, kill: the process first, then any children it left behind (by PID)."""
    kids = children(child.pid) if child.alive() else []
    if child.alive():
        with contextlib.suppress(ProcessLookupError):
            child.proc.terminate()
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            child.proc.wait(timeout)
    deadline = time.monotonic() + timeout
    for pid in kids + child.extra_pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    if child.proc.stdout is not None:
        child.proc.stdout.close()


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"
