"""Instructions per handshake: a handshake micro-benchmark under valgrind's callgrind, a count that holds still.

`python -m bench.instructions [--core] [--check] [--n LOW HIGH]` runs `bench.handshake_shell`
(with `--core`, `bench.handshake_core`) under `valgrind --tool=callgrind` twice, with LOW and
HIGH timed handshakes (500 and 2,500 by default), and prints the difference per handshake.
Start-up, imports and the first handshakes cost the same in both runs and cancel out, which
leaves the instructions our Python executes per handshake.

Why: on a shared VM, timings of a few µs move ±10 % from one minute to the next, so a change
worth 1-2 % cannot be seen in them. The instruction count repeats within about 0.2 %, so an
A/B of such a change is one run of this per tree. Instructions are not time: in the socket
benchmark the same code runs at about half the instructions per cycle it reaches here (the
kernel's work between callbacks leaves the caches cold). So this says whether a change does
less work; `make bench` says whether it is cheaper. Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.handshake_core import warmup_count

ROOT = Path(__file__).resolve().parents[1]
_COLLECTED = re.compile(r"Collected : (\d+)")


class NoValgrind(RuntimeError):
    """valgrind is not installed (Debian: `apt-get install valgrind`)."""


def handshakes_run(n: int) -> int:
    """How many handshakes one `--repeat 1` run of either micro-benchmark makes: first, warm-up, timed."""
    return 1 + warmup_count(n) + n


def count(module: str, n: int, flags: list[str], timeout: float = 600.0) -> int:
    """Instructions of one whole run of `module` with `n` timed handshakes (under callgrind)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise NoValgrind("valgrind is not installed (apt-get install valgrind)")
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-m", module, "--n", str(n), "--repeat", "1", *flags],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{module} under callgrind failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def per_handshake(module: str, low: int, high: int, flags: list[str]) -> float:
    """Instructions per handshake: the difference of two runs over the difference of their handshakes."""
    if not 0 < low < high:
        raise ValueError("need 0 < LOW < HIGH")
    extra = count(module, high, flags) - count(module, low, flags)
    return extra / (handshakes_run(high) - handshakes_run(low))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--core", action="store_true", help="the pure core (bench.handshake_core), not the shell")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--n", type=int, nargs=2, default=(500, 2500), metavar=("LOW", "HIGH"),
                        help="timed handshakes of the two runs (default 500 2500)")
    args = parser.parse_args(argv)
    module = "bench.handshake_core" if args.core else "bench.handshake_shell"
    flags = ["--check"] if args.check else []
    try:
        instructions = per_handshake(module, *args.n, flags)
    except NoValgrind as exc:
        print(exc, file=sys.stderr)
        return 2
    kind = "check cookie" if args.check else "issue cookie"
    print(f"{module}: {instructions:,.0f} instructions per handshake ({kind}, callgrind, {args.n[0]} vs {args.n[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
