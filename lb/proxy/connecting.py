"""A backend connect in flight: the loop's `create_connection` coroutine, stepped without a Task.

Why not a Task: a Task cost a handshake about 11,000 instructions more than stepping its
coroutine here (`python -m bench.instructions_live`, the real balancer under callgrind): its
entry in asyncio's set of all tasks (a WeakSet, in interpreted Python, added to and removed
from) and a `call_soon` for its done-callbacks.  The handshake micro-benchmark
(`bench.handshake_shell`), whose stand-in loop never connects, could not see it.

The coroutine is stepped as a Task steps it: first on the loop's next turn, then each time a
future it awaits is done (a bare `yield`, as `asyncio.sleep(0)` makes, on the next turn).  The
first step is not taken at once, from inside the read that asked for the backend, although that
would save a `call_soon`: measured side by side (`python -m bench.ab`), a handshake then cost 4 %
more CPU, fewer instructions notwithstanding (most likely because the connect's system calls, and
the loopback handshake the kernel runs inside `connect()`, then land in the middle of the read's
work: the system calls are the same ones either way).  Success
needs no report: the protocol's `connection_made` has been called by then.  A failure is
reported to `failed` from the step that met it.  Each step is lb.proxy._coroutine's `send` when
built: the coroutine's end comes back as a value, where `coroutine.send(None)` raises StopIteration
(about 4,500 instructions a handshake more, `_coroutine.c` says why).

`cancel()` is a Task's cancel: the awaited future is cancelled, and whichever step comes next
throws CancelledError into the coroutine, so that `create_connection` closes the transport it
made (uvloop and asyncio both close it on any exception, including one whose connect had
already succeeded when it was given up).  Given up before its first step, it never starts.
Nothing is reported for a cancelled connect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from lb import built_in_c


class Connecting:
    """`coroutine` stepped to its end on `loop`, from its next turn on; `failed(exc)` is called if it raises."""

    __slots__ = ("_coroutine", "_failed", "_giving_up", "_loop", "_step_callback", "_waiting")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any],
        failed: Callable[[BaseException], object],
    ) -> None:
        self._loop = loop
        self._coroutine: Coroutine[Any, Any, Any] | None = coroutine
        self._failed: Callable[[BaseException], object] | None = failed
        self._giving_up = False  # cancel() was called: CancelledError goes in at the next step
        self._waiting: asyncio.Future[Any] | None = None  # the future the coroutine awaits
        # `_step` bound once, for the first turn and for the future the connect awaits (a bound method
        # made is about 300 instructions); a cycle through this object, which `_report` breaks.
        self._step_callback: Callable[..., None] | None = self._step
        loop.call_soon(self._step_callback)  # not at once: see the module's docstring

    def done(self) -> bool:
        return self._coroutine is None

    def cancel(self) -> None:
        """Give the connect up (no-op once it has ended): its transport, if any, is closed."""
        if self._coroutine is None or self._giving_up:
            return
        self._giving_up = True
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()  # its callback steps the coroutine; if it had finished, that step is on its way

    def _step(self, _future: object = None) -> None:
        coroutine = self._coroutine
        if coroutine is None:
            return
        self._waiting = None
        try:
            if self._giving_up:
                awaited = coroutine.throw(asyncio.CancelledError())
            elif _SEND is not None:
                awaited = _SEND(coroutine)
                if awaited is _RETURNED:
                    self._report(None)
                    return
            else:
                awaited = coroutine.send(None)
        except StopIteration:
            self._report(None)
            return
        except (KeyboardInterrupt, SystemExit):
            self._report(None)
            raise  # as a Task does: these are not a connect's failure
        except BaseException as exc:  # the connect's own error (OSError, mostly), reported as a Task reports it
            self._report(None if self._giving_up else exc)
            return
        step = self._step_callback
        assert step is not None  # until _report
        if awaited is None:
            self._loop.call_soon(step)
            return
        try:
            awaited.add_done_callback(step)
        except AttributeError:  # not a future: a coroutine no loop could run (a Task raises into it too)
            coroutine.close()
            self._report(RuntimeError(f"a connect awaited {awaited!r}, not a future"))
            return
        self._waiting = awaited

    def _report(self, exc: BaseException | None) -> None:
        """The connect has ended (`exc`: how it failed, None for success or a cancel): let go of the
        coroutine (its frame held the protocol, which holds its owner) and of `failed`."""
        failed = self._failed
        self._coroutine = None
        self._waiting = None
        self._failed = None
        self._step_callback = None
        if exc is not None and failed is not None:
            failed(exc)


# lb.proxy._coroutine's send and its RETURNED (the coroutine's end as a value, no StopIteration: its
# header says what that saves), or None (not built, or LB_PURE_PYTHON=1): `coroutine.send(None)`.
_SEND: Final = cast("Callable[[Coroutine[Any, Any, Any]], Any] | None", built_in_c("lb.proxy._coroutine", "send"))
_RETURNED: Final = built_in_c("lb.proxy._coroutine", "RETURNED")
