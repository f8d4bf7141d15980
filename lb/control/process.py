"""The `lb run` process around a `Balancer`: its event loop, its signals and its exit code.  [asyncio shell]

`run` (a single process, or the owner of `workers: N`) and `run_worker` (one of those workers) set up
logging and pick the event loop (uvloop when installed and `runtime.event_loop` allows), then `serve`:

- SIGTERM, SIGINT and SIGQUIT start `Balancer.stop`; a second SIGINT hurries it, a second SIGTERM is
  said once.  Their handlers are in place before the balancer binds, and a signal that came even
  earlier (held by `lb.startup_signals` since the first line of `lb run`) is acted on once it is up.
- SIGHUP reloads (`Balancer.request_reload`).  A worker reloads on its owner's word instead, from the
  `ConfigSource` the owner applied (its text and `${file:PATH}` contents, never the files).
- A start that cannot bind (`BindError`) is one line naming the address and exit code 2 (SPEC part 2),
  with nothing left listening; a stop is exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lb import startup_signals
from lb.config.load import ConfigSource
from lb.config.model import Config, EventLoop
from lb.control import signal_mask
from lb.control.balancer import Balancer, Role
from lb.control.ipc import split_limits
from lb.control.listening import BindError
from lb.control.worker_channel import watch_owner
from lb.descriptors import raise_descriptor_limit
from lb.log import setup_logging
from lb.log_stream import unblock_stderr
from lb.tls import bound_asyncio_reads

log = logging.getLogger(__name__)

EXIT_BIND = 2  # SPEC part 2: `lb run` with a port in use exits 2


async def serve(
    config: Config, config_path: Path | None, role: Role, control_fd: int = -1, share: tuple[int, int] = (0, 1),
    config_source: ConfigSource | None = None,
) -> int:
    balancer = Balancer(config, config_path, role=role, control_fd=control_fd, share=share,
                        config_source=config_source)
    # Out of the cyclic garbage collector's sight from here on: the modules, the first configuration and the
    # balancer's own state, some 60,000 objects that live as long as the process or are freed by reference
    # counting when a reload replaces them (no cycle holds them: 4 reloads renaming 3,000 backends left
    # nothing more to collect).  A full collection walks every object it tracks, with the GIL held, and
    # collections come at reloads and as the heap grows: without them 57-67 ms at 3,000 backends, 14-28 ms
    # with, in which no connection moves.  What start-up left as cyclic garbage is collected first: frozen,
    # it would be kept for good.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    await _start_thread_pools_refusing_signals(loop)
    # SIGTERM handlers before start(): one that arrives while we bind must stop us once we are up,
    # not be lost (as PID 1 in a container, a signal without a handler is dropped by the kernel).
    # A SIGHUP then is held by lb.startup_signals (since the first line of `lb run`) and applied below;
    # a SIGTERM held there before these handlers is acted on at once.
    stop_requested = asyncio.Event()

    def on_stop_signal(signum: int) -> None:
        if not balancer.stop_asked:
            balancer.stop_asked = True
            stop_requested.set()
        elif signum == signal.SIGINT:
            balancer.hurry()
        elif role is not Role.WORKER:  # a worker's hint would hurry that worker alone
            # Not a hurry: `pkill -f 'lb run'` reaches the workers, and their owner's SIGTERM then reaches
            # them too, a second one in the course of an ordinary stop.
            balancer.stop_repeated()

    # SIGQUIT too: nginx's graceful stop (its container image's STOPSIGNAL); Python's default for it ended
    # the process at once, every tunnel cut without its 1001.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    # Held since the first line of `lb run`: we stop once up.  A list, not a generator: every held stop
    # signal is taken (any() would leave the second one held).
    if any([startup_signals.take(signum) for signum in startup_signals.STOPS]):
        on_stop_signal(signal.SIGTERM)
    if startup_signals.take(signal.SIGINT):  # a worker's: its owner's second Ctrl-C, held while it started
        on_stop_signal(signal.SIGINT)
    for signum in startup_signals.UNUSED:
        loop.add_signal_handler(signum, _ignore_signal, signum)
    try:
        return await _serve_started(balancer, role, stop_requested)
    finally:
        _ignore_signals_from_now_on(loop)


async def _start_thread_pools_refusing_signals(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's thread pools never take a signal the balancer handles (lb.control.signal_mask).

    uvloop's is libuv's: four threads, all started by its first lookup (binding a listener makes one,
    even of an address) with the mask of the thread that made it, and they took signals for the life of
    the process; that first lookup is made here, under `held()`.  asyncio's default executor starts a
    thread as work comes (a backend or a health check named by host): each refuses them first.
    """
    loop.set_default_executor(ThreadPoolExecutor(initializer=signal_mask.refuse_in_this_thread))
    # Its answer does not matter, only the threads it starts: a resolver that fails it must not fail a start.
    with signal_mask.held(), contextlib.suppress(OSError):
        await loop.getaddrinfo("127.0.0.1", 0)


