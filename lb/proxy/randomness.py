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

_page = b""
_drawn = 0  # how much of _page is handed out


def random_bytes(count: int) -> bytes:
    """`count` bytes from the system's CSPRNG (os.urandom), none of them handed out before."""
    global _page, _drawn
    if count < 0:
        raise ValueError("a negative number of random bytes")  # as os.urandom; never a step back
    end = _drawn + count
    if end > len(_page):
        if count > PAGE:
            return os.urandom(count)
        _page, end = os.urandom(PAGE), count
    chunk = _page[end - count : end]
    _drawn = end
    return chunk


def _forget() -> None:
    """In a forked child: what the parent held is not ours to hand out."""
    global _page, _drawn
    _page, _drawn = b"", 0


os.register_at_fork(after_in_child=_forget)
