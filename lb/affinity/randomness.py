"""Fresh random bytes for affinity sessions and token nonces: the system's CSPRNG, read a block at a time.

Why a block: `os.urandom(20)` per new client was one `getrandom` system call and a release and
retake of the GIL per handshake, about 1,500 instructions and a microsecond of system time
(`python -m bench.instructions_live`, `python -m bench.split`).  Read 4 KiB at a time, the same
bytes cost one call per 200 clients.  They are the same bytes either way (no generator of ours
stretches them), each handed out once.

The block is process memory; whoever can read that can read the token keys beside it.  A forked
child starts without its parent's block (`os.register_at_fork`), or both would hand out the same
nonces under the same key.  (The balancer's workers are started with exec, not forked: this is for
a process that embeds it.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

BLOCK_BYTES: Final = 4096


class RandomPool:
    """`take(n)`: the next `n` unused bytes of a block read from `source` (os.urandom), a new block when
    this one has fewer left."""

    __slots__ = ("_at", "_block", "_block_bytes", "_source")

    def __init__(self, source: Callable[[int], bytes] = os.urandom, block_bytes: int = BLOCK_BYTES) -> None:
        self._source = source
        self._block_bytes = block_bytes
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        at = self._at
        end = at + n
        block = self._block
        if end > len(block):
            # The rest of the old block is dropped, never handed out with the new one's.
            block = self._block = self._source(max(self._block_bytes, n))
            at, end = 0, n
        self._at = end
        return block[at:end]

    def forget(self) -> None:
        """Drop the block: the next `take` reads a new one (a forked child, which must not repeat its parent)."""
        self._block = b""
        self._at = 0


_POOL: Final = RandomPool()
os.register_at_fork(after_in_child=_POOL.forget)

# The balancer's randomness for sessions and nonces: `take_random(n)` returns n fresh bytes.
take_random: Final = _POOL.take
