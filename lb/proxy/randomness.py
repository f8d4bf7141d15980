"""Random bytes for the connections' sessions and nonces (their `random`): the system's, read a page at a time.

Why: a new client's session id and its first token's nonce (20 bytes) were one getrandom(2) a
handshake, a system call in a budget of about twenty.  Read 4 KiB at once, one call serves some 200
new clients.  The bytes are the kernel's CSPRNG output all the same, held in memory beside the key
they are used with.

Never handed out twice (a nonce must be unique under its key): each draw is cut from the page and the
page only moves forward; a forked child starts with none (`os.register_at_fork`), so it never draws
what its parent drew.  Drawn on the event loop's thread only (the proxy's connections): nothing here
makes a draw from two threads at once safe.
"""

from __future__ import annotations

import os
from typing import Final

PAGE: Final = 4096


class _Page:
    """The page being handed out, and how much of it is.  An object, not two module globals: compiled,
    its fields are read directly, where each global is a lookup in the module's dict (four a draw)."""

    __slots__ = ("drawn", "page")

    def __init__(self) -> None:
        self.page = b""
        self.drawn = 0  # how much of `page` is handed out


_current: Final = _Page()


def random_bytes(count: int) -> bytes:
    """`count` bytes from the system's CSPRNG (os.urandom), none of them handed out before."""
    if count < 0:
        raise ValueError("a negative number of random bytes")  # as os.urandom; never a step back
    current = _current
    end = current.drawn + count
    if end > len(current.page):
        if count > PAGE:
            return os.urandom(count)
        current.page, end = os.urandom(PAGE), count
    current.drawn = end
    return current.page[end - count : end]


def _forget() -> None:
    """In a forked child: what the parent held is not ours to hand out."""
    _current.page, _current.drawn = b"", 0


os.register_at_fork(after_in_child=_forget)
