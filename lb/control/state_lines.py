"""How many of a backend's state changes get a line of their own.  [pure]

A backend's state changes are logged one line each (`backend gw-2 is down (was up): ...`), which an
operator wants, and which `rise`/`fall` keep to a few a minute for a backend that fails checks.  A
backend that asks for a state itself (`X-Backend-State`) has no such count: one that answers
`draining` and `up` by turns changed state at every probe, and twenty of them at a 250 ms interval
wrote 80 lines a second.  So each backend gets a bucket of lines (`STATE_LINES_AT_ONCE`, refilled at
`STATE_LINES_PER_SECOND`); past it its changes are counted, and the count is said with the state it
is in as soon as the bucket allows (`due`, every second), so the last state is always in the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from lb.access_log import LineBucket

STATE_LINES_AT_ONCE: Final = 8.0
STATE_LINES_PER_SECOND: Final = 0.1  # one every 10 s for a backend that keeps flapping


@dataclass(slots=True)
class _Backend:
    bucket: LineBucket = field(default_factory=lambda: LineBucket(STATE_LINES_AT_ONCE, STATE_LINES_PER_SECOND))
    unlogged: int = 0  # changes since its last line, counted instead of logged
    last_at: float = 0.0


class StateLines:
    """Per backend (pool, id): whether its next state change gets a line, and the counts left to say."""

    __slots__ = ("_backends",)

    def __init__(self) -> None:
        self._backends: dict[tuple[str, str], _Backend] = {}

    def take(self, key: tuple[str, str], now: float) -> int | None:
        """A state change of `key` at `now` (monotonic): None to count it without a line; else log it, saying
        how many before it were not logged one by one (0: none)."""
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = _Backend()
        backend.last_at = now
        if not backend.bucket.take(now):
            backend.unlogged += 1
            return None
        unlogged, backend.unlogged = backend.unlogged, 0
        return unlogged

    def due(self, now: float) -> list[tuple[tuple[str, str], int]]:
        """The backends whose uncounted changes may be said now, with their counts (each takes a line from
        its bucket); and forgets backends quiet long enough for their bucket to be full again."""
        said: list[tuple[tuple[str, str], int]] = []
        refill = STATE_LINES_AT_ONCE / STATE_LINES_PER_SECOND
        for key, backend in list(self._backends.items()):
            if backend.unlogged and backend.bucket.take(now):
                said.append((key, backend.unlogged))
                backend.unlogged = 0
            elif not backend.unlogged and now - backend.last_at > refill:
                del self._backends[key]  # as good as new: a backend that left does not stay here
        return said
