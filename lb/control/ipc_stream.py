"""The control socket between the owner and a worker, as either side reads and writes it.  [asyncio shell]

`lb.control.ipc` says what the messages are (pure); this is the stream they travel on:
`read_messages` yields each well-formed one until EOF and skips the others, bounded whatever a frame's
length says; `encode_or_report` writes a frame or says, once a minute per op, that a message outgrew
the frame limit.  The owner's side is `lb.control.workers`, a worker's `lb.control.worker_channel`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from lb.control.ipc import LENGTH, MessageTooLarge, decode, encode, frame_length
from lb.log import Throttle

log = logging.getLogger(__name__)

# Beyond this much unsent control data a peer is not reading: drop messages rather than buffer them.
MAX_PENDING_BYTES = 64 * 1024 * 1024
SKIP_CHUNK = 1024 * 1024  # an oversized message is read past in chunks of this size


async def read_messages(reader: asyncio.StreamReader, peer: str) -> AsyncIterator[dict[str, Any]]:
    """Yield each well-formed control message until EOF; log and skip the others.

    An oversized frame is read past in bounded chunks, so neither its size nor its content
    can stop the reader or make it hold more than `MAX_MESSAGE_BYTES`.
    """
    while True:
        try:
            prefix = await reader.readexactly(LENGTH.size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        try:
            size = frame_length(prefix)
        except MessageTooLarge as exc:
            log.error("%s sent a bad control message, skipped: %s", peer, exc)
            remaining = exc.size
            try:
                while remaining:
                    remaining -= len(await reader.readexactly(min(remaining, SKIP_CHUNK)))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            continue
        try:
            body = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        try:
            yield decode(body)
        except ValueError as exc:
            log.error("%s sent a bad control message, skipped: %s", peer, exc)


def encode_or_report(message: dict[str, Any], reports: TooLargeReports) -> bytes | None:
    try:
        return encode(message)
    except MessageTooLarge as exc:
        reports.say(message["op"], exc)
        return None


class TooLargeReports:
    """One line a minute per op for messages past the frame limit: one that outgrew it once does so
    again each time it is made again (a states push, a stats report: every second)."""

    __slots__ = ("_throttles",)

    def __init__(self) -> None:
        self._throttles: dict[str, Throttle] = {}  # ops are ours: a handful of keys

    def say(self, op: str, exc: MessageTooLarge) -> None:
        suppressed = self._throttles.setdefault(op, Throttle(60.0)).due()
        if suppressed is not None:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.error("control message %r not sent: %s%s", op, exc, more)