async def _serve_started(balancer: Balancer, role: Role, stop_requested: asyncio.Event) -> int:
    loop = asyncio.get_running_loop()
    try:
        await balancer.start()
    except BindError as exc:
        log.error("%s", exc)
        return EXIT_BIND
    if role is not Role.WORKER:
        loop.add_signal_handler(signal.SIGHUP, balancer.request_reload)
        if startup_signals.take():  # a SIGHUP came while we were starting: the file may have changed since
            balancer.request_reload()
    # A worker reloads when its owner says so, after the owner's own reload succeeded; a SIGHUP of its
    # own (`pkill -HUP -f 'lb run'` signals every process) stays held by lb.startup_signals and does
    # nothing.  Obeying it reloaded the worker twice, once outside the serialized reload loop.
    signalled = loop.create_task(stop_requested.wait())
    # A worker also stops when its owner goes away (balancer.stop() called from the control channel).
    stopped = loop.create_task(balancer.stopped())
    await asyncio.wait([signalled, stopped], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    stopped.cancel()
    await balancer.stop()
    return 0


def _ignore_signals_from_now_on(loop: asyncio.AbstractEventLoop) -> None:
    """The stop is over: nothing a signal could ask for is left to do, so each is ignored until the exit.

    Closing the event loop puts back the default action of every signal it handled (SIGINT: Python's
    KeyboardInterrupt), and the interpreter takes some 10 ms more to end: a second SIGTERM (`kill` twice,
    `pkill` reaching a worker its owner signals too), a SIGHUP from a config reloader or a logrotate's
    SIGUSR1 in that moment ended the process by that signal (exit 143, 129...) after a clean stop, which
    a service manager reports as a failure and an owner logs as a worker whose tunnels were cut.  Taken
    from the loop first, so that its close does not put the defaults back.  The loop's removal itself
    puts the default back until the next line, so they are held meanwhile: one that came in those
    microseconds still ended the stop (now and then, in a test that signals every 2 ms on a loaded
    machine), and is now discarded by the ignore that follows.
    """
    with signal_mask.held():
        for signum in signal_mask.HANDLED:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)


def _ignore_signal(signum: int) -> None:
    log.warning(
        "%s ignored: it has no meaning here (SIGHUP reloads, SIGTERM stops; logs go to stderr, so there is "
        "no file to reopen)", signal.Signals(signum).name,
    )


def _loop_runner(choice: EventLoop) -> Callable[[Coroutine[Any, Any, int]], int]:
    if choice is not EventLoop.ASYNCIO:
        try:
            import uvloop
        except ImportError:
            if choice is EventLoop.UVLOOP:
                raise
        else:
            return uvloop.run
    bound_asyncio_reads()
    return asyncio.run


def run(config: Config, config_path: Path | None = None, config_source: ConfigSource | None = None) -> int:
    """Run until SIGTERM/SIGINT/SIGQUIT; returns the process exit code.

    `config_source` is what `config` was parsed from: with `workers: N` the workers run it.
    """
    role = Role.OWNER if config.workers > 1 else Role.SINGLE
    unblock_stderr()  # a stalled log reader costs log lines, never the event loop
    # With workers, every line names its process: `owner` here, `worker-N` in each worker.
    setup_logging(config.logging, process="owner" if role is Role.OWNER else None)
    raise_descriptor_limit()  # workers inherit it
    return _loop_runner(config.runtime.event_loop)(serve(config, config_path, role, config_source=config_source))


def run_worker(config: Config, config_path: Path, control_fd: int, index: int, count: int = 1,
               owner_pid: int = 0) -> int:
    """One of `workers: N` processes, started by the owner; `count` is N, `owner_pid` the owner's pid."""
    watch_owner(owner_pid)
    unblock_stderr()
    setup_logging(config.logging, process=f"worker-{index}")
    share = (index, max(1, count))
    config = split_limits(config, *share)
    return _loop_runner(config.runtime.event_loop)(serve(config, config_path, Role.WORKER, control_fd, share))
