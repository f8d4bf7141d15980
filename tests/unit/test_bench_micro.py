"""The handshake micro-benchmarks still run (tiny counts): they are how handshake cost is compared.

In a subprocess each: bench.handshake_shell sets up logging as the balancer does, for the whole process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import instructions_live


@pytest.mark.parametrize("module", ["bench.handshake_core", "bench.handshake_shell"])
@pytest.mark.parametrize("check", [False, True])
def test_the_micro_benchmarks_run_whole_handshakes(module: str, check: bool) -> None:
    flags = ["--n", "20", "--repeat", "1"] + (["--check"] if check else [])
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert "µs per handshake" in done.stdout and ("check cookie" if check else "issue cookie") in done.stdout


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_instruction_count_per_handshake_and_by_function() -> None:
    """bench.instructions: two callgrind runs of the core bench, the difference per handshake (a few 100k);
    --by-function adds the bytecode loop's share and a table of C functions, per handshake.  One test for
    both: each pair of callgrind runs takes half a minute."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--core", "--n", "10", "60", "--by-function", "5"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    found = re.search(r"([\d,]+) instructions per handshake", lines[0])
    assert found is not None, done.stdout
    assert 50_000 < int(found.group(1).replace(",", "")) < 5_000_000
    assert re.search(r"bytecode loop \(_PyEval_EvalFrameDefault\): [\d,]+ \([\d.]+%\)", lines[1]), lines
    assert len(lines) == 7 and all(re.fullmatch(r"\s*-?[\d,]+\s+-?[\d.]+%  \S+:\S+", line) for line in lines[2:])



@pytest.mark.skipif(shutil.which("callgrind_control") is None,
                    reason="valgrind is not installed (apt-get install valgrind)")
def test_instruction_count_of_the_real_balancer_per_handshake() -> None:
    """bench.instructions_live: `lb run` under callgrind, counted over windows of real handshakes, less what
    it spends idle, with the simulated caches' misses (`--cache`).  Tiny windows: the counts are only held
    to be a plausible handshake's."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions_live", "--handshakes", "20", "--windows", "2", "--idle", "1",
         "--check", "--cache"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"idle: [\d,]+ instructions a second", lines[0]), lines
    assert re.fullmatch(r"windows: -?[\d,]+  -?[\d,]+", lines[1]), lines
    found = re.fullmatch(r"lb run: ([\d,]+) instructions per handshake \(check cookie, callgrind, median of 2 "
                         r"windows of 20\)", lines[2])
    assert found is not None, lines
    instructions = int(found.group(1).replace(",", ""))
    assert 50_000 < instructions < 5_000_000
    found = re.fullmatch(r"misses per handshake \(callgrind's simulated caches, median of the windows\): "
                         r"I1 (-?[\d,]+)  D1 (-?[\d,]+)", lines[3])
    assert found is not None, lines
    i1, d1 = (int(group.replace(",", "")) for group in found.groups())
    # Code and data a handshake runs through once are fetched anew (the warm-up runs them first): some
    # misses, and far fewer than the instructions.
    assert 100 < i1 < instructions // 4 and 100 < d1 < instructions // 4, lines


_DUMP = """\
version: 1
creator: callgrind-3.19.0
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
fn=(1) main
0 143099918 39444443 25771162 7174397 3368263 1034260 2338 1384 1533
summary: 143099918 39444443 25771162 7174397 3368263 1034260 2338 1384 1533
totals: 143099918 39444443 25771162 7174397 3368263 1034260 2338 1384 1533
"""


def test_a_dumps_events_are_read_by_name() -> None:
    """The summary line read against the events line: the instructions with or without the simulated caches,
    and the misses `--cache` prints summed from callgrind's events."""
    counts = instructions_live.summary(_DUMP)
    assert counts["Ir"] == 143_099_918 and counts["D1mw"] == 1_034_260 and len(counts) == 9
    assert instructions_live.misses(counts) == {"I1": 7_174_397, "D1": 3_368_263 + 1_034_260}
    plain = instructions_live.summary("events: Ir\nsummary: 100577052\ntotals: 100577052\n")
    assert plain == {"Ir": 100_577_052}
    with pytest.raises(RuntimeError, match="not simulated"):
        instructions_live.misses(plain)
    # callgrind leaves out a line's trailing zeros: an idle window may miss no line of the last level
    idle = instructions_live.summary(_DUMP.replace("7174397 3368263 1034260 2338 1384 1533\nt", "7174397 5\nt"))
    assert idle["I1mr"] == 7_174_397 and idle["D1mr"] == 5 and idle["D1mw"] == idle["DLmw"] == 0
    for broken in ("events: Ir\n", "summary: 1\n", "events: Dr\nsummary: 1\n", "events: Ir\nsummary: 1 2\n"):
        with pytest.raises(RuntimeError):
            instructions_live.summary(broken)


_ANNOTATED = """\
--------------------------------------------------------------------------------
1,904,149,241 (100.0%)  PROGRAM TOTALS
--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
192,913,484 (10.13%)  build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/lib/libpython3.11.so.1.0]
 85,204,861 ( 4.47%)  build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault [/lib/libpython3.11.so.1.0]
 20,691,822 ( 1.09%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memcpy_avx [/lib/libc.so.6]
      1,000 ( 0.00%)  ???:0x000000000001f0a0 [/lib/ld-linux-x86-64.so.2]
"""


def test_callgrind_annotate_lines_become_functions() -> None:
    """Paths cut to the file, recursion levels (`'2`) summed, the totals line left out."""
    from bench.instructions import by_function, functions

    found = functions(_ANNOTATED)
    assert found == {
        "ceval.c:_PyEval_EvalFrameDefault": 192_913_484 + 85_204_861,
        "memmove-vec-unaligned-erms.S:__memcpy_avx": 20_691_822,
        "???:0x000000000001f0a0": 1_000,
    }
    low = functions(_ANNOTATED.replace("20,691,822", "20,000,000"))
    assert by_function(low, found, 1000) == [
        ("memmove-vec-unaligned-erms.S:__memcpy_avx", 691.822),
        ("???:0x000000000001f0a0", 0.0),
        ("ceval.c:_PyEval_EvalFrameDefault", 0.0),
    ]


def test_the_shell_benchmark_runs_without_the_access_log() -> None:
    """--no-access-log: the shell as with `logging.access_log: false`, so the log's cost is a difference of two runs."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.handshake_shell", "--n", "20", "--repeat", "1", "--no-access-log"],
        capture_output=True, text=True, timeout=60, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    assert "core + shell + tunnel + no log:" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--core", "--no-access-log"],
        capture_output=True, text=True, timeout=60, cwd=root,
    )
    assert refused.returncode == 2 and "the pure core writes no log" in refused.stderr


@pytest.mark.parametrize(
    ("module", "rows", "unit"),
    [("bench.chunked", 7, r"[\d.]+ µs/unit"), ("bench.frames", 4, r"\d+ ns/frame")],
    ids=["chunked framer", "frame tracker"],
)
def test_the_framing_benchmarks_run(module: str, rows: int, unit: str) -> None:
    """`python -m bench.chunked` and `bench.frames` print one row per shape: CPU per MB and per unit."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", module, "--mb", "0.05"], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == rows and all(re.search(rf"[\d.]+ ms/MB +{unit}$", line) for line in lines), lines
