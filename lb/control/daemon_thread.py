"""Blocking work off the event loop on a daemon thread of its own.  [asyncio shell]

`asyncio.to_thread` runs on the loop's default executor, whose threads
`asyncio.run` joins at exit: a SIGTERM that came while a reload was checking
a large file (seconds, minutes for a hostile one) logged `stopped` and then
held the exit until the check ended, past a Kubernetes grace period into its
SIGKILL.  A daemon thread ends with the process, and a query waiting out its
timeout holds up nothing else (a reload's parse shared the executor with them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from lb.control import signal_mask

T = TypeVar("T")


async def in_daemon_thread(func: Callable[[], T], name: str) -> T:
    """`func()` on a new daemon thread; cancelling returns at once (the thread runs on, its result dropped).

    Raises RuntimeError when no thread can be started (a cgroup's pids.max), and whatever `func` raised.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = func()
        except BaseException as exc:  # handed to the awaiting task as it is
            outcome: Callable[[], None] = functools.partial(_settle_error, done, exc)
        else:
            outcome = functools.partial(_settle, done, result)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(outcome)

    with signal_mask.held():  # inherited: a stop's last moment must not meet a signal here
        threading.Thread(target=run, name=name, daemon=True).start()
    return await done


def _settle(done: asyncio.Future[T], result: T) -> None:
    if not done.done():  # not cancelled meanwhile
        done.set_result(result)


def _settle_error(done: asyncio.Future[T], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
