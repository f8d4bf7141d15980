"""Instructions per handshake of the real balancer: `lb run` under callgrind, real sockets, uvloop.

`python -m bench.instructions_live [--floor] [--check] [--cache] [--handshakes N] [--windows W] [--idle S]
[--profile FILE]`
starts three echo gateways and the balancer on the benchmark's configuration (`bench.runner`),
the balancer under `valgrind --tool=callgrind --instr-atstart=no`, so that start-up runs
uncounted.  `--floor` counts `bench.floor` instead: what the runtime alone costs a handshake.
After a warm-up it turns counting on (`callgrind_control`) and measures:

- an idle window of S seconds: what the balancer spends with no client (health checks, its
  once-a-second ticks), as instructions per second;
- W windows of N sequential handshakes each (connect, upgrade, the gateway's hello, hang up),
  each less the idle rate times its length.

It prints each window's instructions per handshake and their median.  `--profile FILE` keeps the
last window's callgrind profile (for `callgrind_annotate FILE`: its counts are that window's N
handshakes and what the balancer did idle meanwhile).

`--cache` also simulates the caches (`--cache-sim=yes`) and prints the misses per handshake, counted
as the instructions are: first-level instruction misses (I1) and data misses (D1, reads and writes).
The last level, sized as this machine's, holds every line a handshake touches: its misses, about
none, are not printed.  Why count misses: a handshake's time is not its instructions alone.  Code
run once per handshake is fetched from beyond the first-level cache each time, and compiled code
takes more room than the interpreter's loop that runs the floor's Python (`bench/HISTORY.md`,
"Misses as well as instructions").  The simulation is valgrind's model of a core with nothing else
on it (not the kernel's code, not a neighbour's), so it counts the footprint, not the time, and
holds still as the instructions do.

Why, beside `bench.instructions`: that one counts `bench.handshake_shell`, where a stand-in loop
delivers bytes to the shell, which is steady to 0.2 % but cannot see what the real loop and its
transports cost: uvloop's calls, the backend connect's coroutine, the accept, the writes.  This
one counts all the user-space work of a real handshake (not the kernel's), less steadily (the
idle rate is subtracted, not cancelled), so it is what a change to how the shell talks to the
loop is judged by.  Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from bench import procs, runner
from bench.wire import HEAD_END, client_request, status_code

_EVENTS = re.compile(r"^events: (.+)$", re.MULTILINE)
_SUMMARY = re.compile(r"^summary: ([\d ]+)$", re.MULTILINE)
# The misses `--cache` prints, each a sum of callgrind's events (`--cache-sim=yes`).
MISSES: dict[str, tuple[str, ...]] = {"I1": ("I1mr",), "D1": ("D1mr", "D1mw")}
READY_WITHIN = 300.0  # seconds: start-up under valgrind, uncounted but slow
SETTLE = 0.3  # seconds after the last handshake of a window, for its tunnel's end to be counted in it


class NoValgrind(RuntimeError):
    """valgrind (with callgrind_control) is not installed (Debian: `apt-get install valgrind`)."""


def handshake(address: tuple[str, int], cookie: str | None) -> None:
    """One handshake, done at the hello; then hang up and wait for the balancer to close (its
    tunnel's end, and its log line, fall in the window)."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(client_request(f"{address[0]}:{address[1]}", "/ws", cookie))
        data = b""
        while HEAD_END not in data or len(data) < data.index(HEAD_END) + len(HEAD_END) + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the balancer hung up mid-handshake: {data[:200]!r}")
            data += chunk
        if status_code(data) != 101:
            raise RuntimeError(f"not upgraded: {data[:200]!r}")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def first_cookie(address: tuple[str, int]) -> str:
    """The affinity cookie (`name=value`) a first handshake is given."""
    _status, _hello, cookies = runner.probe(address)
    if not cookies:
        raise RuntimeError("the balancer set no cookie")
    return cookies[0].split(";", 1)[0]


def summary(text: str) -> dict[str, int]:
    """Each event a callgrind dump counted (`Ir`, the instructions, always; the cache's with
    `--cache-sim=yes`), by its name on the dump's `events:` line."""
    names, found = _EVENTS.search(text), _SUMMARY.search(text)
    if names is None or found is None:
        raise RuntimeError("no events or summary line in the callgrind dump")
    events, values = names.group(1).split(), [int(count) for count in found.group(1).split()]
    if len(values) > len(events):
        raise RuntimeError(f"the callgrind dump's summary has {len(values)} counts for {len(events)} events")
    # callgrind leaves out the zeros that end a line of counts (an idle floor misses no last-level line)
    counts = dict(zip(events, values + [0] * (len(events) - len(values)), strict=True))
    if "Ir" not in counts:
        raise RuntimeError(f"the callgrind dump counted no instructions: {sorted(counts)}")
    return counts


def misses(counts: Mapping[str, float]) -> dict[str, float]:
    """`MISSES` from a dump's (or a window's per-handshake) events, which must include the simulated caches'."""
    absent = [event for events in MISSES.values() for event in events if event not in counts]
    if absent:
        raise RuntimeError(f"the caches were not simulated (no {', '.join(absent)}): --cache-sim=yes")
    return {name: sum(counts[event] for event in events) for name, events in MISSES.items()}


class Counted:
    """The balancer under callgrind: windows counted by dumping (a dump also zeroes the counts)."""

    def __init__(self, control: str, pid: int, out: Path) -> None:
        self._control = control
        self._pid = pid
        self._out = out
        self._dumps = 0

    def _call(self, *args: str) -> None:
        subprocess.run([self._control, *args, str(self._pid)], capture_output=True, text=True, timeout=120,
                       check=True)

    def start(self) -> None:
        self._call("--instr=on")
        self._call("--zero")

    def dump(self, keep: Path | None = None) -> dict[str, int]:
        """Events (`summary`) since the last dump (or start); the profile is copied to `keep`, if given."""
        self._dumps += 1
        self._call(f"--dump=window {self._dumps}")
        profile = self._out.with_name(f"{self._out.name}.{self._dumps}")
        if keep is not None:
            shutil.copyfile(profile, keep)
        return summary(profile.read_text(errors="replace"))


def measure(
    handshakes: int, windows: int, idle: float, check: bool, profile: Path | None = None, floor: bool = False,
    cache: bool = False,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(idle events per second, events per handshake of each window), by callgrind's event name (`Ir`,
    the instructions; with `cache`, the simulated caches' too)."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise NoValgrind("valgrind is not installed (apt-get install valgrind)")
    children: list[procs.Child] = []
    with tempfile.TemporaryDirectory(prefix="instructions-live-") as tmp:
        log_dir = Path(tmp)
        try:
            backends = []
            for index in range(1, runner.BACKENDS + 1):
                name = f"gw-{index}"
                children.append(procs.start(name, procs.python_module("bench.echo_server", "--port", "0", "--id", name),
                                            log_dir, stdout_pipe=True))
            for child in children:
                backends.append((child.name, *procs.read_address(child, time.monotonic() + 30)))
            out = log_dir / "callgrind.out"
            counting = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                        *(["--cache-sim=yes"] if cache else [])]
            if floor:
                listed = ",".join(f"{host}:{backend_port}" for _, host, backend_port in backends)
                target = procs.start("floor", [*counting, *procs.python_module(
                    "bench.floor", "--port", "0", "--backends", listed)], log_dir, stdout_pipe=True)
                children.append(target)
                address = procs.read_address(target, time.monotonic() + READY_WITHIN)
            else:
                port, admin_port = procs.free_port(), procs.free_port()
                config = log_dir / "balancer.yaml"
                config.write_text(yaml.safe_dump(runner.balancer_config(backends, port, admin_port), sort_keys=False))
                target = procs.start("balancer", [
                    *counting, *procs.python_module("lb", "run", "--config", str(config))], log_dir)
                children.append(target)
                address = (procs.HOST, port)
            _wait_upgrading(address, target)
            cookie = first_cookie(address) if check else None
            for _ in range(100):  # warm: caches filled, every code path taken once
                handshake(address, cookie)
            counted = Counted(control, target.pid, out)
            counted.start()
            began = time.monotonic()
            time.sleep(idle)
            seconds = time.monotonic() - began
            idle_rate = {event: count / seconds for event, count in counted.dump().items()}
            per_window = []
            for window in range(windows):
                began = time.monotonic()
                for _ in range(handshakes):
                    handshake(address, cookie)
                time.sleep(SETTLE)
                spent = counted.dump(profile if window == windows - 1 else None)
                seconds = time.monotonic() - began
                per_window.append({event: (count - idle_rate[event] * seconds) / handshakes
                                   for event, count in spent.items()})
            return idle_rate, per_window
        finally:
            procs.stop_all(children)


def _wait_upgrading(address: tuple[str, int], target: procs.Child) -> None:
    deadline = time.monotonic() + READY_WITHIN
    while time.monotonic() < deadline:
        if not target.alive():
            raise RuntimeError(f"{target.name} exited: {target.log_path.read_text()[-2000:]}")
        try:
            if runner.probe(address)[0] == 101:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{target.name} did not upgrade a handshake within {READY_WITHIN:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions_live", description=__doc__.splitlines()[0])
    parser.add_argument("--floor", action="store_true", help="count bench.floor, not the balancer")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--handshakes", type=int, default=1000, metavar="N", help="handshakes a window (1000)")
    parser.add_argument("--windows", type=int, default=3, metavar="W", help="windows counted (3)")
    parser.add_argument("--idle", type=float, default=5.0, metavar="S", help="seconds of the idle window (5)")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="keep the last window's callgrind profile")
    parser.add_argument("--cache", action="store_true", help="also count the simulated caches' misses")
    args = parser.parse_args(argv)
    if args.handshakes < 1 or args.windows < 1 or args.idle <= 0:
        parser.error("need N >= 1, W >= 1 and S > 0")
    if args.floor and args.check:
        parser.error("--check is for the balancer: the floor checks no cookie")
    try:
        idle_rate, per_window = measure(args.handshakes, args.windows, args.idle, args.check, args.profile,
                                        args.floor, args.cache)
    except NoValgrind as exc:
        print(exc, file=sys.stderr)
        return 2
    kind = "check cookie" if args.check else "issue cookie"
    instructions = [window["Ir"] for window in per_window]
    print(f"idle: {idle_rate['Ir']:,.0f} instructions a second")
    print("windows: " + "  ".join(f"{value:,.0f}" for value in instructions))
    print(f"{'bench.floor' if args.floor else 'lb run'}: {statistics.median(instructions):,.0f} instructions per "
          f"handshake ({kind}, callgrind, "
          f"median of {args.windows} windows of {args.handshakes})")
    if args.cache:
        each = [misses(window) for window in per_window]
        medians = {name: statistics.median(window[name] for window in each) for name in MISSES}
        print("misses per handshake (callgrind's simulated caches, median of the windows): "
              + "  ".join(f"{name} {value:,.0f}" for name, value in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
