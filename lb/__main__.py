"""`python -m lb` and the `lb` command: the signals a start must survive are held first, then the command line runs.

`lb run` and `lb worker` call `lb.startup_signals.hold()` here, before `lb.cli` and what it
imports (the configuration loader, YAML, the compiled data plane): a SIGHUP or SIGTERM in those
first few hundred milliseconds would otherwise meet its default action, the end of the process.
What comes before `hold()` is kept to `import lb` (cheap on purpose: see its docstring) and the
`signal` module; only the interpreter's own start comes earlier.
"""

from __future__ import annotations

import sys

from lb import startup_signals

_STARTS = ("run", "worker")  # the commands that become a balancer process


def main() -> int:
    try:
        if sys.argv[1:2] and sys.argv[1] in _STARTS:
            # Inside the try: hold() unblocks SIGINT, and one a parent's mask kept pending comes then.
            startup_signals.hold(worker=sys.argv[1] == "worker")
            _standard_descriptors()
        from lb.cli import EXIT_INTERRUPTED
        from lb.cli import main as command_line

        code = command_line()
    except KeyboardInterrupt:  # Ctrl-C before the command handles it (its imports, say): no traceback
        _end_by_sigint()
        raise
    if code == EXIT_INTERRUPTED:
        _end_by_sigint()
    return code


def _standard_descriptors() -> None:
    """Open /dev/null on any of descriptors 0, 1 and 2 that the process was started without.

    A service script's `<&-` or `2>&-` (daemontools, `nohup ... <&-`) left one free, and the event
    loop's own descriptor took it: libuv then aborts (`uv__close: Assertion 'fd > STDERR_FILENO'`)
    at the loop's close, so every stop ended in a core dump, and with `workers: N` every worker, which
    inherits the gap, died at its start, for ever.  With 2 closed the operator wants no log: /dev/null.
    """
    import os

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: `fd`, the ones below are open
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    # Python saw them closed at its start and left these None; logging writes to sys.stderr.
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own, for its whole life
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - line-buffered, as stderr is


def _end_by_sigint() -> None:
    """End as Ctrl-C ends a C tool: by SIGINT itself, not an exit code.  A shell running us in a loop
    (`for b in ...; do lb ctl drain ...; done`) stops only when its child died of SIGINT; an exit of 130
    tells it the child handled the signal, and the loop goes on."""
    import contextlib
    import os
    import signal

    for stream in (sys.stdout, sys.stderr):
        # A reader already gone (`lb ctl status | head`, Ctrl-C): nothing left to say to it.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    raise SystemExit(main())
