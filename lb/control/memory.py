"""Give the heap that a burst of connections freed back to the system (glibc's `malloc_trim`).

Why: glibc's malloc returns freed memory to the system only from the top of its
heap.  A burst of short-lived connections (a reconnect storm, a flood of TLS
handshakes that stall until `timeouts.handshake`) frees its memory in holes
between longer-lived blocks, and glibc keeps those pages.  Measured on the
balancer: 8,000 stalled TLS handshakes, 1,000 at a time, took RSS from 59 to
296 MB with every connection closed; one `malloc_trim(0)` took it to 64 MB, in
about 2 ms per 40 MB released.  (A bare uvloop TLS server under the same stalls
kept a flat count of Python objects while its RSS grew: free memory, not a
leak.)  So RSS grew with every burst, whatever the connections held.

`collection_paused` holds off Python's cyclic garbage collector over a large
build (a reload's parse in its thread): see there.

`ReleasePolicy` (pure: no clock, no call) says when: once the connections held
have fallen by `min_drop` from their peak since the last release, at most every
`min_gap` seconds, and every `every` seconds in any case (slow churn leaves holes
too).  Not per connection: a release costs the pages it gives back, which the
next burst faults in again.  `release_free_memory` makes the call; on a libc
without `malloc_trim` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections.abc import Callable, Iterator


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its C library's among them
    except OSError:  # pragma: no cover - dlopen(NULL) fails on no platform we run on
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system; False where the libc cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)  # 0: keep no padding at the top; free pages inside the heap go too (glibc >= 2.8)
    return True


# How long a build may hold off cyclic collection: a file of 3,000 backends parses in 0.2-0.5 s, so
# four times that covers it.  Longer (a huge or pathological file: a 3.6 MB one takes 28 s with pure
# PyYAML), collection resumes: the cycles the rest of the process makes (an exception's traceback, a
# cancelled handshake's task) must not pile up for as long as a parse may take.
PAUSE_LIMIT = 2.0


@contextlib.contextmanager
def collection_paused(limit: float = PAUSE_LIMIT) -> Iterator[None]:
    """No cyclic garbage collection in this process while the block runs, for at most `limit` seconds
    (reference counting goes on).

    For a reload's parse of a large file, in its thread: it builds a tree of a few hundred thousand
    objects (YAML nodes, then the checked values), which sets off full collections as it grows, each
    walking every object of the process with the GIL held: 80-110 ms at 3,000 backends, during which
    the event loop, waiting for the GIL, relays nothing and answers nobody.  The tree holds no
    cycles that matter (it is freed by reference counting when the parse ends), and the cyclic
    garbage the rest of the process makes meanwhile waits for the next collection after it.  The
    whole process pauses, not just the parse, hence the limit: a timer thread turns collection back
    on if the block outlasts it.  Left as it was found: a caller that runs with collection disabled
    keeps it disabled, and no timer is started for it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    resume = threading.Timer(limit, gc.enable)
    resume.daemon = True  # a process that exits mid-parse does not wait for it
    resume.start()
    try:
        yield
    finally:
        resume.cancel()
        gc.enable()


class ReleasePolicy:
    """When to release: after the connections held fell well below their peak, or now and then."""

    __slots__ = ("every", "last", "min_drop", "min_gap", "peak")

    def __init__(self, *, min_drop: int = 256, min_gap: float = 5.0, every: float = 300.0) -> None:
        self.min_drop = min_drop  # connections: a smaller drop frees too little to be worth a release
        self.min_gap = min_gap  # seconds between two releases after drops (a storm in waves)
        self.every = every  # seconds: a release even without a drop
        self.peak = 0
        self.last: float | None = None  # when the last release was (None: never; the first `due` starts the clock)

    def due(self, held: int, now: float, *, peak: int = 0) -> bool:
        """Whether to release now, given the client connections `held` (call it every second or so) and the
        most held at once since the last call (`peak`: a burst that came and went in between counts)."""
        if self.last is None:
            self.last = now
        self.peak = max(self.peak, held, peak)
        since = now - self.last
        dropped = self.peak - held >= self.min_drop and since >= self.min_gap
        if not (dropped or since >= self.every):
            return False
        self.peak = held
        self.last = now
        return True
