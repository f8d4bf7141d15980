"""Signals before the event loop listens for them: remembered, never fatal.

SIGHUP's default action ends the process.  `lb run` installs its reload
handler only once the listeners are bound, so a SIGHUP in the first moments
(a config reloader sidecar that fires as the pod starts, an operator's
`kill -HUP` racing a restart) used to kill the balancer.  `hold()` runs first
thing in `lb run` and in each worker (`lb.__main__`, before the command line
and the configuration loader are imported: those take most of a start's first
few hundred milliseconds): from then on an early SIGHUP only sets a flag, and
`serve` asks for one reload after it has started (the file may have changed
since it was read).  In a worker it stays held for good: the owner tells its
workers when to reload.  Plain `signal.signal`, no asyncio: there is no loop yet.

SIGTERM (and SIGQUIT, which stops as it does) is held the same way: one that comes before `serve` handles it stops
the balancer as soon as it is up, with exit 0, as SPEC's SIGTERM does (its
default action was exit 143, and a worker the owner had just restarted was
"restarted" again).  SIGINT keeps its default: Ctrl-C at a terminal stops a
start at once.  Not in a worker: it has a session of its own, so a SIGINT there is its owner's
second Ctrl-C ("stop now", `Balancer.hurry`), held like SIGTERM until the worker is up (by its
default action, two Ctrl-Cs while workers started ended one with a traceback).

Whatever the signal mask `lb run` inherits, these signals (and SIGCHLD) are unblocked there, and an
inherited SIG_IGN of SIGCHLD is undone.

SIGUSR1 and SIGUSR2 mean nothing to the balancer, but their default action also
ends the process, and a logrotate `postrotate kill -USR1` written for another
daemon would be an outage.  `hold()` ignores them from the first line;
`lb.control.process.serve` then logs each one as a WARNING.
"""

from __future__ import annotations

import signal
from types import FrameType

_held: set[int] = set()  # signals that came while held, not yet taken

# Remembered, then acted on once serving.  SIGQUIT stops gracefully, as SIGTERM does (nginx's STOPSIGNAL):
# its default action dumped core, and as PID 1 in a container a signal without a handler is dropped.
HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT)
STOPS = (signal.SIGTERM, signal.SIGQUIT)  # the held signals that mean "stop once up"
UNUSED = (signal.SIGUSR1, signal.SIGUSR2)  # no meaning here; not fatal either


def _remember(signum: int, frame: FrameType | None) -> None:
    _held.add(signum)


def hold(*, worker: bool = False) -> None:
    """From now until the event loop takes them over, SIGHUP, SIGTERM and SIGQUIT (and SIGINT in a
    `worker`) are remembered instead of fatal.

    Idempotent: a second call (the command line's, after `lb.__main__`'s) keeps what came between.
    """
    for signum in (*HELD, signal.SIGINT) if worker else HELD:
        if signal.getsignal(signum) is not _remember:
            _held.discard(signum)
            signal.signal(signum, _remember)
    for signum in UNUSED:
        signal.signal(signum, signal.SIG_IGN)
    # Handled from here on, so delivered: a signal mask is inherited through fork and exec, and a parent
    # that blocks these (one that waits for its own signals with sigwait, a supervisor's thread) left
    # SIGTERM and SIGHUP pending for ever, and SIGCHLD, by which uvloop hears that a worker died, too:
    # a dead worker was never restarted, and the stop waited for it for ever.  HAProxy and nginx set
    # their own mask at start for the same reason.  One that came while blocked is taken now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*HELD, signal.SIGINT, signal.SIGCHLD, *UNUSED})
    # Ignored SIGCHLD is inherited too, and then the kernel reaps children itself: asyncio's child watcher
    # read each worker's end as "unknown child process, returncode 255", a kill or a clean stop alike.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def take(signum: int = signal.SIGHUP) -> bool:
    """Whether `signum` came while held (and forget it)."""
    if signum in _held:
        _held.discard(signum)
        return True
    return False
