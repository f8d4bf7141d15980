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
"""

from __future__ import annotations

import signal
from types import FrameType

_requested = False


def _remember(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True


def hold() -> None:
    """From now until the event loop takes SIGHUP over, a SIGHUP is remembered instead of fatal."""
    global _requested
    _requested = False
    signal.signal(signal.SIGHUP, _remember)


def take() -> bool:
    """Whether a SIGHUP came while held (and forget it)."""
    global _requested
    requested, _requested = _requested, False
    return requested
