"""stderr as a log stream that may be full: lines dropped rather than waited for, and counted.

A log reader that stalls (a wedged log shipper, a container runtime's stream under pressure) filled
the pipe under stderr, and the next line's write(2) then blocked the event loop for as long as it
stalled: every client hung, the probes timed out, and SIGTERM could not be handled.  HAProxy (syslog
datagrams) and Envoy (a buffered access log) drop lines instead; so do we (`unblock_stderr`), and
say how many once a second (`report_dropped_lines`).  The access log's own writer (`lb.log`,
`lb/_logwrite.c`) drops a line whole or writes it whole; so does this module's handler, for the rest.

Not compiled (unlike `lb.log`): mypyc's build of a `logging.StreamHandler` subclass crashed the
interpreter at a garbage collection, and nothing here is on a handshake's path.
"""

from __future__ import annotations

import logging
import os
import stat
import sys

# Lines dropped since the last `report_dropped_lines` because stderr was full.
_dropped = 0


def note_dropped() -> None:
    global _dropped
    _dropped += 1


def unblock_stderr() -> None:
    """Make writes to stderr fail rather than wait when it is full, if it is a pipe or a socket.

    A pipe is opened anew (`/proc/self/fd/2`: the same pipe through a description of our own), so
    the non-blocking flag does not reach the process that gave it to us (a shell's `| tee`); a
    socket cannot be, and is set non-blocking as it is (journald's stream is ours alone).  A
    terminal or a file is left as it is: neither fills up for good.
    """
    global _unblocked
    try:
        mode = os.fstat(2).st_mode
        if stat.S_ISFIFO(mode):
            fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.dup2(fd, 2)  # inheritable, as stderr was
            os.close(fd)
            _unblocked = True
        elif stat.S_ISSOCK(mode):
            os.set_blocking(2, False)
            _unblocked = True
    except OSError:  # no /proc, a pipe with no reader left: stderr stays as it was
        return


_unblocked = False  # `unblock_stderr` made ours non-blocking (`restore_after_spawn` keeps it so)


def stderr_for_child() -> int | None:
    """A descriptor of stderr for a child process of its own, or None: the child inherits ours.

    libuv (uvloop's spawn) makes a child's stdio blocking before it runs, and a flag is the open
    description's, not the descriptor's: on the description the owner of workers shared with them,
    that undid `unblock_stderr`, and a full pipe then stopped the owner for good (its probes, health
    checks and SIGTERM with it) while the workers dropped lines as they should.  A pipe is opened anew
    (`/proc/self/fd/2`), so the child's flags are its own; the caller closes it once the child runs.
    A socket cannot be: `restore_after_spawn` sets ours again.
    """
    try:
        if stat.S_ISFIFO(os.fstat(2).st_mode):
            return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:  # no /proc (then ours was not made non-blocking either), no stderr: the child inherits ours
        return None
    return None


def restore_after_spawn() -> None:
    """Writes to our stderr fail rather than wait again after a child was spawned on a description
    shared with it (a socket: journald's stream), as `unblock_stderr` left them."""
    try:
        if _unblocked and stat.S_ISSOCK(os.fstat(2).st_mode):
            os.set_blocking(2, False)
    except OSError:
        return


def report_dropped_lines() -> None:
    """Log how many lines stderr's reader has missed since the last call, if any (every second)."""
    global _dropped
    dropped, _dropped = _dropped, 0
    if dropped:
        logging.getLogger("lb.log").warning("%d log line(s) dropped: stderr was full (its reader fell behind)",
                                            dropped)


class DroppingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose stream may be full (`unblock_stderr`): a line it cannot take is counted as
    dropped, not reported as a logging error (whose report would go to the same full stream)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BlockingIOError):
            note_dropped()
            return
        super().handleError(record)
