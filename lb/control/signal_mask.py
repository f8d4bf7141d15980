"""Which threads, and which moments, may take the signals `lb run` handles.  [I/O: signal masks]

A signal sent to the process goes to any one of its threads that does not block it.  While its action
is a handler, which one does not matter: the handler only notes it, and the event loop wakes and acts on
the main thread.  It matters in a moment when the action is the default one, which ends the process:
letting go of the event loop's handlers at the end of a stop (see `lb.control.process`).  Held back
there on the main thread, and for good on every other thread (the balancer's own and its event loop's
pools), a signal waits for the action that follows instead of meeting the default.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from lb import startup_signals

# Every signal `lb.control.process.serve` handles on the loop, those lb.startup_signals holds until then
# (SIGINT too: a worker's): their default actions end the process.
HANDLED = (*startup_signals.HELD, signal.SIGINT, *startup_signals.UNUSED)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The handled signals wait (pending, on this thread) until the block ends, then arrive.

    A thread started meanwhile inherits the mask: it never takes them.  One whose action turned to
    ignore meanwhile is discarded, as POSIX says of a pending signal.  The end puts back the mask the
    start found, so two blocks that interleave across awaits would leave these blocked for good: one
    spans an await only where nothing else runs yet (`serve`'s start).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def refuse_in_this_thread() -> None:
    """This thread never takes a handled signal: the kernel gives each to a thread that does.

    For a pool's threads (`ThreadPoolExecutor(initializer=...)`), which their pool starts when work
    comes, not under `held()`.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
