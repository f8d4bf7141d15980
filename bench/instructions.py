"""Instructions per handshake: a handshake micro-benchmark under valgrind's callgrind, a count that holds still.

`python -m bench.instructions [--core] [--check] [--no-access-log] [--n LOW HIGH] [--by-function K]` runs
`bench.handshake_shell` (with `--core`, `bench.handshake_core`) under `valgrind --tool=callgrind`
twice, side by side, with LOW and HIGH timed handshakes (500 and 2,500 by default), and prints the difference
per handshake. Start-up, imports and the first handshakes cost the same in both runs and cancel
out, which leaves the instructions our Python executes per handshake. `--by-function K` also
prints the K C functions (of the interpreter, libc, the crypto library) that those instructions
are spent in, per handshake, from `callgrind_annotate`. The bytecode loop's share, with the frame
set-up around calls, is what compiling our Python could remove at best: the rest is work the
builtins do (string, dict and regex methods, allocation, the crypto), compiled or not.

Why: on a shared VM, timings of a few µs move ±10 % from one minute to the next, so a change
worth 1-2 % cannot be seen in them. The instruction count repeats within about 0.2 %, so an
A/B of such a change is one run of this per tree. Instructions are not time: in the socket
benchmark the same code runs at about half the instructions per cycle it reaches here (the
kernel's work between callbacks leaves the caches cold). So this says whether a change does
less work; `make bench` says whether it is cheaper. Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.handshake_core import warmup_count

ROOT = Path(__file__).resolve().parents[1]
_COLLECTED = re.compile(r"Collected : (\d+)")
# A callgrind_annotate function line: `1,234,567 ( 1.23%)  path/ceval.c:_PyEval_EvalFrameDefault'2 [/lib/...]`.
_FUNCTION_LINE = re.compile(r"\s*([\d,]+) \([ \d.%]+\)\s+(\S+?)(?:'\d+)?(?: \[.*\])?$")
BYTECODE_LOOP = "_PyEval_EvalFrameDefault"  # its lines inlined from headers are listed under those files


class NoValgrind(RuntimeError):
    """valgrind is not installed (Debian: `apt-get install valgrind`)."""


def handshakes_run(n: int) -> int:
    """How many handshakes one `--repeat 1` run of either micro-benchmark makes: first, warm-up, timed."""
    return 1 + warmup_count(n) + n


def count(module: str, n: int, flags: list[str], timeout: float = 600.0, profile: Path | None = None) -> int:
    """Instructions of one whole run of `module` with `n` timed handshakes (under callgrind).

    Args:
        profile: where callgrind writes its per-function profile (None: nowhere).
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise NoValgrind("valgrind is not installed (apt-get install valgrind)")
    done = subprocess.run(
        [valgrind, "--tool=callgrind", f"--callgrind-out-file={profile or '/dev/null'}",
         sys.executable, "-m", module, "--n", str(n), "--repeat", "1", *flags],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
        # One hash seed for both runs: a random one moves dictionaries' collisions, and with them
        # the start-up's count, by more than a few handshakes cost (the two runs' difference).
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{module} under callgrind failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def per_handshake(module: str, low: int, high: int, flags: list[str]) -> float:
    """Instructions per handshake: the difference of two runs over the difference of their handshakes."""
    if not 0 < low < high:
        raise ValueError("need 0 < LOW < HIGH")
    with ThreadPoolExecutor(2) as pool:  # side by side: each valgrind runs on one core
        low_count, high_count = pool.map(lambda n: count(module, n, flags), (low, high))
    return (high_count - low_count) / (handshakes_run(high) - handshakes_run(low))


def functions(annotated: str) -> Counter[str]:
    """Instructions by `file:function` in `callgrind_annotate` output (recursion levels summed, paths cut)."""
    found: Counter[str] = Counter()
    for line in annotated.splitlines():
        match = _FUNCTION_LINE.match(line)
        if match is not None and ":" in match.group(2):
            path, _, function = match.group(2).rpartition(":")
            found[f"{path.rpartition('/')[2]}:{function}"] += int(match.group(1).replace(",", ""))
    return found


def by_function(low: Counter[str], high: Counter[str], handshakes: int) -> list[tuple[str, float]]:
    """Per handshake and per function: what the longer run spent more, most first (then by name)."""
    extra = {name: (high[name] - low[name]) / handshakes for name in low.keys() | high.keys()}
    return sorted(extra.items(), key=lambda item: (-item[1], item[0]))


def profile_per_handshake(module: str, low: int, high: int, flags: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """As per_handshake, and the instructions per handshake of each C function (callgrind_annotate)."""
    if not 0 < low < high:
        raise ValueError("need 0 < LOW < HIGH")
    annotate = shutil.which("callgrind_annotate")
    if annotate is None:
        raise NoValgrind("callgrind_annotate is not installed (it comes with valgrind)")
    handshakes = handshakes_run(high) - handshakes_run(low)

    def run(n: int, tmp: str) -> tuple[int, Counter[str]]:
        profile = Path(tmp) / f"callgrind.{n}"
        total = count(module, n, flags, profile=profile)
        done = subprocess.run([annotate, "--threshold=100", str(profile)],
                              capture_output=True, text=True, timeout=300, check=True)
        return total, functions(done.stdout)

    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp, ThreadPoolExecutor(2) as pool:
        (low_total, low_table), (high_total, high_table) = pool.map(lambda n: run(n, tmp), (low, high))
    return (high_total - low_total) / handshakes, by_function(low_table, high_table, handshakes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--core", action="store_true", help="the pure core (bench.handshake_core), not the shell")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--n", type=int, nargs=2, default=(500, 2500), metavar=("LOW", "HIGH"),
                        help="timed handshakes of the two runs (default 500 2500)")
    parser.add_argument("--by-function", type=int, default=0, metavar="K",
                        help="also print the K C functions most of them are spent in")
    parser.add_argument("--no-access-log", action="store_true",
                        help="the shell with logging.access_log: false (the difference is what the log costs)")
    args = parser.parse_args(argv)
    if args.core and args.no_access_log:
        parser.error("--no-access-log is for the shell: the pure core writes no log")
    module = "bench.handshake_core" if args.core else "bench.handshake_shell"
    flags = (["--check"] if args.check else []) + (["--no-access-log"] if args.no_access_log else [])
    table: list[tuple[str, float]] = []
    try:
        if args.by_function > 0:
            instructions, table = profile_per_handshake(module, *args.n, flags)
        else:
            instructions = per_handshake(module, *args.n, flags)
    except NoValgrind as exc:
        print(exc, file=sys.stderr)
        return 2
    kind = ("check cookie" if args.check else "issue cookie") + (", no access log" if args.no_access_log else "")
    print(f"{module}: {instructions:,.0f} instructions per handshake ({kind}, callgrind, {args.n[0]} vs {args.n[1]})")
    if table:
        loop = sum(spent for name, spent in table if name.endswith(f":{BYTECODE_LOOP}"))
        print(f"the bytecode loop ({BYTECODE_LOOP}): {loop:,.0f} ({loop / instructions:.1%}) per handshake")
        for name, spent in table[: args.by_function]:
            print(f"{spent:12,.0f} {spent / instructions:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
