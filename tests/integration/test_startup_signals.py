"""A SIGHUP while the balancer starts (a config reloader firing as the pod starts, an operator racing a
restart) is remembered and applied once it serves; it never kills the process (SIGHUP's default action).

The test waits until the process catches SIGHUP (`SigCgt` in /proc/PID/status) and then fires a burst
while it is still starting; a unit test in tests/unit covers the hold itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import UNIT, Balancer, DeadBackend, lb_config

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)


def catches_sighup(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((line for line in text.splitlines() if line.startswith("SigCgt:")), "SigCgt: 0")
    return bool(int(line.split()[1], 16) & SIGHUP_BIT)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see signal dispositions")
def test_sighup_burst_while_starting_is_survived_and_applied(tmp_path: Path) -> None:
    lb = Balancer(lb_config(pools={"gateways": [DeadBackend("dead-1")]}), tmp_path)
    lb.launch()
    try:
        assert lb.proc is not None
        deadline = time.monotonic() + 10 * UNIT
        while not catches_sighup(lb.proc.pid):
            assert lb.proc.poll() is None, f"exited with {lb.proc.returncode}:\n{lb.logs_tail()}"
            assert time.monotonic() < deadline, "the balancer never caught SIGHUP"
            time.sleep(0.005)
        for _ in range(10):
            os.kill(lb.proc.pid, signal.SIGHUP)
            time.sleep(0.01)
        lb.wait_ready()
        lb.assert_alive()
        deadline = time.monotonic() + 5 * UNIT
        while "reloaded" not in lb.log_text():
            assert time.monotonic() < deadline, f"the early SIGHUP was never applied:\n{lb.logs_tail()}"
            time.sleep(0.05)
        lb.assert_alive()
    finally:
        lb.stop()


def signals_caught(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in text.splitlines() if line.startswith("SigCgt:")), "SigCgt: 0")
    return int(line.split()[1], 16)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see signal dispositions")
def test_a_sigterm_as_soon_as_the_start_holds_signals_stops_it_with_exit_0(tmp_path: Path) -> None:
    """SPEC: SIGTERM → exit 0.  Fired the moment SIGHUP is caught (the hold, before the command line's
    imports), long before `serve` handles SIGTERM: its default action was exit 143 (-15)."""
    lb = Balancer(lb_config(pools={"gateways": [DeadBackend("dead-1")]}), tmp_path)
    lb.launch()
    try:
        assert lb.proc is not None
        deadline = time.monotonic() + 10 * UNIT
        while not signals_caught(lb.proc.pid) & SIGHUP_BIT:
            assert lb.proc.poll() is None, f"exited with {lb.proc.returncode}:\n{lb.logs_tail()}"
            assert time.monotonic() < deadline, "the balancer never caught SIGHUP"
            time.sleep(0.001)
        os.kill(lb.proc.pid, signal.SIGTERM)
        assert lb.proc.wait(timeout=30 * UNIT) == 0, lb.logs_tail()
    finally:
        lb.stop()
