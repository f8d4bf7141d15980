"""SIGHUP before the event loop listens for it: remembered, never fatal.

SIGHUP's default action ends the process.  `lb run` installs its reload
handler only once the listeners are bound, so a SIGHUP in the first moments
(a config reloader sidecar that fires as the pod starts, an operator's
`kill -HUP` racing a restart) used to kill the balancer.  `hold()` runs first
thing in `lb run` (and in each worker): from then on an early SIGHUP only sets
a flag, and `serve` asks for one reload after it has started (the file may
have changed since it was read).  In a worker it stays held for good: the
owner tells its workers when to reload.  Plain `signal.signal`, no asyncio: there is
no loop yet.

SIGUSR1 and SIGUSR2 mean nothing to the balancer, but their default action also
ends the process, and a logrotate `postrotate kill -USR1` written for another
daemon would be an outage.  `hold()` ignores them from the first line;
`lb.control.balancer.serve` then logs each one as a WARNING.
"""

from __future__ import annotations

import signal
from types import FrameType

_requested = False

UNUSED = (signal.SIGUSR1, signal.SIGUSR2)  # no meaning here; not fatal either


def _remember(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True


def hold() -> None:
    """From now until the event loop takes SIGHUP over, a SIGHUP is remembered instead of fatal."""
    global _requested
    _requested = False
    signal.signal(signal.SIGHUP, _remember)
    for signum in UNUSED:
        signal.signal(signum, signal.SIG_IGN)


def take() -> bool:
    """Whether a SIGHUP came while held (and forget it)."""
    global _requested
    requested, _requested = _requested, False
    return requested
