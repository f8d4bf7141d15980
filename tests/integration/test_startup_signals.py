"""A SIGHUP while the balancer starts (a config reloader firing as the pod starts, an operator racing a
restart) is remembered and applied once it serves; it never kills the process (SIGHUP's default action).

The test waits until the process catches SIGHUP (`SigCgt` in /proc/PID/status) and then fires a burst
while it is still starting; a unit test in tests/unit covers the hold itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import BALANCER_READY, UNIT
from tests.harness.ops import catches, worker_pids
from tests.harness.processes import Balancer, DeadBackend, child_env, lb_config, poll_while_running


@contextlib.contextmanager
def catching_sighup(tmp_path: Path, *, every: float) -> Iterator[Balancer]:
    """A balancer over a dead backend, handed over the moment it catches SIGHUP (looked at every `every`
    seconds), long before it serves; stopped by PID on the way out."""
    lb = Balancer(lb_config(pools={"gateways": [DeadBackend("dead-1")]}), tmp_path)
    lb.launch()
    try:
        assert lb.proc is not None
        pid = lb.proc.pid
        poll_while_running(
            lb.proc, lambda: catches(pid, signal.SIGHUP), within=10 * UNIT, every=every,
            who="the balancer", what="never caught SIGHUP", tail=lb.logs_tail,
        )
        yield lb
    finally:
        lb.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see signal dispositions")
def test_sighup_burst_while_starting_is_survived_and_applied(tmp_path: Path) -> None:
    """SPEC reload: SIGHUPs while the balancer is still starting neither kill it nor get lost: the reload is applied
    once it runs."""
    with catching_sighup(tmp_path, every=0.005) as lb:
        assert lb.proc is not None
        for _ in range(10):
            os.kill(lb.proc.pid, signal.SIGHUP)
            time.sleep(0.01)
        lb.wait_ready()
        lb.assert_alive()
        lb.wait_logged(lambda text: "reloaded" in text, within=5 * UNIT, what="the early SIGHUP was never applied")
        lb.assert_alive()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see signal dispositions")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT], ids=["SIGTERM", "SIGQUIT"])
def test_a_stop_signal_as_soon_as_the_start_holds_signals_stops_it_with_exit_0(tmp_path: Path, signum: int) -> None:
    """SPEC: SIGTERM → exit 0, and README's SIGQUIT (nginx's graceful stop) the same.  Fired the moment
    SIGHUP is caught (the hold, before the command line's imports), long before `serve` handles them:
    SIGTERM's default action was exit 143 (-15), SIGQUIT's a core dump (-3)."""
    with catching_sighup(tmp_path, every=0.001) as lb:
        assert lb.proc is not None
        os.kill(lb.proc.pid, signum)
        assert lb.proc.wait(timeout=30 * UNIT) == 0, lb.logs_tail()



_INTERRUPTED_IMPORT = """
import sys

class Interrupt:  # Ctrl-C landing while `lb.cli` (and all it imports) is still being imported
    def find_spec(self, name, path, target=None):
        if name == "lb.cli":
            raise KeyboardInterrupt

import lb  # first: with LB_PURE_PYTHON=1 it puts its own finder at the head of sys.meta_path
sys.meta_path.insert(0, Interrupt())
sys.argv = ["lb", "run", "--config", "unread.yaml"]
from lb.__main__ import main
raise SystemExit(main())
"""


def test_ctrl_c_while_the_command_line_loads_ends_by_sigint_without_a_traceback() -> None:
    """SIGINT keeps its default while starting (Ctrl-C stops a start at once), but one that landed while
    `lb.cli` was still being imported printed a KeyboardInterrupt traceback of 20-30 lines."""
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT], capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGINT, done
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


class _StartedWithoutStdin(Balancer):
    """`lb run ... <&-`, as a service script or `nohup ... <&-` starts it: descriptor 0 closed."""

    def command(self) -> list[str]:
        return ["bash", "-c", 'exec "$0" "$@" <&-', *super().command()]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_without_descriptor_0_serves_and_stops_with_exit_0(tmp_path: Path, workers: int) -> None:
    """The event loop's descriptor took the free 0, and libuv aborts on it: every stop dumped core (exit -6),
    and with workers: 2 every worker died at its start, for ever (never ready).  /dev/null fills the gap."""
    config = lb_config(pools={"gateways": [DeadBackend("dead-1")]}, overrides={"workers": workers})
    lb = _StartedWithoutStdin(config, tmp_path)
    lb.launch()
    try:
        lb.wait_ready()
        lb.assert_alive()
        assert "exited with" not in lb.log_text(), lb.logs_tail()
    finally:
        code = lb.stop()
    assert code == 0, lb.logs_tail()


# A parent that blocks signals (one that waits for its own with sigwait) and then starts `lb run`: the mask
# goes through fork and exec.
_SIGNALS_BLOCKED = """
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
"""


class _ExecdByParent(Balancer):
    """`lb run` exec'd by a Python parent that first runs `prelude` (with `os`, `signal` and `sys` imported):
    what that sets on the process (a signal mask, an ignored signal, a pending one) goes through exec."""

    def __init__(self, config: dict[str, Any], workdir: Path, prelude: str) -> None:
        super().__init__(config, workdir)
        self.prelude = prelude

    def command(self) -> list[str]:
        script = f"import os, signal, sys\n{self.prelude}\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
        return [sys.executable, "-c", script, *super().command()[1:]]


@pytest.mark.parametrize("workers", [1, 2])
def test_signals_blocked_by_the_parent_still_reload_restart_and_stop(tmp_path: Path, workers: int) -> None:
    """A signal mask inherited from the parent left SIGHUP and SIGTERM pending for ever (no reload, no
    stop), and SIGCHLD too, so that a dead worker was neither seen nor restarted.  `lb run` unblocks
    the signals it handles."""
    config = lb_config(pools={"gateways": [DeadBackend("dead-1")]}, overrides={"workers": workers})
    lb = _ExecdByParent(config, tmp_path, _SIGNALS_BLOCKED)
    lb.launch()
    try:
        lb.wait_ready()
        assert lb.proc is not None
        os.kill(lb.proc.pid, signal.SIGHUP)
        _wait_for_line(lb, "reloaded configuration")
        if workers > 1:
            owner = lb.proc.pid
            first = min(worker_pids(owner))
            os.kill(first, signal.SIGKILL)
            _wait_for_line(lb, f"(pid {first}) exited with -9")
            poll_while_running(lb.proc, lambda: len(set(worker_pids(owner)) - {first}) >= 2, within=BALANCER_READY,
                               who="the owner", what="a replacement for the killed worker", tail=lb.logs_tail)
        lb.proc.send_signal(signal.SIGTERM)
        code = lb.proc.wait(timeout=10 * UNIT)
    finally:
        lb.stop()
    assert code == 0, lb.logs_tail()


def _wait_for_line(lb: Balancer, text: str) -> None:
    lb.wait_logged(lambda logged: text in logged, within=5 * UNIT, what=f"a line with {text!r}")


# A parent that ignores SIGCHLD (a shell's `trap '' CHLD`, a daemon that reaps nothing) and then starts `lb run`.
_SIGCHLD_IGNORED = "signal.signal(signal.SIGCHLD, signal.SIG_IGN)"


def test_sigchld_ignored_by_the_parent_still_tells_how_each_worker_ended(tmp_path: Path) -> None:
    """An ignored SIGCHLD goes through exec, and the kernel then reaps the workers itself: on asyncio's
    event loop the owner read every worker's end as exit 255 ('unknown child process'), a SIGKILL and a
    clean stop alike, and said at every stop that their tunnels were cut."""
    overrides = {"workers": 2, "runtime": {"event_loop": "asyncio"}}
    lb = _ExecdByParent(lb_config(pools={"gateways": [DeadBackend("dead-1")]}, overrides=overrides), tmp_path,
                        _SIGCHLD_IGNORED)
    lb.launch()
    try:
        lb.wait_ready()
        assert lb.proc is not None
        first = min(worker_pids(lb.proc.pid))
        os.kill(first, signal.SIGKILL)
        _wait_for_line(lb, f"(pid {first}) exited with")
        # Its replacement listens: a restart's delay and a whole start.
        lb.wait_logged(lambda logged: logged.count("lb.control.listening: listening on") >= 3,
                       within=BALANCER_READY, what="the replacement listening")
    finally:
        code = lb.stop()
    assert code == 0, lb.logs_tail()
    log = lb.log_text()
    assert f"(pid {first}) exited with -9" in log, lb.logs_tail()
    assert "Unknown child process" not in log and "while stopping" not in log, lb.logs_tail()


# The same parent with a Ctrl-C of its own still pending in that mask when it starts `lb run`.
_SIGINT_PENDING = """
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
os.kill(os.getpid(), signal.SIGINT)
"""


def test_a_sigint_pending_in_the_inherited_mask_stops_the_start_without_a_traceback(tmp_path: Path) -> None:
    """Unblocked at the start, a SIGINT the parent's mask held is a Ctrl-C while `lb run` loads: it ends by
    SIGINT, as any other then does, without a KeyboardInterrupt traceback."""
    lb = _ExecdByParent(lb_config(pools={"gateways": [DeadBackend("dead-1")]}), tmp_path, _SIGINT_PENDING)
    lb.config_path.write_text(yaml.safe_dump(lb.config))
    done = subprocess.run(lb.command(), capture_output=True, text=True, timeout=30, env=child_env(), cwd=lb.cwd)
    assert done.returncode == -signal.SIGINT, done
    assert "Traceback" not in done.stderr, done.stderr
