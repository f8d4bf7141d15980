"""Where a handshake's CPU goes: `python -m bench.split [--rounds N] [--window S] [--check] [--no-strace] [--perf]`.

For the balancer, HAProxy (when installed) and the floor, in alternating windows of one run, as
`python -m bench` pins and loads them: the user and the system CPU per handshake (utime and stime
from /proc/PID/stat), then, unless `--no-strace` (or strace is not installed), the system calls
per handshake of each, counted by `strace -f -c` attached for one more, shorter window.  With
`--perf`, one more window each under `perf record -e cpu-clock` (a software clock: it works in a
VM without hardware counters) splits the CPU per handshake by the library it was spent in: the
kernel, the interpreter (libpython), our compiled code, uvloop, libc, the AEAD, the rest.

Why: `make bench` says how much more CPU a handshake costs than HAProxy's and the floor's; this
says whether the difference is our Python (user time) or the work we ask of the kernel (system
calls), which call for different fixes.  strace slows the traced process, so its window counts
calls and its timings are not used.  System calls are divided by the `connect` calls to the
backends (one per handshake for all three; a failed `accept4` also counts as a call).  Bench
code, never imported by `lb/`.

Why by library: user time alone cannot tell our compiled code from the interpreter work it calls
(allocations, dictionaries, attribute lookups all run in libpython), and the two call for different
fixes: cheaper code of ours, or none of our Python on the path at all.  perf's sampling slows the
process a little, so the shares are read, and the µs are the shares of that window's own CPU per
handshake.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs, runner
from bench.haproxy import find_haproxy
from bench.procs import BenchError, Child
from bench.runner import BALANCER, Plan, Run, Target


def parse_strace_summary(text: str) -> dict[str, int]:
    """System call name → calls, from the table `strace -c` writes (errors included in calls)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall; the total line and rules skipped.
        if len(fields) < 5 or not fields[0].replace(".", "", 1).isdigit() or fields[-1] == "total":
            continue
        with contextlib.suppress(ValueError):
            calls[fields[-1]] = int(fields[3])
    return calls


def per_handshake(calls: dict[str, int]) -> dict[str, float]:
    """Each call's count per handshake: per `connect` to a backend (one each), most first."""
    handshakes = calls.get("connect", 0)
    if not handshakes:
        return {}
    return dict(sorted(((name, count / handshakes) for name, count in calls.items()), key=lambda item: -item[1]))


# Each library a sample's address falls in, by the start of its name (perf's `dso`), in groups that
# say whose work it is.  First match wins; anything else is "other".
LIBRARY_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel", ("[kernel",)),
    ("interpreter (libpython)", ("libpython", "python3")),
    ("our compiled code", ("_native__mypyc", "_scan.", "_render.", "_token64.", "_logwrite.", "_coroutine.")),
    ("uvloop", ("loop.cpython",)),
    ("libc", ("libc.so", "libc-", "ld-linux")),
    ("AEAD (cryptography, OpenSSL)", ("_rust.abi3", "libcrypto", "libssl")),
    ("haproxy", ("haproxy",)),
)


def parse_perf_dso(text: str) -> dict[str, float]:
    """Library → percent of samples, from `perf report --sort dso --stdio -q -t ';'` (one `P%;dso` a line)."""
    shares: dict[str, float] = {}
    for line in text.splitlines():
        percent, separator, dso = line.partition(";")
        percent = percent.strip().rstrip("%")
        if not separator or not dso.strip():
            continue
        with contextlib.suppress(ValueError):
            shares[dso.strip()] = shares.get(dso.strip(), 0.0) + float(percent)
    return shares


def group_libraries(shares: dict[str, float]) -> dict[str, float]:
    """Percent by LIBRARY_GROUPS (and "other"), in that order, groups with no samples left out."""
    grouped = {name: 0.0 for name, _ in LIBRARY_GROUPS} | {"other": 0.0}
    for dso, percent in shares.items():
        name = next((group for group, starts in LIBRARY_GROUPS if dso.startswith(starts)), "other")
        grouped[name] += percent
    return {name: percent for name, percent in grouped.items() if percent > 0}


def _cpu_rounds(
    run: Run, targets: list[Target], rounds: int, window: float, check: bool
) -> dict[str, list[tuple[float, float]]]:
    """Per target, one (user µs, system µs) per handshake for each round."""
    split: dict[str, list[tuple[float, float]]] = {target.name: [] for target in targets}
    for index in range(rounds):
        for target in targets if index % 2 == 0 else targets[::-1]:
            before = procs.user_system_seconds(target.proxy_pids())
            spec = runner.handshake_spec(run.plan, target, window, check)
            result = runner._loadgen(run, spec, run.pinning.load, window + 60, target.name)
            after = procs.user_system_seconds(target.proxy_pids())
            user, system = after[0] - before[0], after[1] - before[1]
            # The window's CPU per handshake, split as the whole run (warm-up included) split it.
            total = runner.cpu_per_unit_us(result)
            share = user / (user + system) if user + system > 0 else 0.0
            split[target.name].append((total * share, total * (1 - share)))
            time.sleep(0.3)
        print(f"round {index + 1}: " + "  ".join(
            f"{name} {values[-1][0]:.0f} + {values[-1][1]:.0f} µs" for name, values in split.items()), flush=True)
    return split


