"""Counts by label, bumped on the request path: `tally[key] += 1` from zero.  [pure]

What `collections.Counter` was here, less its cost: Counter defines `__delitem__`, and a type
that defines either half of item assignment has every `counter[key] = n` dispatched through a
generic slot that looks `__setitem__` up by name (about 1,300 instructions an increment from our
compiled code; a handshake counts twice).  A dict subclass without one stores directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, TypeVar, cast

from lb import built_in_c

K = TypeVar("K")


class Tally(dict[K, int]):
    """A dict of counts where a missing key counts 0 and `update` adds, as Counter's does."""

    __slots__ = ()

    def __missing__(self, key: K) -> int:
        return 0

    def update(self, other: Mapping[K, int], /) -> None:  # type: ignore[override]
        """Add `other`'s counts to these (workers' totals summed by the owner: lb.control.ipc)."""
        for key, count in other.items():
            self[key] = self.get(key, 0) + count


# lb/state/_tally.c's add_one (its header says why), or None (not built, or LB_PURE_PYTHON=1).
_ADD_ONE: Final = cast("Callable[[dict[object, int], object], None] | None", built_in_c("lb.state._tally", "add_one"))


def add_one(tally: Tally[K], key: object) -> None:
    """`tally[key] += 1`: on the request path, where each count costs (a handshake counts twice).
    `key` is typed `object` so that a compiled caller makes its tuple once, not once per use."""
    if _ADD_ONE is not None:
        _ADD_ONE(cast("dict[object, int]", tally), key)
        return
    tally[cast(K, key)] += 1
