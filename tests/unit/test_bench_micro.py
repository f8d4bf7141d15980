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
    it spends idle.  Tiny windows: the count is only held to be a plausible handshake's."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions_live", "--handshakes", "20", "--windows", "2", "--idle", "1",
         "--check"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"idle: [\d,]+ instructions a second", lines[0]), lines
    assert re.fullmatch(r"windows: -?[\d,]+  -?[\d,]+", lines[1]), lines
    found = re.fullmatch(r"lb run: ([\d,]+) instructions per handshake \(check cookie, callgrind, median of 2 "
                         r"windows of 20\)", lines[2])
    assert found is not None, lines
    assert 50_000 < int(found.group(1).replace(",", "")) < 5_000_000


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
