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
def test_instruction_count_per_handshake() -> None:
    """bench.instructions: two callgrind runs of the core bench, the difference per handshake (a few 100k)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--core", "--n", "4", "24"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    found = re.search(r"([\d,]+) instructions per handshake", done.stdout)
    assert found is not None, done.stdout
    assert 50_000 < int(found.group(1).replace(",", "")) < 5_000_000