def _window_attached(run: Run, target: Target, tool: list[str], check: bool, wait: float) -> dict[str, Any] | None:
    """One 3 s handshake window of `target` with `tool` (strace, perf record) attached to its processes.

    The tool writes what it gathered when interrupted, which it is at the end (given `wait` seconds).
    Returns the load generator's result.
    """
    command = list(tool)
    for pid in target.proxy_pids():
        command += ["-p", str(pid)]
    attached = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached before the first connection
        return runner._loadgen(run, runner.handshake_spec(run.plan, target, 3.0, check), run.pinning.load, 60,
                               target.name)
    finally:
        attached.send_signal(signal.SIGINT)
        try:
            attached.wait(wait)
        except subprocess.TimeoutExpired:
            attached.kill()
            attached.wait(5)


def _syscalls(run: Run, target: Target, strace: str, check: bool) -> dict[str, float]:
    """System calls per handshake of `target`, strace attached for one 3 s window."""
    out = run.log_dir / f"{target.name}.strace"
    _window_attached(run, target, [strace, "-f", "-c", "-o", str(out)], check, wait=10)
    return per_handshake(parse_strace_summary(out.read_text() if out.exists() else ""))


def _by_library(run: Run, target: Target, perf: str, check: bool) -> tuple[float, dict[str, float]]:
    """CPU µs per handshake of `target` in one 3 s window under `perf record`, and its µs by library group."""
    data = run.log_dir / f"{target.name}.perf"
    result = _window_attached(run, target, [perf, "record", "-q", "-e", "cpu-clock", "-F", "999", "-o", str(data)],
                              check, wait=20)
    per_handshake_us = runner.cpu_per_unit_us(result)
    report = subprocess.run([perf, "report", "-i", str(data), "--sort", "dso", "--stdio", "-q", "-t", ";"],
                            capture_output=True, text=True, timeout=120)
    grouped = group_libraries(parse_perf_dso(report.stdout))
    return per_handshake_us, {name: per_handshake_us * percent / 100 for name, percent in grouped.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per target and round")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--no-strace", action="store_true", help="skip the system call counts")
    parser.add_argument("--perf", action="store_true", help="also split the CPU by library (perf record)")
    args = parser.parse_args(argv)
    plan = Plan.make(False)
    procs.raise_nofile()
    strace = None if args.no_strace else shutil.which("strace")
    perf = shutil.which("perf") if args.perf else None
    if args.perf and perf is None:
        print("split: --perf needs perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lb-split-") as tmp:
        run = Run(plan, procs.choose_pinning(True), Path(tmp))
        children: list[Child] = []
        try:
            runner._start_backends(run, children)
            targets = [runner._start_balancer(run, children, BALANCER, cpus=run.pinning.proxy)]
            haproxy = find_haproxy()
            if haproxy is not None:
                targets.append(runner._start_haproxy(run, children, haproxy))
            targets.append(runner._start_floor(run, children))
            split = _cpu_rounds(run, targets, max(1, args.rounds), args.window, args.check)
            kind = "check" if args.check else "issue"
            print(f"\nCPU per handshake ({kind} a cookie), medians of {args.rounds} rounds, user + system:")
            for name, values in split.items():
                user = statistics.median(value[0] for value in values)
                system = statistics.median(value[1] for value in values)
                print(f"  {name:10s} {user:6.0f} + {system:6.0f} µs")
            if strace is None:
                print("\n(system calls not counted: strace is not installed, or --no-strace)")
            else:
                print("\nSystem calls per handshake (strace -f -c, one 3 s window each):")
                for target in targets:
                    calls = _syscalls(run, target, strace, args.check)
                    listed = "  ".join(f"{name} {count:.2f}" for name, count in calls.items() if count >= 0.05)
                    print(f"  {target.name:10s} {sum(calls.values()):5.1f}: {listed or 'none counted'}")
            if perf is not None:
                print("\nCPU per handshake by library (perf record -e cpu-clock, one 3 s window each, µs):")
                for target in targets:
                    total, groups = _by_library(run, target, perf, args.check)
                    listed = "  ".join(f"{name} {us:.0f}" for name, us in groups.items() if us >= 0.5)
                    print(f"  {target.name:10s} {total:5.0f}: {listed or 'no samples'}")
        except BenchError as exc:
            print(f"split failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all(children)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
