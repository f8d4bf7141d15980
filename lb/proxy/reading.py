"""One read buffer for every connection the data plane reads.  [no I/O: a buffer and its size]

A plain `asyncio.Protocol` gets each read as a new `bytes` of up to 256 KiB (the
transports' read size), and when the peer's write buffer is already at its
high-water mark (64 KiB) that read lands in it whole before reading pauses: a
client that stops reading while its backend sends (or one that sends to a backend
that stops reading) held about 320 KiB of ours, for as long as it stayed.

The data plane's protocols are `asyncio.BufferedProtocol`s instead: the transport
reads into `READ_VIEW`, at most `READ_CHUNK` bytes at a time, and the protocol
copies the bytes out (`read_bytes`: one copy, as the transport made into `bytes`
before) before anything else can read.  That bounds a stalled direction of a
plain connection at 64 + 32 KiB.  Under TLS the TLS layer keeps buffers of its own, which `lb.tls`
bounds (about 200 KiB per stalled TLS tunnel, from 740).  One
buffer serves every connection of the process: reads run one at a time on the
event loop and each is copied out at once, and an idle connection holds none.
uvloop and asyncio (plain and TLS transports alike) call `get_buffer`, fill it and
call `buffer_updated` synchronously, and both accept a switch of protocol kind on
a transport that is already reading (the handshake's protocol hands over to the
tunnel's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

from lb import built_in_c

READ_CHUNK = 32 * 1024
READ_BUFFER: Final[bytearray] = bytearray(READ_CHUNK)
READ_VIEW: Final[memoryview] = memoryview(READ_BUFFER)

# lb/proxy/_reading.c's copy (its header says why), or None (not built, or LB_PURE_PYTHON=1).
_COPY_OUT: Final = cast("Callable[[memoryview, int], bytes] | None", built_in_c("lb.proxy._reading", "copy_out"))


def read_bytes(nbytes: int) -> bytes:
    """The `nbytes` a transport has just read into READ_VIEW, copied out (as `bytes`, before the next read)."""
    if _COPY_OUT is not None:
        return _COPY_OUT(READ_VIEW, nbytes)
    return READ_VIEW[:nbytes].tobytes()
