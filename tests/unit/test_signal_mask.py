"""`lb.control.signal_mask`: the end of a stop, and the balancer's threads, never meet a signal's default action."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from lb.control import signal_mask
from lb.control.daemon_thread import in_daemon_thread

# A loop whose removal of each handler is followed at once by that very signal: the moment the loop has
# put the default action back and the balancer has not yet ignored it, made certain instead of rare;
# after serve()'s start of the loop's thread pools, and a lookup that uses them.
_SIGNAL_IN_THE_GAP = textwrap.dedent("""
    import asyncio, os, sys
    from lb.control import process, signal_mask

    def loop_class():
        if sys.argv[1] == "uvloop":
            import uvloop
            return uvloop.Loop
        return asyncio.SelectorEventLoop

    class SignalledAsItLetsGo(loop_class()):
        def remove_signal_handler(self, sig):
            removed = super().remove_signal_handler(sig)
            os.kill(os.getpid(), sig)
            return removed

    async def serve_and_stop():
        loop = asyncio.get_running_loop()
        await process._start_thread_pools_refusing_signals(loop)
        # Threads of the loop's pools, as binding a listener and a backend named by host start them: the
        # kernel would hand the signal blocked on the main thread to one of them.
        await loop.getaddrinfo("localhost", 80)
        for signum in signal_mask.HANDLED:
            loop.add_signal_handler(signum, print, "handled")
        process._ignore_signals_from_now_on(loop)

    loop = SignalledAsItLetsGo()
    loop.run_until_complete(serve_and_stop())
    loop.close()
    print("exited cleanly")
""")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_signal_as_the_loop_lets_go_of_it_is_ignored_not_fatal(loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    done = subprocess.run([sys.executable, "-c", _SIGNAL_IN_THE_GAP, loop], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, "exited cleanly\n"), done.stderr


def _blocked_here() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


async def test_a_daemon_thread_never_takes_a_handled_signal() -> None:
    assert not _blocked_here() & set(signal_mask.HANDLED)
    assert set(signal_mask.HANDLED) <= await in_daemon_thread(_blocked_here, name="probe")
    assert not _blocked_here() & set(signal_mask.HANDLED)  # the caller's mask is as it was


def test_a_pool_thread_refuses_them_once_it_starts() -> None:
    with ThreadPoolExecutor(initializer=signal_mask.refuse_in_this_thread) as pool:
        assert set(signal_mask.HANDLED) <= pool.submit(_blocked_here).result(timeout=10)


def test_held_signals_arrive_when_the_block_ends() -> None:
    arrived: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: arrived.append(signum))
    try:
        with signal_mask.held():
            signal.raise_signal(signal.SIGUSR2)
            assert arrived == []
        assert arrived == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


async def test_a_resolver_that_fails_the_first_lookup_fails_no_start() -> None:
    """serve()'s first lookup is made for the threads it starts, not for its answer."""
    from lb.control import process

    class FailingResolver:
        executor: ThreadPoolExecutor | None = None

        def set_default_executor(self, executor: ThreadPoolExecutor) -> None:
            self.executor = executor

        async def getaddrinfo(self, *args: object) -> None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    loop = FailingResolver()
    await process._start_thread_pools_refusing_signals(loop)  # type: ignore[arg-type]
    assert loop.executor is not None
    loop.executor.shutdown()
    assert not _blocked_here() & set(signal_mask.HANDLED), "the main thread takes them again"
